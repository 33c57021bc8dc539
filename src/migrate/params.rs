//! Migration parameters (`migrate-set-parameters`) and the pre-copy convergence decision.

use std::time::Duration;

use serde_json::{json, Value};

use super::wire::MAX_LANES;
use crate::runtime::control::MigrationParameterUpdate;

/// QEMU's default `downtime-limit`.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// Dirty rounds after the first full pass before the switchover is forced.
pub const MAX_DIRTY_ROUNDS: u32 = 30;
/// QEMU's upper bound for `downtime-limit` (2000 s).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// The operator's knobs, readable and settable while a migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationParameters {
    /// How long the guest may be paused at the switchover.
    pub downtime_limit_ms: u64,
    /// Bytes per second on the wire; 0 means unlimited.
    pub max_bandwidth: u64,
    /// Auto-converge: how hard to hold the vCPUs back when the guest outruns the link.
    pub throttle: ThrottleParameters,
    /// ferry's own: give up (the source runs on) if the guest has not converged after this
    /// many seconds; 0 waits as long as it takes.
    pub convergence_timeout_s: u64,
    /// Connections that carry the pages when the `multifd` capability is on (QEMU's default
    /// is 2 as well).
    pub multifd_channels: u32,
}

impl Default for MigrationParameters {
    fn default() -> Self {
        Self {
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            max_bandwidth: 0,
            throttle: ThrottleParameters::default(),
            convergence_timeout_s: 0,
            multifd_channels: 2,
        }
    }
}

/// QEMU's `cpu-throttle-initial`, `cpu-throttle-increment` and `max-cpu-throttle`, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleParameters {
    pub initial: u8,
    pub increment: u8,
    pub max: u8,
}

impl Default for ThrottleParameters {
    /// QEMU's defaults.
    fn default() -> Self {
        Self {
            initial: 20,
            increment: 10,
            max: 99,
        }
    }
}

/// The vCPU throttle for the next round, from the current one and the last round: a guest
/// that dirtied more than half of what the round could send will not converge by itself, so it
/// is held back harder (QEMU's auto-converge trigger); otherwise the throttle stays.
pub fn next_throttle(current: u8, dirtied: u64, sent: u64, params: ThrottleParameters) -> u8 {
    if dirtied.saturating_mul(2) <= sent {
        current
    } else if current == 0 {
        params.initial.min(params.max)
    } else {
        current.saturating_add(params.increment).min(params.max)
    }
}

impl MigrationParameters {
    /// Whether a migration running for `elapsed` has used up its convergence timeout.
    pub fn convergence_timed_out(&self, elapsed: Duration) -> bool {
        self.convergence_timeout_s != 0
            && elapsed >= Duration::from_secs(self.convergence_timeout_s)
    }

    /// The `query-migrate-parameters` answer, with QEMU's names.
    pub fn to_json(self) -> Value {
        json!({
            "downtime-limit": self.downtime_limit_ms,
            "max-bandwidth": self.max_bandwidth,
            "cpu-throttle-initial": self.throttle.initial,
            "cpu-throttle-increment": self.throttle.increment,
            "max-cpu-throttle": self.throttle.max,
            "convergence-timeout": self.convergence_timeout_s,
            "multifd-channels": self.multifd_channels,
        })
    }

    /// Applies `migrate-set-parameters`, refusing values QEMU refuses; nothing changes unless
    /// every value is acceptable.
    pub fn update(&mut self, update: &MigrationParameterUpdate) -> Result<(), String> {
        let percent = |name: &str, value: Option<u64>, current: u8| match value {
            None => Ok(current),
            Some(p @ 1..=99) => Ok(p as u8),
            Some(p) => Err(format!("{name} must be a percentage from 1 to 99, not {p}")),
        };
        let throttle = ThrottleParameters {
            initial: percent(
                "cpu-throttle-initial",
                update.cpu_throttle_initial,
                self.throttle.initial,
            )?,
            increment: percent(
                "cpu-throttle-increment",
                update.cpu_throttle_increment,
                self.throttle.increment,
            )?,
            max: percent(
                "max-cpu-throttle",
                update.max_cpu_throttle,
                self.throttle.max,
            )?,
        };
        let channels = match update.multifd_channels {
            None => self.multifd_channels,
            Some(c) if (1..=u64::from(MAX_LANES)).contains(&c) => c as u32,
            Some(c) => {
                return Err(format!(
                    "multifd-channels must be 1 to {MAX_LANES}, not {c}"
                ))
            }
        };
        let (downtime_limit_ms, max_bandwidth) = (update.downtime_limit_ms, update.max_bandwidth);
        if let Some(limit) = downtime_limit_ms {
            if limit > MAX_DOWNTIME_LIMIT_MS {
                return Err(format!(
                    "downtime-limit {limit} ms is above the maximum of {MAX_DOWNTIME_LIMIT_MS} ms"
                ));
            }
            self.downtime_limit_ms = limit;
        }
        if let Some(bandwidth) = max_bandwidth {
            self.max_bandwidth = bandwidth;
        }
        if let Some(timeout) = update.convergence_timeout_s {
            self.convergence_timeout_s = timeout;
        }
        self.multifd_channels = channels;
        self.throttle = throttle;
        Ok(())
    }
}

