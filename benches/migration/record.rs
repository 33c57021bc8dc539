//! What one migration run measured, and the figures the tables show.

use ferry::guest::PlacedGap;
use serde_json::{json, Value};

use crate::memory::Side;
use crate::raw::Raw;
use crate::report::decimals;
use crate::timeline::Timeline;
use crate::{guest, memory, CONVERGED_BELOW_ROUNDS, GIB, MIB};

/// One migration of a case: what `query-migrate` said at the end, and what the bench saw.
#[derive(Debug, Default)]
pub(crate) struct Run {
    pub(crate) run: usize,
    /// `completed`, `failed`, `canceled`, `timeout` (cancelled at the bench's deadline),
    /// `destination-failed`, `unsupported` (the guest lacks the workload's option) or `error`
    /// (the bench could not run it).
    pub(crate) status: String,
    pub(crate) error: Option<String>,
    /// The source's last `query-migrate` answer.
    pub(crate) info: Option<Value>,
    /// The destination's `query-migrate` status and `query-status` afterwards.
    pub(crate) destination_status: Option<String>,
    /// From `migrate` to the answer that showed the end, as the bench saw it.
    pub(crate) observed_ms: Option<u64>,
    /// The host's 1-minute load average just before `migrate` (this benchmark's VMs included).
    pub(crate) load_before: Option<f64>,
    /// Cores' worth of CPU time that processes other than this benchmark and its two VMs used
    /// during the migration: other work on the host that the figures compete with.
    pub(crate) other_cores: Option<f64>,
    /// The source's `query-migrate`, every [`POLL`].
    pub(crate) timeline: Timeline,
    /// Both processes' resident memory during the migration.
    pub(crate) memory: Option<memory::Trace>,
    /// The downtime as the source measured it, in µs, before `query-migrate` rounds it up to
    /// whole ms (from its log's `migration completed` line).
    pub(crate) measured_downtime_us: Option<u64>,
    /// What the destination's prefault thread backed of its RAM, and in how long (none with
    /// `-mem-prealloc`, or with no page to land).
    pub(crate) destination_backing: Option<Backing>,
    /// The longest blackout a vCPU of the guest measured across the switchover, in µs
    /// (`guest::blackout_us`); `None` if not measured.
    pub(crate) blackout_us: Option<u64>,
    /// The destination's `gap` reports, as far as the bench read them (until it knew the
    /// blackout).
    pub(crate) destination_gaps: Vec<PlacedGap>,
    /// The source guest's `gap` reports during the migration: its vCPUs stalled (held back by
    /// auto-converge, by the dirty log, or by the host).
    pub(crate) source_gaps: Vec<PlacedGap>,
    /// The case's `max-bandwidth` (bytes/s), if it sets one.
    pub(crate) max_bandwidth: Option<u64>,
}

/// The destination's guest RAM backed ahead of the pages during round 0. Fresh memory backs at
/// very different speeds on a host that hands its free memory back to a hypervisor (as the host
/// ferry was written on does, about a second after a free): this tells a run that landed its
/// pages in cold memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backing {
    pub(crate) backed_mib: u64,
    /// All the destination would have backed, had round 0 not ended first.
    pub(crate) wanted_mib: u64,
    pub(crate) ms: u64,
}

impl Backing {
    fn gib_per_s(self) -> Option<f64> {
        (self.ms > 0).then(|| self.backed_mib as f64 / 1024.0 / (self.ms as f64 / 1000.0))
    }
}

