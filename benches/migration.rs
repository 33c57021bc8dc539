//! Live-migration benchmark: the raw throughput of the two transports (TCP over 127.0.0.1 and
//! a UNIX socket pair), then ferry migrating the built-in guest over each of them at 1 GiB and
//! 4 GiB with several workloads, and the latency of `migrate_cancel`.
//!
//! ```sh
//! cargo bench --bench migration                 # every case, FERRY_BENCH_RUNS times (3)
//! cargo bench --bench migration -- --quick      # idle and sweep at 1 GiB, and the cancel, once
//! cargo bench --bench migration -- sweep unix   # only the cases whose names contain a word
//! ```
//!
//! The workloads (the guest's `-append`, see `src/guest/mod.rs`):
//!
//! | name | guest | what it shows |
//! |---|---|---|
//! | `idle` | `ferry.run=tick ferry.idle=hlt`: vCPUs halted between ticks | pages the guest never touched go as zero runs |
//! | `sweep` | the default: both vCPUs dirty every page as fast as they can | the worst case: convergence, auto-converge |
//! | `fill50` | `ferry.run=tick ferry.idle=hlt ferry.fill=50`: half of RAM non-zero, then nothing changes, vCPUs halted | one round of real data |
//! | `dirty100`, `dirty1000` | `ferry.dirty_mbps=N`: the sweep paced to N MiB/s | a guest that writes at a known rate (1 GiB only) |
//!
//! A case named `...-cap256m` is `fill50` at 1 GiB with `max-bandwidth` set to 256 MiB/s: its
//! bytes sent over the time after setup, as a share of the cap, shows whether the cap holds.
//! A case named `...-1conn` is `fill50` with the `multifd` capability off: every page goes over
//! the control connection, where by default they travel over `multifd-channels` (2) connections
//! of their own. A case named `...-prealloc` is `fill50` with the destination started with
//! `-mem-prealloc`: its RAM is backed before the migration starts, as the raw figures' reader
//! has its buffer, so the figure is the transfer's alone; everywhere else the destination backs
//! RAM as pages arrive.
//!
//! A guest that does not know a workload's option (it prints `warning: unknown option`) makes
//! its case `unsupported`, which is reported and skipped, not failed. Every guest also gets
//! `ferry.blackout=MS` (`$FERRY_BENCH_BLACKOUT_MS`, 5 by default) and reports its longest stall
//! (TSC gap) on each CPU, and apart from those, whatever its length, the gap across which
//! ferry stopped the CPU (KVM's clock tells the guest). `$FERRY_BENCH_LOGS=DIR` keeps each VM's log and serial output there.
//!
//! For each case it prints the total time, setup time and downtime that `query-migrate`
//! reports (and the downtime in µs before rounding, from the source's log), the
//! `expected-downtime` the switchover was decided on, the blackout the
//! guest measured (each vCPU's first `gap ... stopped` report on the destination, the longest;
//! a vCPU halted through the switchover can only say how late its timer came) and how far the
//! downtime is from it (compared where the vCPUs run through the switchover), the bytes sent, the effective bandwidth (guest RAM / total time
//! and bytes sent / total time) next to the raw figures of the same transport, the number of
//! rounds (`dirty-sync-count`) and whether the migration converged (completed with fewer than
//! 30), the peak memory each ferry process used beyond its guest's RAM while migrating (from
//! `/proc/PID/smaps`, see `migration/memory.rs`), as the median, minimum and maximum of the
//! runs. The raw figures are the median of at least five runs; beside them, the same socket
//! with the reader landing the bytes in memory it never touched, on transparent huge pages as
//! guest RAM is (one run per case run): a destination's guest RAM is such memory, and on this
//! host (a VM whose freed memory goes back to its own host) backing it costs more than the copy. It is a reference, not a ceiling:
//! ferry's destination backs RAM on a thread of its own while it receives. Next to every figure it prints how
//! many cores' worth of CPU other processes took meanwhile: the host has two cores, and other
//! work on it skews the results.
//!
//! `migrate_cancel` is timed in runs of its own, per transport (`migration/cancel.rs`): from
//! the command to the source saying `canceled` and its guest ticking again.
//!
//! Output, in `target/ferry-bench/` (or the directory of `$FERRY_BENCH_OUT`):
//! `migration.json` (or `$FERRY_BENCH_OUT`) with one record per case, every run's
//! `query-migrate` polled every 20 ms and its memory samples; and `CASE.png` per case: the dirty
//! bytes not yet sent, the bandwidth and ferry's memory overhead over time, one colour per run.
//!
//! Both VMs quit after every run. The destination runs the guest once migrated (no `-S`: until
//! the commit its vCPUs do not run either way), so the guest can report its blackout. Every wait
//! is bounded, and a run that goes wrong (a timeout, a harness panic) is recorded as such and
//! its processes are killed. The exit status is 1 if a migration did not complete or a cancel
//! left the source without its guest, or the result file lacks a figure a run should have
//! (`migration/check.rs`; CI runs the quick mode for this), 0 otherwise.
#![expect(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

