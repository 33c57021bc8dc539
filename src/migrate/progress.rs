//! The state machine of a migration and its counters, as `query-migrate` reports them.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::wire::PageEntry;
use crate::machine::memory::PAGE_SIZE;

/// QEMU's migration states (the subset ferry goes through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStatus {
    None,
    Setup,
    Active,
    Completed,
    Failed,
    /// Spelled `canceled` on the wire, as StratoVirt (the seed of ferry's QMP) spells it.
    Cancelled,
}

impl MigrationStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "canceled",
        }
    }

    /// Whether a migration in this state has ended (or never started).
    pub fn is_finished(self) -> bool {
        !matches!(self, Self::Setup | Self::Active)
    }
}

/// Everything `query-migrate` shows about the current or last migration.
#[derive(Debug, Clone)]
pub struct Progress {
    pub status: MigrationStatus,
    pub started: Option<Instant>,
    pub setup_time: Option<Duration>,
    pub total_time: Option<Duration>,
    pub downtime: Option<Duration>,
    pub expected_downtime: Option<Duration>,
    pub error: Option<String>,
    /// Bytes of guest RAM in all.
    pub ram_total: u64,
    /// Bytes put on the wire so far (page data, page headers and state).
    pub transferred: u64,
    /// Pages known dirty and not sent yet.
    pub remaining_pages: u64,
    /// Zero pages sent as markers.
    pub duplicate: u64,
    /// Pages sent with their data.
    pub normal: u64,
    /// Dirty-log syncs done.
    pub dirty_sync_count: u64,
    /// Pages the guest dirtied per second in the last round.
    pub dirty_pages_rate: u64,
    /// Bandwidth of the last round, in bytes per second.
    pub bandwidth: f64,
    /// How much the vCPUs are held back to let pre-copy converge (auto-converge), in percent.
    pub cpu_throttle_percentage: u8,
}

impl Progress {
    /// Counts a PAGES frame the destination landed (`bytes` on the wire); the bandwidth is the
    /// whole migration's so far.
    pub fn count_landed(&mut self, bytes: u64, entries: &[PageEntry]) {
        let zero = entries.iter().filter(|e| e.zero).count() as u64;
        self.transferred += bytes;
        self.duplicate += zero;
        self.normal += entries.len() as u64 - zero;
        if let Some(started) = self.started {
            self.bandwidth = self.transferred as f64 / started.elapsed().as_secs_f64().max(1e-6);
        }
    }

    pub fn new() -> Self {
        Self {
            status: MigrationStatus::None,
            started: None,
            setup_time: None,
            total_time: None,
            downtime: None,
            expected_downtime: None,
            error: None,
            ram_total: 0,
            transferred: 0,
            remaining_pages: 0,
            duplicate: 0,
            normal: 0,
            dirty_sync_count: 0,
            dirty_pages_rate: 0,
            bandwidth: 0.0,
            cpu_throttle_percentage: 0,
        }
    }

    /// A fresh record for a migration starting now.
    pub fn start(ram_total: u64) -> Self {
        Self {
            status: MigrationStatus::Setup,
            started: Some(Instant::now()),
            ram_total,
            remaining_pages: ram_total / PAGE_SIZE,
            ..Self::new()
        }
    }

    /// The `query-migrate` answer, with QEMU's field names.
    pub fn to_json(&self) -> Value {
        let mut info = Map::new();
        info.insert("status".into(), json!(self.status.name()));
        if self.status == MigrationStatus::None {
            return Value::Object(info);
        }
        let ms = |d: Duration| json!(d.as_millis() as u64);
        let total = self
            .total_time
            .or_else(|| self.started.map(|s| s.elapsed()));
        if let Some(total) = total {
            info.insert("total-time".into(), ms(total));
        }
        if let Some(setup) = self.setup_time {
            info.insert("setup-time".into(), ms(setup));
        }
        if let Some(downtime) = self.downtime {
            info.insert("downtime".into(), json!(downtime_ms(downtime)));
        }
        // Kept once the migration completed (QEMU drops it): the estimate the switchover was
        // decided on, beside the downtime it came to.
        if let Some(expected) = self.expected_downtime {
            // Rounded as the downtime is, so that the two compare.
            let expected = expected.min(Duration::from_secs(1 << 30));
            info.insert("expected-downtime".into(), json!(downtime_ms(expected)));
        }
        if self.cpu_throttle_percentage > 0 {
            info.insert(
                "cpu-throttle-percentage".into(),
                json!(self.cpu_throttle_percentage),
            );
        }
        if let Some(error) = &self.error {
            info.insert("error-desc".into(), json!(error));
        }
        info.insert(
            "ram".into(),
            json!({
                "transferred": self.transferred,
                "remaining": self.remaining_pages * PAGE_SIZE,
                "total": self.ram_total,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal * PAGE_SIZE,
                "mbps": self.bandwidth * 8.0 / 1e6,
                "dirty-sync-count": self.dirty_sync_count,
                "dirty-pages-rate": self.dirty_pages_rate,
                "page-size": PAGE_SIZE,
            }),
        );
        Value::Object(info)
    }

