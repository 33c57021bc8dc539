//! The course of one migration, as `query-migrate` on the source told it every poll.

use serde_json::{json, Value};

use crate::MIB;

/// One `query-migrate` answer, reduced to what the plots and the record need.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Since `migrate` was sent, in ms.
    pub t_ms: f64,
    pub status: String,
    pub dirty_sync_count: u64,
    /// Bytes known dirty and not sent yet.
    pub remaining: u64,
    /// Bytes put on the wire so far.
    pub transferred: u64,
    /// ferry's bandwidth figure: the last finished round's, in megabits per second.
    pub mbps: f64,
    pub cpu_throttle_percentage: u64,
    /// ferry's downtime estimate for what was still dirty after the last round.
    pub expected_downtime_ms: Option<f64>,
}

impl Sample {
    pub fn of(t_ms: f64, info: &Value) -> Self {
        let ram = &info["ram"];
        let count = |key: &str| ram[key].as_u64().unwrap_or(0);
        Self {
            t_ms,
            status: info["status"].as_str().unwrap_or("?").to_owned(),
            dirty_sync_count: count("dirty-sync-count"),
            remaining: count("remaining"),
            transferred: count("transferred"),
            mbps: ram["mbps"].as_f64().unwrap_or(0.0),
            cpu_throttle_percentage: info["cpu-throttle-percentage"].as_u64().unwrap_or(0),
            expected_downtime_ms: info["expected-downtime"].as_f64(),
        }
    }
}

/// Every poll of one migration.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub samples: Vec<Sample>,
}

impl Timeline {
    pub fn push(&mut self, t_ms: f64, info: &Value) {
        self.samples.push(Sample::of(t_ms, info));
    }

    /// (s, MiB) of the dirty bytes not sent yet.
    pub fn remaining_mib(&self) -> Vec<(f64, f64)> {
        self.active()
            .map(|s| (s.t_ms / 1000.0, s.remaining as f64 / MIB))
            .collect()
    }

    /// (s, MiB/s) of ferry's own bandwidth figure (a round's average, known at its end).
    pub fn reported_mib_per_s(&self) -> Vec<(f64, f64)> {
        self.active()
            .map(|s| (s.t_ms / 1000.0, s.mbps * 1e6 / 8.0 / MIB))
            .collect()
    }

    /// (s, MiB/s) of the bytes sent over the last `window_ms` at each poll: the throughput as
    /// it happened.
    pub fn measured_mib_per_s(&self, window_ms: f64) -> Vec<(f64, f64)> {
        let samples: Vec<&Sample> = self.active().collect();
        let mut points = Vec::new();
        let mut from = 0;
        for (index, sample) in samples.iter().enumerate().skip(1) {
            while from + 1 < index && sample.t_ms - samples[from + 1].t_ms >= window_ms {
                from += 1;
            }
            let earlier = samples[from];
            let seconds = (sample.t_ms - earlier.t_ms) / 1000.0;
            if seconds > 0.0 {
                let bytes = sample.transferred.saturating_sub(earlier.transferred) as f64;
                points.push((sample.t_ms / 1000.0, bytes / MIB / seconds));
            }
        }
        points
    }

    /// Seconds at which each round after the first began (where `dirty-sync-count` grew).
    pub fn round_starts(&self) -> Vec<f64> {
        self.samples
            .windows(2)
            .filter(|pair| pair[1].dirty_sync_count > pair[0].dirty_sync_count.max(1))
            .map(|pair| pair[1].t_ms / 1000.0)
            .collect()
    }

    /// The last downtime estimate seen before the switchover: what ferry expected when it
    /// decided to switch over, unless the deciding round ended between two polls.
    pub fn last_expected_downtime_ms(&self) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| s.status == "active")
            .filter_map(|s| s.expected_downtime_ms)
            .next_back()
    }

    /// The polls while the migration ran (and the one that saw it end).
    fn active(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.status != "none")
    }

    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                json!([
                    s.t_ms.round() as u64,
                    s.status,
                    s.dirty_sync_count,
                    s.remaining,
                    s.transferred,
                    (s.mbps * 10.0).round() / 10.0,
                    s.cpu_throttle_percentage,
                    s.expected_downtime_ms,
                ])
            })
            .collect();
        json!({
            "columns": [
                "t_ms",
                "status",
                "dirty_sync_count",
                "remaining",
                "transferred",
                "mbps",
                "cpu_throttle_percentage",
                "expected_downtime_ms",
            ],
            "rows": rows,
        })
    }
}
