//! The QMP control socket: QEMU's JSON monitor protocol over a UNIX socket.
//!
//! The layout follows mini-redis (STYLE.md, practice 15):
//!
//! | file | role |
//! |---|---|
//! | `arg.rs` | `-qmp unix:PATH,server,nowait` |
//! | `socket.rs` | binding the socket file (mode 0600) and removing it again |
//! | `frame.rs` | cutting a byte stream into JSON values, with a size limit and resync |
//! | `connection.rs` | one client's stream: the read buffer, the framer, buffered writes |
//! | `command.rs` | `Command::from_request` (validation) and `Command::apply` |
//! | `args.rs` | typed access to a command's `arguments`, with QEMU's error texts |
//! | `message.rs` | what the server writes: greeting, replies, error classes |
//! | `server.rs` | the accept loop and one task per session |
//!
//! A session, as QEMU runs one:
//!
//! ```text
//! client                         session task                     VM owner
//!   | <-- {"QMP":{...}} greeting --- |                                  |
//!   | --- {"execute":"stop","id":1} ->| Command::from_request            |
//!   |                                | -- Envelope{Request::Stop} ----> |
//!   | <-- {"event":"STOP",...} ------ | <- broadcast Event ------------- |
//!   | <-- {"return":{},"id":1} ------ | <- oneshot Reply --------------- |
//! ```
//!
//! The session never touches the machine and holds no lock: everything it knows of the VM
//! comes through [`VmHandle`](crate::runtime::control::VmHandle).

mod arg;
mod args;
mod command;
mod connection;
mod frame;
mod message;
mod server;
mod socket;

use std::io;
use std::path::PathBuf;

pub use arg::parse_qmp_arg;
pub use command::{Command, CommandError, COMMAND_NAMES};
pub use connection::Connection;
pub use frame::{Frame, Framer, MAX_REQUEST_BYTES};
pub use message::{ErrorClass, Greeting, VersionInfo, VersionTriple};
pub use server::{serve, SHUTDOWN_GRACE};
pub use socket::{bind, QmpSocket, SocketFileGuard};

/// Why the QMP socket could not be set up. Errors a client causes are [`CommandError`]s and
/// never end the server.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error(
        "invalid -qmp '{arg}': {reason}; expected unix:PATH,server,nowait \
         (or unix:PATH,server=on,wait=off)"
    )]
    InvalidArgument { arg: String, reason: String },
    #[error("QMP socket path {path:?} is {len} bytes; a UNIX socket path must be under {max}")]
    PathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("QMP socket path {path:?} contains a NUL byte")]
    PathHasNul { path: PathBuf },
    #[error("refusing to replace {path:?} with the QMP socket: it exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("QMP socket {path:?} is in use: another process is listening on it")]
    InUse { path: PathBuf },
    #[error("cannot inspect the existing file at {path:?}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale QMP socket {path:?}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the QMP socket at {path:?}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot hand the QMP socket to the tokio runtime")]
    Register(#[source] io::Error),
}
