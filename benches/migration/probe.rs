//! How busy the host was: other processes' CPU time and the load average.

use std::time::Instant;

/// CPU time spent by the whole host and by some processes over an interval, to tell how much of
/// the host's CPU other work took while a migration ran.
pub(crate) struct CpuProbe {
    started: Instant,
    pub(crate) host: u64,
    ours: u64,
    pids: Vec<u32>,
}

impl CpuProbe {
    pub(crate) fn start(pids: Vec<u32>) -> Option<Self> {
        Some(Self {
            started: Instant::now(),
            host: host_busy_ticks()?,
            ours: pids
                .iter()
                .map(|&pid| process_ticks(pid))
                .sum::<Option<u64>>()?,
            pids,
        })
    }

    /// Cores' worth of CPU the host spent outside `pids` since the start.
    pub(crate) fn other_cores(&self) -> Option<f64> {
        let host = host_busy_ticks()?.checked_sub(self.host)?;
        let ours: u64 = self
            .pids
            .iter()
            .map(|&pid| process_ticks(pid))
            .sum::<Option<u64>>()?;
        let ours = ours.checked_sub(self.ours)?;
        // SAFETY: sysconf only reads a configuration value.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let seconds = self.started.elapsed().as_secs_f64();
        if ticks_per_second <= 0 || seconds <= 0.0 {
            return None;
        }
        Some(host.saturating_sub(ours) as f64 / ticks_per_second as f64 / seconds)
    }
}

/// Busy clock ticks of all CPUs since boot: user, nice, system, irq, softirq and steal of
/// `/proc/stat` (guest time is part of user time already).
fn host_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| fields.get(i).copied())
        .sum()
}

/// User and system clock ticks of a process (all its threads).
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces, start with the state (field 3);
    // utime and stime are fields 14 and 15.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