/// The figures of a run the tables show, by key.
pub(crate) const FIGURES: [(&str, &str); 19] = [
    ("total_ms", "total time (ms)"),
    ("setup_ms", "setup time (ms)"),
    ("downtime_ms", "downtime (ms)"),
    (
        "measured_downtime_ms",
        "downtime as measured, before rounding up (ms)",
    ),
    (
        "expected_downtime_ms",
        "expected-downtime at the switchover (ms)",
    ),
    ("guest_blackout_ms", "blackout the guest saw (ms)"),
    ("downtime_error_ms", "downtime - the guest's blackout (ms)"),
    ("transferred_mib", "RAM transferred (MiB)"),
    ("ram_gib_per_s", "RAM total / total time (GiB/s)"),
    ("transferred_gib_per_s", "transferred / total time (GiB/s)"),
    ("ram_pct_of_raw", "RAM total / time, % of raw"),
    ("transferred_pct_of_raw", "transferred / time, % of raw"),
    (
        "transferred_pct_of_fresh_raw",
        "transferred / time, % of raw into fresh memory",
    ),
    ("rounds", "rounds (dirty-sync-count)"),
    (
        "pct_of_max_bandwidth",
        "transferred / (total - setup), % of max-bandwidth",
    ),
    ("source_overhead_mib", "source VMM overhead, peak (MiB)"),
    (
        "destination_overhead_mib",
        "destination VMM overhead, peak (MiB)",
    ),
    ("other_cpu_cores", "other processes' CPU (cores)"),
    (
        "destination_backing_gib_per_s",
        "destination RAM backed ahead (GiB/s)",
    ),
];

impl Run {
    pub(crate) fn failed(run: usize, error: String) -> Self {
        Self {
            run,
            status: "error".into(),
            error: Some(error),
            ..Self::default()
        }
    }

    pub(crate) fn completed(&self) -> bool {
        self.status == "completed"
    }

    pub(crate) fn unsupported(&self) -> bool {
        self.status == "unsupported"
    }

    /// Completed within ferry's round cap, without a forced switchover.
    pub(crate) fn converged(&self) -> bool {
        self.completed()
            && self
                .field(&["ram", "dirty-sync-count"])
                .is_some_and(|rounds| rounds < CONVERGED_BELOW_ROUNDS)
    }

    /// A value of the last `query-migrate` answer, by its path.
    fn value(&self, path: &[&str]) -> Option<&Value> {
        path.iter()
            .try_fold(self.info.as_ref()?, |value, key| value.get(key))
    }

    fn field(&self, path: &[&str]) -> Option<f64> {
        self.value(path)?.as_f64()
    }

    pub(crate) fn count(&self, path: &[&str]) -> Option<u64> {
        self.value(path)?.as_u64()
    }

    pub(crate) fn overhead_mib(&self, side: Side) -> Option<f64> {
        Some(self.memory.as_ref()?.peak_overhead(side)? as f64 / MIB)
    }

    /// One of [`FIGURES`]; the shares are of `raw` (GiB/s of the same transport).
    pub(crate) fn figure(&self, key: &str, raw: Raw) -> Option<f64> {
        match key {
            "other_cpu_cores" => return self.other_cores,
            "destination_backing_gib_per_s" => return self.destination_backing?.gib_per_s(),
            "measured_downtime_ms" => return Some(self.measured_downtime_us? as f64 / 1000.0),
            "guest_blackout_ms" => return Some(self.blackout_us? as f64 / 1000.0),
            "downtime_error_ms" => {
                return Some(self.field(&["downtime"])? - self.blackout_us? as f64 / 1000.0)
            }
            // The completed answer keeps the estimate the switchover was decided on; the polls
            // may have missed the last rounds.
            "expected_downtime_ms" => {
                return self
                    .field(&["expected-downtime"])
                    .or_else(|| self.timeline.last_expected_downtime_ms())
            }
            "source_overhead_mib" => return self.overhead_mib(Side::Source),
            "destination_overhead_mib" => return self.overhead_mib(Side::Destination),
            _ => {}
        }
        let seconds = self.field(&["total-time"])? / 1000.0;
        let per_second = |bytes: f64| (seconds > 0.0).then(|| bytes / GIB / seconds);
        let ram = || per_second(self.field(&["ram", "total"])?);
        let sent = || per_second(self.field(&["ram", "transferred"])?);
        let share = |rate: Option<f64>| Some(rate? / raw.socket? * 100.0);
        match key {
            "total_ms" => self.field(&["total-time"]),
            "setup_ms" => self.field(&["setup-time"]),
            "downtime_ms" => self.field(&["downtime"]),
            "transferred_mib" => Some(self.field(&["ram", "transferred"])? / MIB),
            "ram_gib_per_s" => ram(),
            "transferred_gib_per_s" => sent(),
            "ram_pct_of_raw" => share(ram()),
            "transferred_pct_of_raw" => share(sent()),
            "transferred_pct_of_fresh_raw" => Some(sent()? / raw.fresh? * 100.0),
            "rounds" => self.field(&["ram", "dirty-sync-count"]),
            "pct_of_max_bandwidth" => {
                let moving = seconds - self.field(&["setup-time"])? / 1000.0;
                let cap = self.max_bandwidth? as f64;
                let sent = self.field(&["ram", "transferred"])?;
                (moving > 0.0).then(|| sent / moving / cap * 100.0)
            }
            _ => unreachable!("unknown figure {key}"),
        }
    }

