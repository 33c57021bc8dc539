//! What the host lends a switchover while it runs: CPUs that wake at once, and a CPU for each
//! vCPU thread, so that the hand-offs between threads and the vCPUs' own saves and restores
//! take no longer than their work.

use crate::runtime::affinity::Spread;
use crate::runtime::vcpus::Vcpus;
use crate::runtime::wake_latency::QuickWake;

/// Held from just before the switchover until it has ended, one way or the other; dropping it
/// gives the host back.
#[derive(Debug)]
pub struct Sprint {
    _awake: Option<QuickWake>,
    _spread: Spread,
}

impl Sprint {
    /// Starts ahead of the pause: a CPU asleep now has woken by then, and a vCPU thread that
    /// must move to a CPU of its own moves while its guest still runs.
    pub fn start(vcpus: &Vcpus) -> Self {
        Self {
            _awake: QuickWake::request(),
            _spread: Spread::threads(&vcpus.thread_ids()),
        }
    }
}
