//! Throttling vCPUs (auto-converge): every period each vCPU is kicked out of `KVM_RUN` and
//! kept out for the throttled share of the period, so a guest that dirties memory faster than
//! the migration link carries it slows down until the migration converges.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The period over which the throttle share applies (QEMU uses 10 ms too).
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// The share of time, in percent, the vCPUs spend held back; shared with every vCPU thread.
#[derive(Debug, Clone, Default)]
pub struct Throttle {
    percent: Arc<AtomicU8>,
}

impl Throttle {
    pub fn set(&self, percent: u8) {
        self.percent.store(percent.min(99), Ordering::Relaxed);
    }

    pub fn percent(&self) -> u8 {
        self.percent.load(Ordering::Relaxed)
    }

    /// How long a kicked vCPU stays out of the guest, if throttled.
    pub fn hold_back(&self) -> Option<Duration> {
        match self.percent() {
            0 => None,
            percent => Some(THROTTLE_PERIOD * u32::from(percent) / 100),
        }
    }
}

/// Kicks every vCPU out of `KVM_RUN` once per period while the throttle is on; never returns
/// (the caller drops it when the throttled phase ends).
pub async fn run_throttle(throttle: Throttle, kicker: super::vcpu::Kicker) {
    let mut period = tokio::time::interval(THROTTLE_PERIOD);
    period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        period.tick().await;
        if throttle.percent() > 0 {
            kicker.kick_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_back_is_the_share_of_the_period() {
        let throttle = Throttle::default();
        assert_eq!(throttle.hold_back(), None);
        throttle.set(30);
        assert_eq!(throttle.hold_back(), Some(Duration::from_millis(3)));
        throttle.set(250);
        assert_eq!(throttle.percent(), 99);
    }
}