    /// Ends the migration in `status`, freezing the total time.
    pub fn finish(&mut self, status: MigrationStatus, error: Option<String>) {
        self.status = status;
        self.error = error;
        self.total_time = self.started.map(|s| s.elapsed());
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// A downtime as `query-migrate` and the log report it: in whole ms, QEMU's unit, rounded
/// up. What ferry measures runs from where its vCPU threads stop to where they call back into
/// KVM on the destination, and the guest's own clock sees more: the page faults in flight when
/// the pause comes, and KVM's first entry into a restored guest. Against the built-in guest's
/// clock that came to 0.1-0.8 ms more here (0.47 ms on average over 12 vCPUs' switchovers), so a
/// figure rounded to the nearest ms, let alone down, understates what the guest lived through,
/// and an operator holds it against `downtime-limit`.
pub fn downtime_ms(downtime: Duration) -> u64 {
    u64::try_from(downtime.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_migrated_shows_only_the_status() {
        assert_eq!(Progress::new().to_json(), json!({"status": "none"}));
    }

    #[test]
    fn active_shows_qemu_ram_fields() {
        let mut progress = Progress::start(64 << 20);
        progress.status = MigrationStatus::Active;
        progress.normal = 3;
        progress.duplicate = 5;
        progress.expected_downtime = Some(Duration::from_millis(12));
        let info = progress.to_json();
        assert_eq!(info["status"], "active");
        assert_eq!(info["expected-downtime"], 12);
        let ram = &info["ram"];
        for field in [
            "transferred",
            "remaining",
            "total",
            "duplicate",
            "normal",
            "normal-bytes",
            "mbps",
            "dirty-sync-count",
            "dirty-pages-rate",
            "page-size",
        ] {
            assert!(ram.get(field).is_some(), "missing {field}");
        }
        assert_eq!(ram["normal-bytes"], 3 * 4096);
        assert_eq!(ram["total"], 64 << 20);
    }

    #[test]
    fn downtime_is_rounded_up_to_whole_ms() {
        let mut progress = Progress::start(1 << 20);
        for (us, ms) in [(1978, 2), (1001, 2), (1000, 1), (400, 1), (0, 0)] {
            progress.downtime = Some(Duration::from_micros(us));
            assert_eq!(progress.to_json()["downtime"], ms, "{us} µs");
        }
        // An estimate with nothing measured yet is unbounded, not a wrapped small number.
        assert_eq!(downtime_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn a_completed_migration_keeps_the_estimate_beside_the_downtime() {
        let mut progress = Progress::start(1 << 20);
        progress.expected_downtime = Some(Duration::from_millis(3));
        progress.downtime = Some(Duration::from_millis(4));
        progress.finish(MigrationStatus::Completed, None);
        let info = progress.to_json();
        assert_eq!(info["downtime"], 4);
        assert_eq!(info["expected-downtime"], 3);
        // Both round up: an estimate of 0.6 ms is not "0".
        progress.expected_downtime = Some(Duration::from_micros(600));
        assert_eq!(progress.to_json()["expected-downtime"], 1);
    }

    #[test]
    fn failure_carries_its_reason() {
        let mut progress = Progress::start(1 << 20);
        progress.finish(
            MigrationStatus::Failed,
            Some("destination refused: -m differs".into()),
        );
        let info = progress.to_json();
        assert_eq!(info["status"], "failed");
        assert_eq!(info["error-desc"], "destination refused: -m differs");
        assert!(info.get("total-time").is_some());
    }
}