/// What to do after a dirty-log sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the dirty pages with the guest running and look again.
    AnotherRound,
    /// Pause the guest and send the rest: it fits the downtime limit.
    Switchover,
    /// Pause the guest and send the rest although it may not fit: the round cap is reached.
    ForcedSwitchover,
}

/// A remainder this quick to send is not worth another round.
pub const NEGLIGIBLE_DOWNTIME: Duration = Duration::from_millis(2);

/// Decides, after dirty round `round` (1 for the first dirty round), whether `remaining_bytes`
/// can be sent within the downtime limit at `bandwidth` bytes per second, beside the
/// switchover's own cost (`fixed`, [`SwitchoverCost`]).
///
/// Fitting the limit is necessary, not sufficient: while each round still halves what is left
/// (`previous_bytes`, what the round started with), another round is taken, since it cuts the
/// guest's pause too. The limit is the most an operator accepts, not a goal: a guest that
/// dirties 1 GB/s would otherwise pause for as long as the limit allows.
pub fn decide(
    round: u32,
    remaining_bytes: u64,
    previous_bytes: u64,
    bandwidth: f64,
    fixed: Duration,
    downtime_limit: Duration,
) -> Decision {
    let sending = expected_downtime(remaining_bytes, bandwidth);
    // Rounds shrink only the sending. A fixed cost over the limit by itself (a limit of a few
    // ms, or a pause measured while the host was busy) must not keep a guest with nothing
    // left to send from ever switching over.
    let fits = sending.saturating_add(fixed) <= downtime_limit
        || (fixed > downtime_limit && sending <= NEGLIGIBLE_DOWNTIME);
    if fits {
        let still_shrinking = remaining_bytes.saturating_mul(2) <= previous_bytes;
        if sending <= NEGLIGIBLE_DOWNTIME || !still_shrinking || round >= MAX_DIRTY_ROUNDS {
            Decision::Switchover
        } else {
            Decision::AnotherRound
        }
    } else if round >= MAX_DIRTY_ROUNDS {
        Decision::ForcedSwitchover
    } else {
        Decision::AnotherRound
    }
}

/// What a switchover costs besides sending the last pages, from what was measured before it:
/// `expected-downtime` is this plus the remainder's sending time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchoverCost {
    /// Pausing the vCPUs (measured when dirty logging was turned on). The destination's
    /// restore wakes each vCPU thread the same way, so it counts for that too.
    pub pause: Duration,
    /// Reading the dirty log, as the last round's read took.
    pub sync: Duration,
    /// A round trip to the destination (the clock probes' shortest): half of one for the state,
    /// then READY and the commit, which overlap the destination's restore (fully only when
    /// the two sides do not share the host's cores, as they do on a host with two).
    pub round_trip: Duration,
}

impl SwitchoverCost {
    pub fn total(&self) -> Duration {
        self.pause + self.sync + self.round_trip / 2 + self.pause.max(self.round_trip)
    }
}

/// How long sending `bytes` takes at `bandwidth` bytes per second; unbounded when nothing has
/// been measured yet (then only an empty remainder fits any limit).
pub fn expected_downtime(bytes: u64, bandwidth: f64) -> Duration {
    if bytes == 0 {
        Duration::ZERO
    } else if bandwidth > 0.0 && bandwidth.is_finite() {
        Duration::from_secs_f64(bytes as f64 / bandwidth)
    } else {
        Duration::MAX
    }
}