    pub(crate) fn to_json(&self, raw: Raw) -> Value {
        let gaps = |gaps: &[PlacedGap]| gaps.iter().map(guest::gap_json).collect::<Vec<_>>();
        let mut record = json!({
            "run": self.run,
            "status": self.status,
            "completed": self.completed(),
            "converged": self.converged(),
            "error": self.error,
            "destination_status": self.destination_status,
            "observed_ms": self.observed_ms,
            "load_before": self.load_before,
            "other_cpu_cores": self.other_cores,
            "ram_total": self.count(&["ram", "total"]),
            "transferred": self.count(&["ram", "transferred"]),
            "normal_pages": self.count(&["ram", "normal"]),
            "duplicate_pages": self.count(&["ram", "duplicate"]),
            "dirty_sync_count": self.count(&["ram", "dirty-sync-count"]),
            "guest_blackout_us": self.blackout_us,
            "destination_backing": self.destination_backing.map(|b| json!({
                "backed_mib": b.backed_mib,
                "wanted_mib": b.wanted_mib,
                "ms": b.ms,
            })),
            "destination_gaps": gaps(&self.destination_gaps),
            "source_gaps_during_migration": gaps(&self.source_gaps),
            "query_migrate": self.info,
            "timeline": self.timeline.to_json(),
            "memory": self.memory.as_ref().map(memory::Trace::to_json),
        });
        for (key, _) in FIGURES {
            record[key] = json!(self.figure(key, raw));
        }
        record
    }

    pub(crate) fn one_line(&self, raw: Raw) -> String {
        if let Some(error) = &self.error {
            let first = error.lines().next().unwrap_or_default();
            return format!("{}: {first}", self.status);
        }
        let show = |key: &str| {
            let decimals = decimals(key);
            self.figure(key, raw)
                .map_or("-".into(), |v| format!("{v:.decimals$}"))
        };
        format!(
            "{:<9} total {} ms, setup {} ms, downtime {} ms ({} ms measured, expected {} ms, guest \
             saw {} ms), \
             sent {} MiB ({} GiB/s, {}% of raw, {}% of raw into fresh memory{}), {} rounds{}; \
             VMM overhead {} MiB source, {} \
             MiB destination; other processes used {} cores{}",
            self.status,
            show("total_ms"),
            show("setup_ms"),
            show("downtime_ms"),
            show("measured_downtime_ms"),
            show("expected_downtime_ms"),
            show("guest_blackout_ms"),
            show("transferred_mib"),
            show("transferred_gib_per_s"),
            show("transferred_pct_of_raw"),
            show("transferred_pct_of_fresh_raw"),
            match self.max_bandwidth {
                Some(cap) => format!(
                    ", {}% of max-bandwidth {} MiB/s",
                    show("pct_of_max_bandwidth"),
                    cap >> 20
                ),
                None => String::new(),
            },
            show("rounds"),
            if self.converged() {
                ""
            } else {
                " (not converged)"
            },
            show("source_overhead_mib"),
            show("destination_overhead_mib"),
            show("other_cpu_cores"),
            match self.destination_backing {
                Some(b) => format!(
                    "; destination backed {} of {} MiB ahead in {} ms ({} GiB/s)",
                    b.backed_mib,
                    b.wanted_mib,
                    b.ms,
                    show("destination_backing_gib_per_s")
                ),
                None => String::new(),
            },
        )
    }
}
