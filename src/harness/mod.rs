//! Driving ferry from another program: the integration tests, the live-migration demo and the
//! benchmark start ferry processes, read their guests' serial output, and talk QMP to them.

mod process;
mod qmp;

pub use process::Ferry;
pub use qmp::{NoEvent, Qmp};
