//! What the bench reads from the built-in guest's serial output: whether the guest knows an
//! option, and its `gap` reports (`ferry.blackout`).

use ferry::guest::GuestLine;
use serde_json::{json, Value};

/// The guest's warning that it does not know the `ferry.*` option `key` (say `ferry.fill`), if
/// it printed one: a guest built before that option existed.
pub fn unknown_option(lines: &[String], key: &str) -> Option<String> {
    lines.iter().find_map(|line| match GuestLine::parse(line) {
        GuestLine::Warning(warning)
            if warning.starts_with("unknown option") && warning.contains(key) =>
        {
            Some(warning)
        }
        _ => None,
    })
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
pub fn gaps(lines: &[String], t_ms: f64) -> Vec<Gap> {
    lines
        .iter()
        .filter_map(|line| match GuestLine::parse(line) {
            GuestLine::Gap {
                cpu,
                us,
                stopped: false,
            } => Some(Gap { t_ms, cpu, us }),
            _ => None,
        })
        .collect()
}

/// The guest's warning that it cannot tell ferry's stops from preemptions, if it printed one.
pub fn no_stop_flag(lines: &[String]) -> Option<String> {
    lines.iter().find_map(|line| match GuestLine::parse(line) {
        GuestLine::Warning(warning) if warning.starts_with("no KVM clock") => Some(warning),
        _ => None,
    })
}

/// The blackout the guest saw across a migration (`ferry::guest::stop_blackout_us`), from the
/// destination's serial output.
pub fn blackout_us(destination_lines: &[String], cpus: u32) -> Option<u64> {
    let lines: Vec<GuestLine> = destination_lines
        .iter()
        .map(|l| GuestLine::parse(l))
        .collect();
    ferry::guest::stop_blackout_us(&lines, cpus)
}
