//! Migration parameters (`migrate-set-parameters`) and the pre-copy convergence decision.

use std::time::Duration;

use serde_json::{json, Value};

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
}

impl Default for MigrationParameters {
    fn default() -> Self {
        Self {
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            max_bandwidth: 0,
        }
    }
}

impl MigrationParameters {
    /// The `query-migrate-parameters` answer, with QEMU's names.
    pub fn to_json(self) -> Value {
        json!({
            "downtime-limit": self.downtime_limit_ms,
            "max-bandwidth": self.max_bandwidth,
        })
    }

    /// Applies `migrate-set-parameters`, refusing values QEMU refuses.
    pub fn update(
        &mut self,
        downtime_limit_ms: Option<u64>,
        max_bandwidth: Option<u64>,
    ) -> Result<(), String> {
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

/// Decides, after dirty round `round` (1 for the first dirty round), whether `remaining_bytes`
/// can be sent within the downtime limit at `bandwidth` bytes per second.
pub fn decide(
    round: u32,
    remaining_bytes: u64,
    bandwidth: f64,
    downtime_limit: Duration,
) -> Decision {
    if expected_downtime(remaining_bytes, bandwidth) <= downtime_limit {
        Decision::Switchover
    } else if round >= MAX_DIRTY_ROUNDS {
        Decision::ForcedSwitchover
    } else {
        Decision::AnotherRound
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

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: f64 = (1u64 << 30) as f64;

    #[test]
    fn remainder_within_the_limit_switches_over() {
        // 10 MiB at 1 GiB/s is ~10 ms, under 300 ms.
        assert_eq!(
            decide(1, 10 << 20, GIB, Duration::from_millis(300)),
            Decision::Switchover
        );
        assert_eq!(decide(1, 0, 0.0, Duration::ZERO), Decision::Switchover);
    }

    #[test]
    fn remainder_over_the_limit_goes_on_until_the_cap() {
        let limit = Duration::from_millis(1);
        assert_eq!(decide(1, 1 << 30, GIB, limit), Decision::AnotherRound);
        assert_eq!(
            decide(MAX_DIRTY_ROUNDS - 1, 1 << 30, GIB, limit),
            Decision::AnotherRound
        );
        assert_eq!(
            decide(MAX_DIRTY_ROUNDS, 1 << 30, GIB, limit),
            Decision::ForcedSwitchover
        );
    }

    #[test]
    fn unknown_bandwidth_never_fits_a_nonempty_remainder() {
        assert_eq!(
            decide(1, 4096, 0.0, Duration::from_secs(3600)),
            Decision::AnotherRound
        );
        assert_eq!(expected_downtime(4096, f64::NAN), Duration::MAX);
    }

    #[test]
    fn parameters_are_checked() {
        let mut params = MigrationParameters::default();
        assert_eq!(params.downtime_limit_ms, 300);
        params.update(Some(5), Some(1 << 20)).unwrap();
        assert_eq!(
            params,
            MigrationParameters {
                downtime_limit_ms: 5,
                max_bandwidth: 1 << 20
            }
        );
        assert!(params
            .update(Some(MAX_DOWNTIME_LIMIT_MS + 1), None)
            .is_err());
        assert_eq!(params.downtime_limit_ms, 5);
        assert_eq!(
            params.to_json(),
            json!({"downtime-limit": 5, "max-bandwidth": 1048576})
        );
    }
}
