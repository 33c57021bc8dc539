//! `max-bandwidth`: when the next frame may go. An operator changes the cap during a migration
//! (libvirt's `migrate-setspeed` does), so the schedule starts over at every change: paced from
//! the round's start, lowering a cap after gigabytes went unpaced would hold every frame back
//! until the average came down to it, for minutes, and raising it after a slow stretch would let
//! everything owed since go at once, far above either cap.

use std::time::{Duration, Instant};

/// How far behind its schedule sending may fall and then catch up at full speed: a link slower
/// than the cap for a while must not earn a burst above it (QEMU's window is as long).
const CATCH_UP: Duration = Duration::from_millis(100);

/// How often a frame held back reads the cap again: a new cap applies to it too.
const RECHECK: Duration = Duration::from_millis(100);

/// When frames may go under `max-bandwidth`; no schedule while there is no cap.
#[derive(Debug, Default)]
pub struct Pacer {
    schedule: Option<Schedule>,
}

/// Bytes at a rate, counted from when that rate was set (or from a catch-up).
#[derive(Debug)]
struct Schedule {
    /// Bytes per second, never 0.
    rate: u64,
    since: Instant,
    bytes: u64,
}

impl Schedule {
    /// When `bytes` from `since` are due at the rate.
    fn at(&self, bytes: u64) -> Instant {
        self.since + Duration::from_secs_f64(bytes as f64 / self.rate as f64)
    }
}

impl Pacer {
    /// When `frame` more bytes may start, at `rate` bytes per second (0: no cap); `None` means
    /// at once. The frame counts as sent from then on.
    pub fn due(&mut self, now: Instant, rate: u64, frame: u64) -> Option<Instant> {
        if rate == 0 {
            self.schedule = None;
            return None;
        }
        let schedule = match &mut self.schedule {
            Some(schedule) if schedule.rate == rate => schedule,
            unset_or_changed => unset_or_changed.insert(Schedule {
                rate,
                since: now,
                bytes: 0,
            }),
        };
        if schedule.at(schedule.bytes) + CATCH_UP < now {
            schedule.since = now - CATCH_UP;
            schedule.bytes = 0;
        }
        schedule.bytes += frame;
        let due = schedule.at(schedule.bytes);
        (due > now).then_some(due)
    }

    /// Waits until `frame` more bytes may start under the cap `cap` reads (bytes per second,
    /// 0: none), which an operator may change meanwhile.
    pub async fn wait(&mut self, frame: u64, cap: impl Fn() -> u64) {
        let mut rate = cap();
        let mut due = self.due(Instant::now(), rate, frame);
        while let Some(at) = due {
            let wake = at.min(Instant::now() + RECHECK);
            tokio::time::sleep_until(wake.into()).await;
            if wake == at {
                return;
            }
            let current = cap();
            if current != rate {
                rate = current;
                due = self.due(Instant::now(), rate, frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn frames_go_at_the_capped_rate() {
        let mut pacer = Pacer::default();
        let start = Instant::now();
        assert_eq!(
            pacer.due(start, 100 * MIB, 4 * MIB),
            Some(start + Duration::from_millis(40))
        );
        let later = start + Duration::from_millis(40);
        assert_eq!(
            pacer.due(later, 100 * MIB, 4 * MIB),
            Some(start + Duration::from_millis(80))
        );
    }

    #[test]
    fn no_cap_never_waits() {
        let mut pacer = Pacer::default();
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(pacer.due(now, 0, 4 * MIB), None);
        }
    }

    #[test]
    fn a_lower_cap_applies_from_when_it_is_set_not_from_the_start() {
        let mut pacer = Pacer::default();
        let start = Instant::now();
        // A second at 1 GiB/s, unpaced; then the cap comes down to 10 MiB/s.
        assert_eq!(pacer.due(start, 0, 1024 * MIB), None);
        let capped = start + Duration::from_secs(1);
        assert_eq!(
            pacer.due(capped, 10 * MIB, MIB),
            Some(capped + Duration::from_millis(100))
        );
    }

    #[test]
    fn a_changed_cap_starts_a_new_schedule() {
        let mut pacer = Pacer::default();
        let start = Instant::now();
        pacer.due(start, 10 * MIB, 10 * MIB);
        let raised = start + Duration::from_millis(500);
        assert_eq!(
            pacer.due(raised, 100 * MIB, 10 * MIB),
            Some(raised + Duration::from_millis(100))
        );
    }

    #[tokio::test]
    async fn a_frame_held_back_goes_once_the_cap_is_lifted() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let cap = std::sync::Arc::new(AtomicU64::new(1));
        let lift = {
            let cap = cap.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                cap.store(0, Ordering::Relaxed);
            }
        };
        let mut pacer = Pacer::default();
        // At 1 byte/s the frame would be due in 48 days.
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(pacer.wait(4 * MIB, || cap.load(Ordering::Relaxed)), lift)
        });
        waited.await.expect("the lifted cap let the frame go");
    }

    #[test]
    fn a_slow_stretch_earns_no_more_than_the_catch_up_window() {
        let mut pacer = Pacer::default();
        let start = Instant::now();
        pacer.due(start, 100 * MIB, MIB);
        // The link took a whole second for that MiB: at 100 MiB/s, 99 MiB were owed.
        let late = start + Duration::from_secs(1);
        let mut sent_at_once = 0;
        while pacer.due(late, 100 * MIB, MIB).is_none() {
            sent_at_once += 1;
        }
        // 100 ms at 100 MiB/s, and not one frame more.
        assert_eq!(sent_at_once, 10);
    }
}
