//! The results of a case: per-run lines, tables, plots, the summary and the result file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferry::guest::PlacedGap;
use serde_json::{json, Value};

use crate::cancel::CancelResult;
use crate::case::{Case, Options, Transport};
use crate::memory::Side;
use crate::probe::load_average;
use crate::raw::{Raw, RawFigures};
use crate::record::{Run, FIGURES};
use crate::stats::{stats_json, Stats};
use crate::{blackout_ms, plot, CONVERGED_BELOW_ROUNDS, CPUS};

pub(crate) struct CaseResult {
    pub(crate) case: Case,
    pub(crate) runs: Vec<Run>,
    pub(crate) raw: Raw,
    /// The plot of the runs, if one was drawn.
    pub(crate) plot: Option<PathBuf>,
}

impl CaseResult {
    pub(crate) fn completed(&self) -> usize {
        self.runs.iter().filter(|r| r.completed()).count()
    }

    pub(crate) fn converged(&self) -> usize {
        self.runs.iter().filter(|r| r.converged()).count()
    }

    pub(crate) fn unsupported(&self) -> bool {
        self.runs.iter().any(Run::unsupported)
    }

    /// Every run completed, or the guest cannot run the case.
    pub(crate) fn ok(&self) -> bool {
        self.unsupported() || self.completed() == self.runs.len()
    }

    fn done(&self) -> String {
        if self.unsupported() {
            "n/a".into()
        } else {
            format!("{}/{}", self.completed(), self.runs.len())
        }
    }

    /// How many completed runs reported a downtime within max(1 ms, 10 %) of the blackout
    /// their guest measured, of those where the guest measured one; none where the vCPUs halt
    /// (their timer's lateness is all they measure, not the blackout).
    fn downtimes_close_to_blackout(&self) -> (usize, usize) {
        let sweeps = self.case.workload.sweeps();
        let runs = self.runs.iter().filter(|r| sweeps && r.completed());
        let pairs: Vec<(f64, f64)> = runs
            .filter_map(|r| {
                let error = r.figure("downtime_error_ms", self.raw)?;
                Some((error, r.figure("guest_blackout_ms", self.raw)?))
            })
            .collect();
        let close = pairs
            .iter()
            .filter(|(error, blackout)| error.abs() <= (blackout * 0.1).max(1.0))
            .count();
        (close, pairs.len())
    }