/// The least time the source gives a switchover, from the pause to the destination's word that
/// it has the last pages and the state, before it fails the migration and runs the guest again.
pub const SWITCHOVER_DEADLINE_MIN: Duration = Duration::from_secs(5);

/// How long a switchover expected to take `expected` may take: ten times that (bandwidth
/// estimates err, and a forced switchover can be long), and at least
/// [`SWITCHOVER_DEADLINE_MIN`].
pub fn switchover_deadline(expected: Duration) -> Duration {
    expected.saturating_mul(10).max(SWITCHOVER_DEADLINE_MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switchover_may_take_ten_times_its_estimate_and_at_least_the_minimum() {
        assert_eq!(
            switchover_deadline(Duration::from_millis(2)),
            SWITCHOVER_DEADLINE_MIN
        );
        assert_eq!(
            switchover_deadline(Duration::from_secs(3)),
            Duration::from_secs(30)
        );
        assert_eq!(switchover_deadline(Duration::MAX), Duration::MAX);
    }

    const GIB: f64 = (1u64 << 30) as f64;

    #[test]
    fn remainder_within_the_limit_switches_over() {
        // 10 MiB at 1 GiB/s is ~10 ms, under 300 ms.
        assert_eq!(
            decide(
                1,
                10 << 20,
                10 << 20,
                GIB,
                Duration::ZERO,
                Duration::from_millis(300)
            ),
            Decision::Switchover
        );
        assert_eq!(
            decide(1, 0, 0, 0.0, Duration::ZERO, Duration::ZERO),
            Decision::Switchover
        );
    }

    #[test]
    fn a_shrinking_remainder_gets_another_round_even_within_the_limit() {
        let limit = Duration::from_millis(300);
        // 64 MiB at 1 GiB/s is ~62 ms: within the limit, but down from 256 MiB.
        let remaining = 64 << 20;
        assert_eq!(
            decide(2, remaining, 256 << 20, GIB, Duration::ZERO, limit),
            Decision::AnotherRound
        );
        // Not shrinking by half any more: this is as good as it gets.
        assert_eq!(
            decide(3, remaining, 100 << 20, GIB, Duration::ZERO, limit),
            Decision::Switchover
        );
        // Negligible already, or at the cap: no more rounds.
        assert_eq!(
            decide(3, 1 << 20, 256 << 20, GIB, Duration::ZERO, limit),
            Decision::Switchover
        );
        assert_eq!(
            decide(
                MAX_DIRTY_ROUNDS,
                remaining,
                256 << 20,
                GIB,
                Duration::ZERO,
                limit
            ),
            Decision::Switchover
        );
    }

    #[test]
    fn the_fixed_cost_counts_against_the_limit_but_not_as_shrinkable() {
        let limit = Duration::from_millis(10);
        let cost = SwitchoverCost {
            pause: Duration::from_millis(2),
            sync: Duration::from_millis(1),
            round_trip: Duration::from_millis(2),
        };
        assert_eq!(cost.total(), Duration::from_millis(6));
        // 5 MiB at 1 GiB/s is ~4.9 ms: with the 6 ms the switchover costs, over 10 ms.
        assert_eq!(
            decide(1, 5 << 20, 5 << 20, GIB, cost.total(), limit),
            Decision::AnotherRound
        );
        // 1 MiB (~1 ms) fits beside it, and is negligible whatever the fixed part.
        assert_eq!(
            decide(1, 1 << 20, 64 << 20, GIB, cost.total(), limit),
            Decision::Switchover
        );
    }

    #[test]
    fn a_fixed_cost_over_the_limit_alone_does_not_stop_a_switchover() {
        let limit = Duration::from_millis(1);
        let fixed = Duration::from_millis(5);
        assert_eq!(decide(1, 0, 0, GIB, fixed, limit), Decision::Switchover);
        assert_eq!(
            decide(1, 64 << 10, 64 << 20, GIB, fixed, limit),
            Decision::Switchover
        );
        // What rounds can still shrink, they shrink.
        assert_eq!(
            decide(1, 64 << 20, 256 << 20, GIB, fixed, limit),
            Decision::AnotherRound
        );
    }

    #[test]
    fn remainder_over_the_limit_goes_on_until_the_cap() {
        let limit = Duration::from_millis(1);
        assert_eq!(
            decide(1, 1 << 30, 1 << 30, GIB, Duration::ZERO, limit),
            Decision::AnotherRound
        );
        assert_eq!(
            decide(
                MAX_DIRTY_ROUNDS - 1,
                1 << 30,
                1 << 30,
                GIB,
                Duration::ZERO,
                limit
            ),
            Decision::AnotherRound
        );
        assert_eq!(
            decide(
                MAX_DIRTY_ROUNDS,
                1 << 30,
                1 << 30,
                GIB,
                Duration::ZERO,
                limit
            ),
            Decision::ForcedSwitchover
        );
    }

    #[test]
    fn unknown_bandwidth_never_fits_a_nonempty_remainder() {
        assert_eq!(
            decide(
                1,
                4096,
                4096,
                0.0,
                Duration::ZERO,
                Duration::from_secs(3600)
            ),
            Decision::AnotherRound
        );
        assert_eq!(expected_downtime(4096, f64::NAN), Duration::MAX);
    }

    fn update(downtime: Option<u64>, bandwidth: Option<u64>) -> MigrationParameterUpdate {
        MigrationParameterUpdate {
            downtime_limit_ms: downtime,
            max_bandwidth: bandwidth,
            ..Default::default()
        }
    }

    #[test]
    fn parameters_are_checked() {
        let mut params = MigrationParameters::default();
        assert_eq!(params.downtime_limit_ms, 300);
        params.update(&update(Some(5), Some(1 << 20))).unwrap();
        assert_eq!(
            (params.downtime_limit_ms, params.max_bandwidth),
            (5, 1 << 20)
        );
        assert!(params
            .update(&update(Some(MAX_DOWNTIME_LIMIT_MS + 1), None))
            .is_err());
        assert_eq!(params.downtime_limit_ms, 5);
        let bad = MigrationParameterUpdate {
            max_cpu_throttle: Some(100),
            ..update(Some(7), None)
        };
        assert!(params
            .update(&bad)
            .unwrap_err()
            .contains("max-cpu-throttle"));
        assert_eq!(
            params.downtime_limit_ms, 5,
            "a refused update changes nothing"
        );
        for channels in [0, u64::from(MAX_LANES) + 1] {
            let bad = MigrationParameterUpdate {
                multifd_channels: Some(channels),
                ..update(Some(7), None)
            };
            assert!(params
                .update(&bad)
                .unwrap_err()
                .contains("multifd-channels"));
            assert_eq!(params.downtime_limit_ms, 5);
        }
        let throttle = MigrationParameterUpdate {
            cpu_throttle_initial: Some(30),
            multifd_channels: Some(3),
            ..update(None, None)
        };
        params.update(&throttle).unwrap();
        assert_eq!(
            params.to_json(),
            json!({
                "downtime-limit": 5,
                "max-bandwidth": 1048576,
                "cpu-throttle-initial": 30,
                "cpu-throttle-increment": 10,
                "max-cpu-throttle": 99,
                "convergence-timeout": 0,
                "multifd-channels": 3,
            })
        );
    }

    #[test]
    fn throttle_rises_only_while_the_guest_outruns_the_link() {
        let params = ThrottleParameters::default();
        // Dirtied at most half of what was sent: converging, leave it be.
        assert_eq!(next_throttle(0, 50, 100, params), 0);
        assert_eq!(next_throttle(40, 50, 100, params), 40);
        // Dirtied more: start at the initial value, then step up to the maximum.
        assert_eq!(next_throttle(0, 51, 100, params), 20);
        assert_eq!(next_throttle(20, 100, 100, params), 30);
        assert_eq!(next_throttle(95, 100, 100, params), 99);
        assert_eq!(next_throttle(99, 100, 100, params), 99);
        let low_cap = ThrottleParameters {
            initial: 50,
            increment: 10,
            max: 30,
        };
        assert_eq!(next_throttle(0, 100, 1, low_cap), 30);
    }

    #[test]
    fn convergence_timeout_is_off_by_default_and_counts_whole_seconds() {
        let mut params = MigrationParameters::default();
        assert!(!params.convergence_timed_out(Duration::from_secs(86_400)));
        params
            .update(&MigrationParameterUpdate {
                convergence_timeout_s: Some(5),
                ..Default::default()
            })
            .unwrap();
        assert!(!params.convergence_timed_out(Duration::from_millis(4_999)));
        assert!(params.convergence_timed_out(Duration::from_secs(5)));
        assert_eq!(params.to_json()["convergence-timeout"], 5);
    }
}
