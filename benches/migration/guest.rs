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

/// The `gap` reports among `lines`, stamped `t_ms`.
pub fn gaps(lines: &[String], t_ms: f64) -> Vec<Gap> {
    lines
        .iter()
        .filter_map(|line| match GuestLine::parse(line) {
            GuestLine::Gap { cpu, us } => Some(Gap { t_ms, cpu, us }),
            _ => None,
        })
        .collect()
}

/// The CPU a line is about, for the lines that name one.
fn cpu_of(line: &GuestLine) -> Option<u32> {
    match *line {
        GuestLine::Tick { cpu, .. }
        | GuestLine::Sweep { cpu, .. }
        | GuestLine::Gap { cpu, .. }
        | GuestLine::TscBackwards { cpu, .. } => Some(cpu),
        _ => None,
    }
}

/// The blackout the guest saw across a migration, from the destination's serial output.
///
/// A vCPU's first poll on the destination reports the stretch since its last TSC reading on
/// the source, before it prints anything else, if that stretch is over the threshold. So each
/// CPU's first line that names a CPU tells: a `gap` is its blackout; anything else means its
/// blackout was under the threshold (a later `gap` is the host preempting it).
///
/// `None` until every one of `cpus` has printed such a line; then `Some(None)` if every CPU's
/// blackout was under the threshold, else `Some(Some(µs))`, the longest.
pub fn blackout_us(destination_lines: &[String], cpus: u32) -> Option<Option<u64>> {
    let mut first: Vec<Option<Option<u64>>> = vec![None; cpus as usize];
    for line in destination_lines {
        let line = GuestLine::parse(line);
        let Some(slot @ None) = cpu_of(&line).and_then(|cpu| first.get_mut(cpu as usize)) else {
            continue;
        };
        *slot = Some(match line {
            GuestLine::Gap { us, .. } => Some(us),
            _ => None,
        });
    }
    let first: Vec<Option<u64>> = first.into_iter().collect::<Option<_>>()?;
    Some(first.into_iter().flatten().max())
}
