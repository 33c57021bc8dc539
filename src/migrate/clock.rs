//! The destination's clock as the source sees it, so that the source can place the moment the
//! guest ran again on the destination on its own timeline, and end the downtime there.
//!
//! The source cannot simply time the commit's round trip: the destination writes COMMITTED
//! after its vCPUs run the guest again, and on a busy host the source may read it milliseconds
//! later still (its thread waits for a core the guest's vCPUs now hold). So the destination
//! stamps its moments on its own monotonic clock, and the source maps them onto its own with
//! an offset measured at setup, NTP-style: the probe with the shortest round trip, whose
//! answer was stamped within half of that round trip of the probe's midpoint. No wall clock
//! is involved, so the two hosts' clocks need not agree.

use std::time::{Duration, Instant};

/// How many clock probes the source sends at setup; the one with the shortest round trip is
/// kept (a probe that waited for a core on either side is off by up to that wait).
pub const PROBES: usize = 4;
/// How many the source sends again right before the switchover: each costs the guest a round
/// trip's worth of dirtying that the downtime then sends.
pub const SWITCHOVER_PROBES: usize = 2;

/// A moment on the destination's migration clock: nanoseconds since that side began receiving.
pub type PeerNanos = u64;

/// One probe's answer: the destination's clock reading, and when the probe left and the
/// answer arrived here.
#[derive(Debug, Clone, Copy)]
pub struct PeerClock {
    /// The source's moment that matches `peer_ns`: the middle of the round trip.
    local: Instant,
    peer_ns: PeerNanos,
    round_trip: Duration,
}

impl PeerClock {
    pub fn from_probe(sent: Instant, answered: Instant, peer_ns: PeerNanos) -> Self {
        let round_trip = answered.saturating_duration_since(sent);
        Self {
            local: sent + round_trip / 2,
            peer_ns,
            round_trip,
        }
    }

    /// The more precise of two probes.
    pub fn better(self, other: Self) -> Self {
        if other.round_trip < self.round_trip {
            other
        } else {
            self
        }
    }

    /// The round trip of the probe the offset came from.
    pub fn round_trip(&self) -> Duration {
        self.round_trip
    }

    /// How far off a mapped moment can be: half the probe's round trip.
    pub fn uncertainty(&self) -> Duration {
        self.round_trip / 2
    }

    /// The destination's moment matching the source's `moment`.
    pub fn peer(&self, moment: Instant) -> PeerNanos {
        if moment >= self.local {
            let after = (moment - self.local).as_nanos() as PeerNanos;
            self.peer_ns.saturating_add(after)
        } else {
            let before = (self.local - moment).as_nanos() as PeerNanos;
            self.peer_ns.saturating_sub(before)
        }
    }

    /// The source's moment matching the destination's `peer_ns`.
    pub fn local(&self, peer_ns: PeerNanos) -> Instant {
        if peer_ns >= self.peer_ns {
            self.local + Duration::from_nanos(peer_ns - self.peer_ns)
        } else {
            let before = Duration::from_nanos(self.peer_ns - peer_ns);
            self.local.checked_sub(before).unwrap_or(self.local)
        }
    }
}

/// The destination's side: its migration clock.
#[derive(Debug, Clone, Copy)]
pub struct LocalClock {
    origin: Instant,
}

impl LocalClock {
    pub fn start() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> PeerNanos {
        self.at(Instant::now())
    }

    pub fn at(&self, moment: Instant) -> PeerNanos {
        moment.saturating_duration_since(self.origin).as_nanos() as PeerNanos
    }

    /// How long ago `moment` of this clock was.
    pub fn since(&self, moment: PeerNanos) -> Duration {
        Duration::from_nanos(self.now().saturating_sub(moment))
    }
}

/// How long each vCPU was out of the guest, from when it left the guest here (`left`) to when
/// it went back in on the destination (`entered`, mapped onto this clock), both in vCPU order;
/// `None` if the two lists do not pair up. The downtime is the longest: each vCPU is a thread
/// of the guest's own that measures its own gap, and the first to stop and the last to start
/// again may be different vCPUs, neither of which missed that whole stretch.
pub fn blackouts(left: &[Instant], entered: &[Instant]) -> Option<Vec<Duration>> {
    (left.len() == entered.len()).then(|| {
        left.iter()
            .zip(entered)
            .map(|(&left, &entered)| entered.saturating_duration_since(left))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blackout_is_the_longest_of_any_one_vcpu() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // vCPU 0 stopped first and came back first; vCPU 1 stopped 3 ms later and came back
        // last: neither was out for the 7 ms from the first stop to the last start.
        let left = [t, t + ms(3)];
        let entered = [t + ms(4), t + ms(7)];
        let longest_blackout =
            |left: &[Instant], entered: &[Instant]| blackouts(left, entered)?.into_iter().max();
        assert_eq!(longest_blackout(&left, &entered), Some(ms(4)));
        assert_eq!(longest_blackout(&left, &entered[..1]), None);
        assert_eq!(longest_blackout(&[], &[]), None);
    }

    #[test]
    fn a_peer_moment_maps_through_the_middle_of_the_round_trip() {
        let sent = Instant::now();
        let clock = PeerClock::from_probe(sent, sent + Duration::from_micros(100), 5_000_000);
        assert_eq!(clock.uncertainty(), Duration::from_micros(50));
        assert_eq!(clock.local(5_000_000), sent + Duration::from_micros(50));
        assert_eq!(
            clock.local(7_000_000),
            sent + Duration::from_micros(50) + Duration::from_millis(2)
        );
        assert_eq!(clock.local(4_950_000), sent);
        let later = sent + Duration::from_millis(3);
        assert_eq!(clock.local(clock.peer(later)), later);
        assert_eq!(clock.peer(sent), 4_950_000);
    }

    #[test]
    fn the_shortest_round_trip_wins() {
        let sent = Instant::now();
        let slow = PeerClock::from_probe(sent, sent + Duration::from_millis(3), 1);
        let fast = PeerClock::from_probe(sent, sent + Duration::from_micros(40), 2);
        assert_eq!(slow.better(fast).peer_ns, 2);
        assert_eq!(fast.better(slow).peer_ns, 2);
    }

    #[test]
    fn the_local_clock_counts_from_its_start() {
        let clock = LocalClock::start();
        let later = Instant::now() + Duration::from_millis(1);
        assert!(clock.at(later) >= 1_000_000);
        assert!(clock.now() < clock.at(later));
    }
}
