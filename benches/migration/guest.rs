//! What the bench reads from the built-in guest's serial output: whether the guest knows an
//! option, and its `gap` reports (`ferry.blackout`) as the result file keeps them.

use ferry::guest::{GuestLine, PlacedGap};
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

/// A placed `gap` report as the result file keeps it.
pub fn gap_json(gap: &PlacedGap) -> Value {
    json!({
        "end_ms": (gap.end_ms * 10.0).round() / 10.0,
        "cpu": gap.cpu,
        "us": gap.us,
        "stopped": gap.stopped,
    })
}