    pub(crate) fn stats(&self, key: &str) -> Option<Stats> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.completed())
            .filter_map(|r| r.figure(key, self.raw))
            .collect();
        Stats::of(&values)
    }

    pub(crate) fn print(&self, cancel: Option<&CancelResult>) {
        println!(
            "{}  (-smp {CPUS}, -append \"{}\"): {} completed, {} converged",
            self.case.label(),
            self.case.workload.append(),
            self.done(),
            self.converged(),
        );
        if self.unsupported() {
            println!();
            return;
        }
        println!("  {:<40} {:>10} {:>10} {:>10}", "", "median", "min", "max");
        let row = |label: &str, decimals: usize, stats: Option<Stats>| match stats {
            Some(s) => println!(
                "  {label:<40} {:>10.decimals$} {:>10.decimals$} {:>10.decimals$}",
                s.median, s.min, s.max
            ),
            None => println!("  {label:<40} {:>10} {:>10} {:>10}", "-", "-", "-"),
        };
        for (key, label) in FIGURES {
            let label = if key.contains("_pct_of_") && key.ends_with("raw") {
                label.replace("raw", &format!("raw {}", self.case.transport.name()))
            } else {
                label.to_owned()
            };
            row(&label, decimals(key), self.stats(key));
            if key == "downtime_error_ms" {
                let (close, compared) = self.downtimes_close_to_blackout();
                if compared > 0 {
                    println!(
                        "    (within max(1 ms, 10%) of the guest's blackout: {close} of {compared} \
                         runs; downtime is in whole ms, rounded up)"
                    );
                }
            }
        }
        if let Some(cancel) = cancel {
            row(
                &format!(
                    "migrate_cancel latency, {} (ms)",
                    self.case.transport.name()
                ),
                1,
                cancel.latency(),
            );
        }
        if let Some(plot) = &self.plot {
            println!("  plot: {}", plot.display());
        }
        println!();
    }

    pub(crate) fn to_json(&self, raw: &[RawFigures], cancel: Option<&CancelResult>) -> Value {
        let mut summary = serde_json::Map::new();
        for (key, _) in FIGURES {
            summary.insert(key.into(), stats_json(self.stats(key)));
        }
        summary.insert(
            "migrate_cancel_latency_ms".into(),
            stats_json(cancel.and_then(CancelResult::latency)),
        );
        let raw_figures = raw
            .iter()
            .find(|r| r.transport == self.case.transport)
            .map(RawFigures::to_json);
        json!({
            "case": self.case.name(),
            "transport": self.case.transport.name(),
            "workload": self.case.workload.name(),
            "guest": {
                "mem_mib": self.case.mem_mib,
                "smp": CPUS,
                "append": self.case.workload.append(),
            },
            "unsupported": self.unsupported(),
            "runs": self.runs.len(),
            "completed_runs": self.completed(),
            "converged_runs": self.converged(),
            "raw_gib_per_s": self.raw.socket,
            "fresh_raw_gib_per_s": self.raw.fresh,
            "raw": raw_figures,
            "plot": self.plot,
            "summary": Value::Object(summary),
            "results": self.runs.iter().map(|r| r.to_json(self.raw)).collect::<Vec<_>>(),
        })
    }

    /// Draws the runs' remaining dirty bytes, bandwidth and memory overhead over time.
    pub(crate) fn draw(&self, path: &Path) -> anyhow::Result<()> {
        let mut remaining = Vec::new();
        let mut bandwidth = Vec::new();
        let mut overhead = Vec::new();
        let mut stalls = Vec::new();
        for (index, run) in self.runs.iter().enumerate() {
            if run.timeline.samples.is_empty() {
                continue;
            }
            let color = plot::PALETTE[index % plot::PALETTE.len()];
            let marks = run.timeline.round_starts();
            let name = format!("run {}", run.run);
            let rounds = run
                .count(&["ram", "dirty-sync-count"])
                .map_or("?".into(), |r| r.to_string());
            remaining.push(plot::Line {
                marks: marks.clone(),
                ..plot::Line::new(
                    format!("{name}: {rounds} rounds"),
                    color,
                    run.timeline.remaining_mib(),
                )
            });
            bandwidth.push(plot::Line {
                marks: marks.clone(),
                ..plot::Line::new(
                    format!("{name} sent, 100 ms"),
                    color,
                    run.timeline.measured_mib_per_s(100.0),
                )
            });
            bandwidth.push(plot::Line {
                width: 1,
                ..plot::Line::new(
                    format!("{name} ferry mbps"),
                    plot::light(color),
                    run.timeline.reported_mib_per_s(),
                )
            });
            // The source's side in the run's colour, the destination's in its light shade.
            let sides = |source, destination| {
                [
                    plot::Line::new(format!("{name} source"), color, source),
                    plot::Line::new(
                        format!("{name} destination"),
                        plot::light(color),
                        destination,
                    ),
                ]
            };
            let bars = |gaps: &[PlacedGap]| {
                gaps.iter()
                    .map(|g| (g.end_ms / 1000.0, g.us as f64 / 1000.0))
                    .collect::<Vec<_>>()
            };
            let gaps = sides(bars(&run.source_gaps), bars(&run.destination_gaps));
            stalls.extend(gaps.map(|line| plot::Line { bars: true, ..line }));
            if let Some(memory) = &run.memory {
                overhead.extend(sides(
                    memory.overhead_mib(Side::Source),
                    memory.overhead_mib(Side::Destination),
                ));
            }
        }
        if remaining.is_empty() {
            bail!("no run has a timeline");
        }
        let panels = [
            plot::Panel {
                title: "remaining dirty (MiB)".into(),
                lines: remaining,
            },
            plot::Panel {
                title: "bandwidth (MiB/s)".into(),
                lines: bandwidth,
            },
            plot::Panel {
                title: "VMM overhead (MiB)".into(),
                lines: overhead,
            },
            plot::Panel {
                title: format!("guest stalls over {} ms (ms)", blackout_ms()),
                lines: stalls,
            },
        ];
        let title = format!(
            "{}: {} GiB, -append {}",
            self.case.name(),
            self.case.mem_mib >> 10,
            self.case.workload.append()
        );
        plot::draw(
            path,
            &title,
            "time since migrate (s), stalls where they ended. ticks under the plots: a \
             pre-copy round begins",
            &panels,
        )
    }
}

