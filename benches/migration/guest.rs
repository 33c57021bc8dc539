//! What the bench reads from the built-in guest's serial output: whether the guest knows an
//! option, and its `gap` reports (`ferry.blackout`).

use ferry::guest::GuestLine;
use serde_json::{json, Value};

/// The guest's first warning that starts with `prefix` and mentions `about`.
fn warning<'a>(lines: &'a [GuestLine], prefix: &str, about: &str) -> Option<&'a str> {
    lines.iter().find_map(|line| match line {
        GuestLine::Warning(warning) if warning.starts_with(prefix) && warning.contains(about) => {
            Some(warning.as_str())
        }
        _ => None,
    })
}

/// The guest's warning that it does not know the `ferry.*` option `key` (say `ferry.fill`), if
/// it printed one: a guest built before that option existed.
pub fn unknown_option<'a>(lines: &'a [GuestLine], key: &str) -> Option<&'a str> {
    warning(lines, "unknown option", key)
}

/// The guest's warning that it cannot tell ferry's stops from preemptions, if it printed one.
pub fn no_stop_flag(lines: &[GuestLine]) -> Option<&str> {
    warning(lines, "no KVM clock", "")
}

/// A `gap cpu=I us=N` report: CPU I went N µs without running (more than the `ferry.blackout`
/// threshold), as the bench received it.
#[derive(Clone, Copy, Debug)]
pub struct Gap {
    /// When the line arrived, in ms since `migrate` (within a poll of the bench's).
    pub t_ms: f64,
    pub cpu: u32,
    pub us: u64,
}

impl Gap {
    pub fn to_json(self) -> Value {
        json!({"t_ms": self.t_ms.round() as u64, "cpu": self.cpu, "us": self.us})
    }
}

/// The stalls the `gap` lines among `lines` report, stamped `t_ms` (not the gaps across a
/// stop of ferry's, which are its pauses, of any length).
pub fn gaps(lines: &[GuestLine], t_ms: f64) -> Vec<Gap> {
    lines
        .iter()
        .filter_map(|line| match *line {
            GuestLine::Gap {
                cpu,
                us,
                stopped: false,
            } => Some(Gap { t_ms, cpu, us }),
            _ => None,
        })
        .collect()
}
