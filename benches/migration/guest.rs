//! What the bench reads from the built-in guest's serial output: whether the guest knows an
//! option, and its `gap` reports (`ferry.blackout`).

use std::time::Instant;

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

/// A `gap` report placed in time: CPU I went `us` µs without running (more than the
/// `ferry.blackout` threshold), a stretch that ended at `end_ms`.
#[derive(Clone, Copy, Debug)]
pub struct Gap {
    /// When the gap ended, in ms since the bench's reference instant: the line's arrival less
    /// how long before it the guest says the gap ended. Late by the time the guest takes to
    /// print the line (a fraction of a ms), more if the other CPU held the serial lock.
    pub end_ms: f64,
    pub cpu: u32,
    pub us: u64,
    /// Across one of ferry's stops (a pause, a switchover), as KVM's clock told the guest.
    pub stopped: bool,
}

impl Gap {
    /// When the gap began, in ms since the reference instant.
    pub fn start_ms(self) -> f64 {
        self.end_ms - self.us as f64 / 1000.0
    }

    /// How much of the gap lies after `t_ms`, in ms (0 if it ended before).
    pub fn ms_after(self, t_ms: f64) -> f64 {
        (self.end_ms - self.start_ms().max(t_ms)).max(0.0)
    }

    pub fn to_json(self) -> Value {
        json!({
            "end_ms": (self.end_ms * 10.0).round() / 10.0,
            "cpu": self.cpu,
            "us": self.us,
            "stopped": self.stopped,
        })
    }
}

/// The gaps the `gap` lines among `arrived` (lines with the instant each arrived) report,
/// placed in ms since `since`.
pub fn gaps(arrived: &[(Instant, String)], since: Instant) -> Vec<Gap> {
    arrived
        .iter()
        .filter_map(|(at, line)| match GuestLine::parse(line) {
            GuestLine::Gap {
                cpu,
                us,
                ago_us,
                stopped,
            } => {
                let arrived_ms = at.saturating_duration_since(since).as_secs_f64() * 1000.0;
                Some(Gap {
                    end_ms: arrived_ms - ago_us as f64 / 1000.0,
                    cpu,
                    us,
                    stopped,
                })
            }
            _ => None,
        })
        .collect()
}