pub(crate) fn decimals(key: &str) -> usize {
    match key {
        "transferred_mib"
        | "ram_pct_of_raw"
        | "transferred_pct_of_raw"
        | "transferred_pct_of_fresh_raw"
        | "guest_blackout_ms"
        | "downtime_error_ms"
        | "source_overhead_mib"
        | "destination_overhead_mib"
        | "pct_of_max_bandwidth"
        | "destination_backing_gib_per_s" => 1,
        "ram_gib_per_s" | "transferred_gib_per_s" => 3,
        "measured_downtime_ms" | "other_cpu_cores" => 2,
        _ => 0,
    }
}

pub(crate) fn print_summary(results: &[CaseResult], cancels: &[CancelResult]) {
    println!("== summary (medians of the completed runs)");
    let header = |cells: [&str; 17]| {
        println!(
            "{:<29} {:>5} {:>4} {:>7} {:>5} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>6} {:>6} \
             {:>6} {:>6} {:>6} {:>6}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9],
            cells[10],
            cells[11],
            cells[12],
            cells[13],
            cells[14],
            cells[15],
            cells[16]
        );
    };
    header([
        "case", "done", "conv", "total", "setup", "downtime", "blackout", "sent", "RAM/t", "% raw",
        "sent/t", "% raw", "rounds", "src", "dst", "cancel", "others",
    ]);
    header([
        "", "", "", "ms", "ms", "ms", "guest ms", "MiB", "GiB/s", "", "GiB/s", "", "", "MiB",
        "MiB", "ms", "cores",
    ]);
    for result in results {
        let cell = |key: &str| {
            let decimals = decimals(key);
            result
                .stats(key)
                .map_or("-".into(), |s| format!("{:.decimals$}", s.median))
        };
        let cancel = cancels
            .iter()
            .find(|c| c.transport == result.case.transport)
            .and_then(CancelResult::latency)
            .map_or("-".into(), |s| format!("{:.1}", s.median));
        let converged = if result.unsupported() {
            "-".into()
        } else {
            result.converged().to_string()
        };
        header([
            &result.case.label(),
            &result.done(),
            &converged,
            &cell("total_ms"),
            &cell("setup_ms"),
            &cell("downtime_ms"),
            &cell("guest_blackout_ms"),
            &cell("transferred_mib"),
            &cell("ram_gib_per_s"),
            &cell("ram_pct_of_raw"),
            &cell("transferred_gib_per_s"),
            &cell("transferred_pct_of_raw"),
            &cell("rounds"),
            &cell("source_overhead_mib"),
            &cell("destination_overhead_mib"),
            &cancel,
            &cell("other_cpu_cores"),
        ]);
    }
    println!(
        "(conv: runs that completed in fewer than {CONVERGED_BELOW_ROUNDS} rounds; blackout: as \
         the guest measured it (halted vCPUs: how late their timer came); src/dst: peak VMM \
         overhead beyond guest RAM; cancel: migrate_cancel latency of the transport's cancel \
         runs; n/a: the guest lacks the workload's option)"
    );
    println!();
}

pub(crate) fn write_results(
    options: &Options,
    binary: &Path,
    raw: &[RawFigures],
    cancels: &[CancelResult],
    results: &[CaseResult],
) -> anyhow::Result<()> {
    let cancel_of = |transport: Transport| cancels.iter().find(|c| c.transport == transport);
    let record = json!({
        "benchmark": "ferry live migration",
        "ferry_version": env!("CARGO_PKG_VERSION"),
        "ferry_binary": binary,
        "host": {
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "load_average": load_average(),
        },
        "quick": options.quick,
        "runs_per_case": options.runs,
        "blackout_threshold_ms": blackout_ms(),
        "raw": raw.iter().map(RawFigures::to_json).collect::<Vec<_>>(),
        "cancel": cancels.iter().map(CancelResult::to_json).collect::<Vec<_>>(),
        "cases": results
            .iter()
            .map(|r| r.to_json(raw, cancel_of(r.case.transport)))
            .collect::<Vec<_>>(),
    });
    if let Some(dir) = options.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&record)?;
    std::fs::write(&options.out, text + "\n")
        .with_context(|| format!("writing {}", options.out.display()))?;
    Ok(())
}