#[path = "migration/cancel.rs"]
mod cancel;
#[path = "migration/case.rs"]
mod case;
#[path = "migration/check.rs"]
mod check;
#[path = "migration/font.rs"]
mod font;
#[path = "migration/guest.rs"]
mod guest;
#[path = "migration/memory.rs"]
mod memory;
#[path = "migration/migrate.rs"]
mod migrate;
#[path = "migration/plot.rs"]
mod plot;
#[path = "migration/probe.rs"]
mod probe;
#[path = "migration/raw.rs"]
mod raw;
#[path = "migration/record.rs"]
mod record;
#[path = "migration/report.rs"]
mod report;
#[path = "migration/stats.rs"]
mod stats;
#[path = "migration/timeline.rs"]
mod timeline;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cancel::{CancelResult, CancelRun};
use crate::case::{Case, Options, Transport};
use crate::migrate::migrate_once;
use crate::probe::load_average;
use crate::raw::{raw_section, RawFigures};
use crate::record::Run;
use crate::report::{print_summary, write_results, CaseResult};

const CPUS: u32 = 2;

/// The guest reports stalls (TSC gaps) longer than this many ms: `$FERRY_BENCH_BLACKOUT_MS`, 5
/// by default. A lower threshold shows more of the host's preemptions. (The blackout of a
/// migration is reported whatever its length.)
fn blackout_ms() -> u64 {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MS.get_or_init(|| {
        std::env::var("FERRY_BENCH_BLACKOUT_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .filter(|ms| *ms > 0)
            .unwrap_or(5)
    })
}

/// ferry's cap on dirty rounds: a migration that completes with this many syncs or more was
/// switched over by force, beyond its downtime limit.
const CONVERGED_BELOW_ROUNDS: f64 = 30.0;
const POLL: Duration = Duration::from_millis(20);
const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".into())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("migration bench: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a closure that may panic (the harness panics when a wait times out).
fn guarded<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("{error:#}")),
        Err(payload) => Err(panic_message(payload.as_ref())),
    }
}

fn cancel_section(options: &Options, binary: &Path) -> Vec<CancelResult> {
    let transports = options.cancel_transports();
    if transports.is_empty() {
        return Vec::new();
    }
    println!(
        "== migrate_cancel: a sweeping 1 GiB guest (ferry.tick_ms=10), cancelled in round 0; \
         times from the command"
    );
    let mut results = Vec::new();
    for transport in transports {
        let mut runs = Vec::new();
        for run in 1..=options.runs {
            let record = guarded(|| cancel::cancel_once(binary, transport, run))
                .unwrap_or_else(|error| CancelRun::failed(run, error));
            println!(
                "{}-cancel  run {run}/{}: {}",
                transport.name(),
                options.runs,
                record.one_line()
            );
            runs.push(record);
        }
        results.push(CancelResult { transport, runs });
    }
    println!();
    cancel::print_header();
    for result in &results {
        result.print_row();
    }
    println!();
    results
}

/// Runs the benchmark; `Ok(false)` if some migration did not complete or a cancel went wrong.
fn run() -> anyhow::Result<bool> {
    let options = Options::parse()?;
    if !Path::new("/dev/kvm").exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("/dev/kvm is missing, and CI=true requires the benchmark to run");
        }
        eprintln!("SKIPPED: /dev/kvm is missing; the migration benchmark did not run");
        return Ok(true);
    }
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_ferry"));
    let cases = options.cases();
    let case_names: Vec<String> = cases.iter().map(Case::name).collect();
    println!(
        "ferry migration benchmark: {} case(s), {} run(s) each{}; host: {} CPUs, load {}",
        cases.len(),
        options.runs,
        if options.quick { " (quick)" } else { "" },
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average().map_or("?".into(), |l| format!("{l:.2}")),
    );
    println!();

    let raw = raw_section(&options)?;
    let cancels = cancel_section(&options, &binary);

    if !cases.is_empty() {
        println!(
            "== ferry live migration (-append adds ferry.blackout={})",
            blackout_ms()
        );
    }
    let mut results = Vec::new();
    for case in cases {
        let raw_median = raw
            .iter()
            .find(|r| r.transport == case.transport)
            .map(RawFigures::medians)
            .unwrap_or_default();
        let mut runs = Vec::new();
        for run in 1..=options.runs {
            let record = guarded(|| migrate_once(&binary, &case, run))
                .unwrap_or_else(|error| Run::failed(run, error));
            println!(
                "{}  run {run}/{}: {}",
                case.label(),
                options.runs,
                record.one_line(raw_median)
            );
            let unsupported = record.unsupported();
            runs.push(record);
            if unsupported {
                break;
            }
        }
        let mut result = CaseResult {
            case,
            runs,
            raw: raw_median,
            plot: None,
        };
        if !result.unsupported() {
            let path = options.plot_path(&case);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            match result.draw(&path) {
                Ok(()) => result.plot = Some(path),
                Err(error) => eprintln!("{}: no plot: {error:#}", case.name()),
            }
        }
        result.print(cancels.iter().find(|c| c.transport == case.transport));
        results.push(result);
    }

    if !results.is_empty() {
        print_summary(&results, &cancels);
    }
    write_results(&options, &binary, &raw, &cancels, &results)?;
    println!("results: {}", options.out.display());
    let cancels_ok = cancels
        .iter()
        .all(|c| c.runs.iter().all(|r| !r.is_failure()));
    let transports = Transport::ALL.map(Transport::name);
    let cancel_names: Vec<&str> = options
        .cancel_transports()
        .into_iter()
        .map(Transport::name)
        .collect();
    let gaps = check::gaps(
        &options.out,
        &transports,
        &case_names,
        &cancel_names,
        options.runs,
    );
    for gap in &gaps {
        eprintln!("the result file is incomplete: {gap}");
    }
    Ok(results.iter().all(CaseResult::ok) && cancels_ok && gaps.is_empty())
}
