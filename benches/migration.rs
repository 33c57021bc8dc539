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
//! of their own.
//!
//! A guest that does not know a workload's option (it prints `warning: unknown option`) makes
//! its case `unsupported`, which is reported and skipped, not failed. Every guest also gets
//! `ferry.blackout=MS` (`$FERRY_BENCH_BLACKOUT_MS`, 5 by default) and reports its longest stall
//! (TSC gap) on each CPU, and apart from those, whatever its length, the gap across which
//! ferry stopped the CPU (KVM's clock tells the guest). `$FERRY_BENCH_LOGS=DIR` keeps each VM's log and serial output there.
//!
//! For each case it prints the total time, setup time and downtime that `query-migrate`
//! reports, the `expected-downtime` the switchover was decided on, the blackout the
//! guest measured (each vCPU's first `gap ... stopped` report on the destination, the longest;
//! for the workloads whose vCPUs run through the switchover, as a halted vCPU loses nothing)
//! and how far the downtime is from it, the bytes sent, the effective bandwidth (guest RAM / total time
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
#[path = "migration/check.rs"]
mod check;
#[path = "migration/font.rs"]
mod font;
#[path = "migration/guest.rs"]
mod guest;
#[path = "migration/memory.rs"]
mod memory;
#[path = "migration/plot.rs"]
mod plot;
#[path = "migration/timeline.rs"]
mod timeline;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry::harness::{Ferry, Qmp};
use serde_json::{json, Value};

use crate::cancel::{CancelResult, CancelRun};
use crate::memory::{MemoryProbe, Side};
use crate::timeline::Timeline;

const DEFAULT_RUNS: usize = 3;
/// Raw socket runs per transport at least (they take about a second each).
const RAW_MIN_RUNS: usize = 5;
/// Bytes each raw socket measurement moves.
const RAW_BYTES: u64 = 2 << 30;
/// Bytes each raw measurement into fresh memory moves (it takes seconds on this host).
const FRESH_RAW_BYTES: u64 = 1 << 30;
/// The size of every write and read of the raw measurement: about one frame of ferry's (1024
/// pages).
const RAW_IO_SIZE: usize = 4 << 20;
const SMP: &str = "2";
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
/// How long after a completed migration the destination's guest may take to report its
/// blackout.
const BLACKOUT_DEADLINE: Duration = Duration::from_secs(2);
/// ferry's cap on dirty rounds: a migration that completes with this many syncs or more was
/// switched over by force, beyond its downtime limit.
const CONVERGED_BELOW_ROUNDS: f64 = 30.0;
const POLL: Duration = Duration::from_millis(20);
/// The `max-bandwidth` of the capped case, MiB/s.
const CAPPED_MIB_PER_S: u64 = 256;
/// How long a VM may take to quit before it is killed.
const QUIT_DEADLINE: Duration = Duration::from_secs(20);
const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    const ALL: [Self; 2] = [Self::Tcp, Self::Unix];

    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
        }
    }
}

/// A free TCP port on 127.0.0.1, or a socket in `dir`.
fn migration_uri(transport: Transport, dir: &Path) -> anyhow::Result<String> {
    Ok(match transport {
        Transport::Tcp => {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            format!("tcp:127.0.0.1:{port}")
        }
        Transport::Unix => format!("unix:{}", dir.join("migration.sock").display()),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// `ferry.run=tick`: the guest leaves its RAM alone.
    Idle,
    /// The default workloads: both vCPUs sweep all of RAM as fast as they can, QEMU's
    /// migration-test pattern.
    Sweep,
    /// `ferry.run=tick ferry.fill=PERCENT`: that share of RAM filled with non-zero data at boot,
    /// then left alone.
    Fill(u32),
    /// `ferry.dirty_mbps=N`: the sweep paced to N MiB/s over both vCPUs.
    Dirty(u32),
}

impl Workload {
    fn name(self) -> String {
        match self {
            Self::Idle => "idle".into(),
            Self::Sweep => "sweep".into(),
            Self::Fill(percent) => format!("fill{percent}"),
            Self::Dirty(mbps) => format!("dirty{mbps}"),
        }
    }

    /// The guest's command line.
    fn append(self) -> String {
        let workload = match self {
            // An idle guest halts its vCPUs, as an idle OS does, rather than spinning.
            Self::Idle => "ferry.run=tick ferry.idle=hlt ".into(),
            Self::Sweep => String::new(),
            Self::Fill(percent) => format!("ferry.run=tick ferry.idle=hlt ferry.fill={percent} "),
            Self::Dirty(mbps) => format!("ferry.dirty_mbps={mbps} "),
        };
        format!("{workload}ferry.blackout={}", blackout_ms())
    }

    /// The guest option the workload needs, which older guests do not know.
    fn option(self) -> Option<&'static str> {
        match self {
            Self::Idle | Self::Sweep => None,
            Self::Fill(_) => Some("ferry.fill"),
            Self::Dirty(_) => Some("ferry.dirty_mbps"),
        }
    }

    /// Whether the vCPUs sweep, so that the bench waits for their first pass (every page
    /// written once: round 0 has no zero pages to skip). They run through the switchover too,
    /// so the guest measures its blackout; the other workloads halt their vCPUs between ticks.
    fn sweeps(self) -> bool {
        matches!(self, Self::Sweep | Self::Dirty(_))
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    transport: Transport,
    workload: Workload,
    mem_mib: u64,
    /// `max-bandwidth` in MiB/s, if the case sets one.
    cap_mib_per_s: Option<u64>,
    /// The `multifd` capability off: every page over the control connection.
    one_connection: bool,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{}-{}-{}g{}",
            self.transport.name(),
            self.workload.name(),
            self.mem_mib >> 10,
            self.suffix()
        )
    }

    fn label(&self) -> String {
        format!(
            "{:<4} {:<9} {} GiB{}",
            self.transport.name(),
            self.workload.name(),
            self.mem_mib >> 10,
            self.suffix()
        )
    }

    fn suffix(&self) -> String {
        let cap = self.cap_mib_per_s.map(|cap| format!("-cap{cap}m"));
        let one = self.one_connection.then(|| "-1conn".to_owned());
        cap.into_iter().chain(one).collect()
    }

    fn max_bandwidth(&self) -> Option<u64> {
        self.cap_mib_per_s.map(|cap| cap << 20)
    }

    /// The whole migration, including 30 dirty rounds of a guest that never converges.
    fn migration_timeout(&self) -> Duration {
        Duration::from_secs(120 + 120 * (self.mem_mib >> 10))
    }

    /// The sweeping guest's first pass, which touches every page of its slices (at the paced
    /// rate, if there is one).
    fn first_pass_timeout(&self) -> Duration {
        let paced = match self.workload {
            Workload::Dirty(mbps) => 2 * self.mem_mib / u64::from(mbps.max(1)),
            _ => 0,
        };
        Duration::from_secs(60 + 60 * (self.mem_mib >> 10) + paced)
    }
}

/// What the command line and the environment ask for.
struct Options {
    runs: usize,
    quick: bool,
    filters: Vec<String>,
    out: PathBuf,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut quick = matches!(
            std::env::var("FERRY_BENCH_QUICK").as_deref(),
            Ok("1" | "true" | "yes")
        );
        let mut filters = Vec::new();
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--quick" => quick = true,
                // cargo bench passes --bench to benchmarks without libtest's harness.
                "--bench" => {}
                flag if flag.starts_with('-') => {
                    eprintln!("migration bench: ignoring the unknown option {flag}");
                }
                word => filters.push(word.to_owned()),
            }
        }
        let runs = match std::env::var("FERRY_BENCH_RUNS") {
            _ if quick => 1,
            Ok(runs) => match runs.parse() {
                Ok(runs) if runs > 0 => runs,
                _ => bail!("FERRY_BENCH_RUNS must be a positive number, not {runs:?}"),
            },
            Err(_) => DEFAULT_RUNS,
        };
        let out = std::env::var_os("FERRY_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                // CARGO_TARGET_TMPDIR is TARGET/tmp, wherever CARGO_TARGET_DIR puts TARGET.
                Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .parent()
                    .unwrap_or(Path::new("target"))
                    .join("ferry-bench")
                    .join("migration.json")
            });
        Ok(Self {
            runs,
            quick,
            filters,
            out,
        })
    }

    /// Where a case's plot goes: next to the JSON.
    fn plot_path(&self, case: &Case) -> PathBuf {
        self.out
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("{}.png", case.name()))
    }

    fn wanted(&self, name: &str) -> bool {
        self.filters.iter().all(|word| name.contains(word.as_str()))
    }

    fn cases(&self) -> Vec<Case> {
        let (all_sizes, one_size): (&[u64], &[u64]) = if self.quick {
            (&[1024], &[1024])
        } else {
            (&[1024, 4096], &[1024])
        };
        let workloads: &[(Workload, &[u64])] = if self.quick {
            &[(Workload::Idle, all_sizes), (Workload::Sweep, all_sizes)]
        } else {
            &[
                (Workload::Idle, all_sizes),
                (Workload::Sweep, all_sizes),
                (Workload::Fill(50), all_sizes),
                (Workload::Dirty(100), one_size),
                (Workload::Dirty(1000), one_size),
            ]
        };
        let mut cases = Vec::new();
        for &(workload, sizes) in workloads {
            for &mem_mib in sizes {
                for transport in Transport::ALL {
                    cases.push(Case {
                        transport,
                        workload,
                        mem_mib,
                        cap_mib_per_s: None,
                        one_connection: false,
                    });
                }
            }
        }
        if !self.quick {
            // Whether `max-bandwidth` holds: half of 1 GiB to move at a rate far below the
            // socket's.
            for transport in Transport::ALL {
                cases.push(Case {
                    transport,
                    workload: Workload::Fill(50),
                    mem_mib: 1024,
                    cap_mib_per_s: Some(CAPPED_MIB_PER_S),
                    one_connection: false,
                });
            }
            // What the page connections (multifd, on by default) gain over one connection.
            for &mem_mib in all_sizes {
                for transport in Transport::ALL {
                    cases.push(Case {
                        transport,
                        workload: Workload::Fill(50),
                        mem_mib,
                        cap_mib_per_s: None,
                        one_connection: true,
                    });
                }
            }
        }
        cases.retain(|case| self.wanted(&case.name()));
        cases
    }

    /// The transports whose `migrate_cancel` is timed: the cancel runs are named
    /// `tcp-cancel` and `unix-cancel` for the filters.
    fn cancel_transports(&self) -> Vec<Transport> {
        Transport::ALL
            .into_iter()
            .filter(|t| self.wanted(&format!("{}-cancel", t.name())))
            .collect()
    }
}

/// Median, minimum and maximum.
#[derive(Clone, Copy, Debug)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }

    fn to_json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

fn stats_json(stats: Option<Stats>) -> Value {
    stats.map_or(Value::Null, Stats::to_json)
}

// ---------------------------------------------------------------------------------------------
// The raw transports

/// The raw throughput of one transport, in GiB/s.
struct RawFigures {
    transport: Transport,
    runs: Vec<f64>,
    /// With the reader landing the bytes in memory it never touched before, as a destination
    /// does with guest RAM: what first-touching memory costs on this host comes on top.
    fresh_runs: Vec<f64>,
    /// Cores' worth of CPU other processes used while the runs went on.
    other_cores: Option<f64>,
}

impl RawFigures {
    fn medians(&self) -> Raw {
        Raw {
            socket: Stats::of(&self.runs).map(|s| s.median),
            fresh: Stats::of(&self.fresh_runs).map(|s| s.median),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "transport": self.transport.name(),
            "bytes": RAW_BYTES,
            "io_size": RAW_IO_SIZE,
            "gib_per_s": stats_json(Stats::of(&self.runs)),
            "runs_gib_per_s": self.runs,
            "fresh_memory": {
                "bytes": FRESH_RAW_BYTES,
                "gib_per_s": stats_json(Stats::of(&self.fresh_runs)),
                "runs_gib_per_s": self.fresh_runs,
            },
            "other_cpu_cores": self.other_cores,
        })
    }
}

/// The raw medians of a case's transport, GiB/s.
#[derive(Debug, Clone, Copy, Default)]
struct Raw {
    socket: Option<f64>,
    fresh: Option<f64>,
}

/// Where the raw measurement's reader puts the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    /// One buffer, read into again and again (always resident).
    Reused,
    /// Memory the process never touched: each page is first touched by the read.
    Fresh,
}

/// Moves `bytes` from a memory buffer through a connected socket pair, with writes of
/// [`RAW_IO_SIZE`] on this thread and the reader on another, which reads into `landing`;
/// returns GiB/s.
fn raw_throughput(transport: Transport, bytes: u64, landing: Landing) -> anyhow::Result<f64> {
    let timeout = Some(Duration::from_secs(30));
    let (mut writer, reader): (Box<dyn Write>, Box<dyn Read + Send>) = match transport {
        Transport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let writer = TcpStream::connect(listener.local_addr()?)?;
            let (reader, _) = listener.accept()?;
            writer.set_write_timeout(timeout)?;
            reader.set_read_timeout(timeout)?;
            (Box::new(writer), Box::new(reader))
        }
        Transport::Unix => {
            let (writer, reader) = UnixStream::pair()?;
            writer.set_write_timeout(timeout)?;
            reader.set_read_timeout(timeout)?;
            (Box::new(writer), Box::new(reader))
        }
    };
    // Made before the clock starts; a zeroed allocation this large is fresh anonymous memory.
    let mut target = match landing {
        Landing::Reused => vec![1u8; RAW_IO_SIZE],
        Landing::Fresh => {
            let fresh = vec![0u8; bytes as usize];
            // Backed as ferry backs guest RAM, so that landing in it costs what landing in a
            // destination's RAM does; a host without THP leaves it on small pages, as ferry.
            let _ = ferry::machine::memory::advise_huge_pages(&fresh);
            fresh
        }
    };
    let receiver = std::thread::spawn(move || -> std::io::Result<Instant> {
        let mut reader = reader;
        let mut received = 0usize;
        while received < bytes as usize {
            let at = match landing {
                Landing::Reused => 0,
                Landing::Fresh => received,
            };
            let end = (at + RAW_IO_SIZE).min(target.len());
            match reader.read(&mut target[at..end])? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => received += n,
            }
        }
        Ok(Instant::now())
    });
    let buffer = vec![0x5au8; RAW_IO_SIZE];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(RAW_IO_SIZE as u64) as usize;
        writer.write_all(&buffer[..n])?;
        sent += n as u64;
    }
    let finished = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    Ok(bytes as f64 / GIB / (finished - started).as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// One migration

/// One migration of a case: what `query-migrate` said at the end, and what the bench saw.
#[derive(Debug, Default)]
struct Run {
    run: usize,
    /// `completed`, `failed`, `canceled`, `timeout` (cancelled at the bench's deadline),
    /// `destination-failed`, `unsupported` (the guest lacks the workload's option) or `error`
    /// (the bench could not run it).
    status: String,
    error: Option<String>,
    /// The source's last `query-migrate` answer.
    info: Option<Value>,
    /// The destination's `query-migrate` status and `query-status` afterwards.
    destination_status: Option<String>,
    /// From `migrate` to the answer that showed the end, as the bench saw it.
    observed_ms: Option<u64>,
    /// The host's 1-minute load average just before `migrate` (this benchmark's VMs included).
    load_before: Option<f64>,
    /// Cores' worth of CPU time that processes other than this benchmark and its two VMs used
    /// during the migration: other work on the host that the figures compete with.
    other_cores: Option<f64>,
    /// The source's `query-migrate`, every [`POLL`].
    timeline: Timeline,
    /// Both processes' resident memory during the migration.
    memory: Option<memory::Trace>,
    /// The longest blackout a vCPU of the guest measured across the switchover, in µs
    /// (`guest::blackout_us`); `None` if not measured.
    blackout_us: Option<u64>,
    /// The destination's `gap` reports, as far as the bench read them (until it knew the
    /// blackout).
    destination_gaps: Vec<guest::Gap>,
    /// The source guest's `gap` reports during the migration: its vCPUs stalled (held back by
    /// auto-converge, by the dirty log, or by the host).
    source_gaps: Vec<guest::Gap>,
    /// The case's `max-bandwidth` (bytes/s), if it sets one.
    max_bandwidth: Option<u64>,
}

/// The figures of a run the tables show, by key.
const FIGURES: [(&str, &str); 17] = [
    ("total_ms", "total time (ms)"),
    ("setup_ms", "setup time (ms)"),
    ("downtime_ms", "downtime (ms)"),
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
];

impl Run {
    fn failed(run: usize, error: String) -> Self {
        Self {
            run,
            status: "error".into(),
            error: Some(error),
            ..Self::default()
        }
    }

    fn completed(&self) -> bool {
        self.status == "completed"
    }

    fn unsupported(&self) -> bool {
        self.status == "unsupported"
    }

    /// Completed within ferry's round cap, without a forced switchover.
    fn converged(&self) -> bool {
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

    fn count(&self, path: &[&str]) -> Option<u64> {
        self.value(path)?.as_u64()
    }

    fn overhead_mib(&self, side: Side) -> Option<f64> {
        Some(self.memory.as_ref()?.peak_overhead(side)? as f64 / MIB)
    }

    /// One of [`FIGURES`]; the shares are of `raw` (GiB/s of the same transport).
    fn figure(&self, key: &str, raw: Raw) -> Option<f64> {
        match key {
            "other_cpu_cores" => return self.other_cores,
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

    fn to_json(&self, raw: Raw) -> Value {
        let gaps = |gaps: &[guest::Gap]| gaps.iter().map(|g| g.to_json()).collect::<Vec<_>>();
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

    fn one_line(&self, raw: Raw) -> String {
        if let Some(error) = &self.error {
            let first = error.lines().next().unwrap_or_default();
            return format!("{}: {first}", self.status);
        }
        let show = |key: &str, decimals: usize| {
            self.figure(key, raw)
                .map_or("-".into(), |v| format!("{v:.decimals$}"))
        };
        format!(
            "{:<9} total {} ms, setup {} ms, downtime {} ms (expected {} ms, guest saw {} ms), \
             sent {} MiB ({} GiB/s, {}% of raw, {}% of raw into fresh memory{}), {} rounds{}; \
             VMM overhead {} MiB source, {} \
             MiB destination; other processes used {} cores",
            self.status,
            show("total_ms", 0),
            show("setup_ms", 0),
            show("downtime_ms", 0),
            show("expected_downtime_ms", 0),
            show("guest_blackout_ms", 1),
            show("transferred_mib", 1),
            show("transferred_gib_per_s", 3),
            show("transferred_pct_of_raw", 1),
            show("transferred_pct_of_fresh_raw", 1),
            match self.max_bandwidth {
                Some(cap) => format!(
                    ", {}% of max-bandwidth {} MiB/s",
                    show("pct_of_max_bandwidth", 1),
                    cap >> 20
                ),
                None => String::new(),
            },
            show("rounds", 0),
            if self.converged() {
                ""
            } else {
                " (not converged)"
            },
            show("source_overhead_mib", 1),
            show("destination_overhead_mib", 1),
            show("other_cpu_cores", 2),
        )
    }
}

/// CPU time spent by the whole host and by some processes over an interval, to tell how much of
/// the host's CPU other work took while a migration ran.
struct CpuProbe {
    started: Instant,
    host: u64,
    ours: u64,
    pids: Vec<u32>,
}

impl CpuProbe {
    fn start(pids: Vec<u32>) -> Option<Self> {
        Some(Self {
            started: Instant::now(),
            host: host_busy_ticks()?,
            ours: pids
                .iter()
                .map(|&pid| process_ticks(pid))
                .sum::<Option<u64>>()?,
            pids,
        })
    }

    /// Cores' worth of CPU the host spent outside `pids` since the start.
    fn other_cores(&self) -> Option<f64> {
        let host = host_busy_ticks()?.checked_sub(self.host)?;
        let ours: u64 = self
            .pids
            .iter()
            .map(|&pid| process_ticks(pid))
            .sum::<Option<u64>>()?;
        let ours = ours.checked_sub(self.ours)?;
        // SAFETY: sysconf only reads a configuration value.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let seconds = self.started.elapsed().as_secs_f64();
        if ticks_per_second <= 0 || seconds <= 0.0 {
            return None;
        }
        Some(host.saturating_sub(ours) as f64 / ticks_per_second as f64 / seconds)
    }
}

/// Busy clock ticks of all CPUs since boot: user, nice, system, irq, softirq and steal of
/// `/proc/stat` (guest time is part of user time already).
fn host_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| fields.get(i).copied())
        .sum()
}

/// User and system clock ticks of a process (all its threads).
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces, start with the state (field 3);
    // utime and stime are fields 14 and 15.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Quits a VM through QMP, and kills it if it has not ended within [`QUIT_DEADLINE`].
fn shut_down(vm: &mut Ferry) {
    if vm.is_running() {
        if let Some(path) = vm.qmp_path.as_deref() {
            if UnixStream::connect(path).is_ok() {
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    Qmp::connect(path).execute("quit", None)
                }));
            }
        }
    }
    let deadline = Instant::now() + QUIT_DEADLINE;
    while vm.is_running() {
        if Instant::now() >= deadline {
            eprintln!(
                "{}: did not quit within {QUIT_DEADLINE:?}; killing it",
                vm.name
            );
            vm.signal(libc::SIGKILL);
            // Reaped by the harness's drop; never panic here, this may run while unwinding.
            break;
        }
        std::thread::sleep(POLL);
    }
}

/// Both VMs of a run; whatever happens, they quit (or are killed) when this goes.
struct Pair {
    vms: Vec<Ferry>,
    /// With `$FERRY_BENCH_LOGS` set: where each VM's log and serial output go, as
    /// `PREFIX-NAME.log` (run the bench with `RUST_LOG=ferry=debug` to see the switchover's
    /// steps).
    logs: Option<PathBuf>,
}

impl Pair {
    fn new(name: &str) -> Self {
        Self {
            vms: Vec::new(),
            logs: std::env::var_os("FERRY_BENCH_LOGS").map(|dir| PathBuf::from(dir).join(name)),
        }
    }

    fn keep_logs(&self, prefix: &Path) {
        if let Some(dir) = prefix.parent() {
            if let Err(error) = std::fs::create_dir_all(dir) {
                eprintln!("cannot create {}: {error}", dir.display());
            }
        }
        for vm in &self.vms {
            let path = PathBuf::from(format!("{}-{}.log", prefix.display(), vm.name));
            let text = format!(
                "{}\n--- serial ---\n{}\n",
                vm.stderr(),
                vm.lines().join("\n")
            );
            if let Err(error) = std::fs::write(&path, text) {
                eprintln!("cannot write {}: {error}", path.display());
            }
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for vm in &mut self.vms {
            shut_down(vm);
        }
        if let Some(prefix) = &self.logs {
            self.keep_logs(prefix);
        }
    }
}

fn migrate_once(binary: &Path, case: &Case, run: usize) -> anyhow::Result<Run> {
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-")
        .tempdir()
        .context("a scratch directory")?;
    let mem = case.mem_mib.to_string();
    let append = case.workload.append();
    let mut pair = Pair::new(&format!("{}-run{run}", case.name()));

    let source_qmp = dir.path().join("source.qmp");
    pair.vms.push(Ferry::start(
        binary,
        "source",
        &["-smp", SMP, "-m", &mem, "-append", &append],
        Some(&source_qmp),
    ));
    let source_vm = &pair.vms[0];
    source_vm.wait_ready();
    if let Some(option) = case.workload.option() {
        if let Some(warning) = guest::unknown_option(&source_vm.lines(), option) {
            return Ok(Run {
                run,
                status: "unsupported".into(),
                error: Some(format!("the guest says: {warning}")),
                ..Run::default()
            });
        }
    }
    if case.workload.sweeps() {
        // Every page of RAM has been written once: round 0 has no zero pages to skip.
        for cpu in 0..CPUS {
            let line = format!("sweep 1 cpu={cpu}");
            source_vm.wait_line(
                &format!("the first sweep of cpu {cpu}"),
                case.first_pass_timeout(),
                |l| l == line,
            );
        }
    }
    let source_lines = source_vm.lines();
    let blackout_reported = guest::unknown_option(&source_lines, "ferry.blackout").is_none()
        && guest::no_stop_flag(&source_lines).is_none();

    let uri = migration_uri(case.transport, dir.path())?;
    let destination_qmp = dir.path().join("destination.qmp");
    pair.vms.push(Ferry::start(
        binary,
        "destination",
        &["-smp", SMP, "-m", &mem, "-incoming", &uri],
        Some(&destination_qmp),
    ));
    let mut destination = Qmp::connect(&destination_qmp);
    let status = destination.status();
    if status != "inmigrate" {
        bail!("the destination says {status}, not inmigrate");
    }

    let mut source = Qmp::connect(&source_qmp);
    if let Some(cap) = case.max_bandwidth() {
        source.ok(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": cap})),
        );
    }
    if case.one_connection {
        let multifd = json!([{"capability": "multifd", "state": false}]);
        source.ok(
            "migrate-set-capabilities",
            Some(json!({"capabilities": multifd})),
        );
    }
    let load_before = load_average();
    let pids = vec![
        std::process::id(),
        pair.vms[0].pid() as u32,
        pair.vms[1].pid() as u32,
    ];
    let ram_ranges: Vec<u64> = ferry::machine::memory::ram_layout(case.mem_mib << 20)
        .iter()
        .map(|r| r.size)
        .collect();
    let source_lines_before = pair.vms[0].lines().len();
    let probe = CpuProbe::start(pids);
    let asked = Instant::now();
    let memory = MemoryProbe::start(asked, pair.vms[0].pid(), pair.vms[1].pid(), ram_ranges);
    source.ok("migrate", Some(json!({"uri": uri})));
    let deadline = asked + case.migration_timeout();
    let mut timed_out = false;
    let mut timeline = Timeline::default();
    let mut source_gaps = Vec::new();
    let mut source_lines_seen = source_lines_before;
    let info = loop {
        let info = source.ok("query-migrate", None);
        let t_ms = asked.elapsed().as_secs_f64() * 1000.0;
        timeline.push(t_ms, &info);
        let lines = pair.vms[0].lines();
        source_gaps.extend(guest::gaps(
            &lines[source_lines_seen.min(lines.len())..],
            t_ms,
        ));
        source_lines_seen = lines.len();
        if !matches!(info["status"].as_str(), Some("setup" | "active")) {
            break info;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            source.ok("migrate_cancel", None);
            break source.wait_migration(
                &["canceled", "completed", "failed"],
                Duration::from_secs(10),
            );
        }
        std::thread::sleep(POLL);
    };
    let observed = asked.elapsed();
    let other_cores = probe.and_then(|p| p.other_cores());
    let memory = memory.finish();
    let status = info["status"].as_str().unwrap_or("?").to_owned();

    // The destination has the guest once the source completed, and runs it; otherwise it gives
    // up.
    let (mut status, destination_status) = if status == "completed" {
        let answer = destination.wait_migration(&["completed", "failed"], Duration::from_secs(10));
        let migration = answer["status"].as_str().unwrap_or("?").to_owned();
        let vm = destination.status();
        let status = if migration == "completed" && vm == "running" {
            status
        } else {
            "destination-failed".to_owned()
        };
        (status, Some(format!("{migration}, {vm}")))
    } else {
        (status, None)
    };
    let mut blackout = None;
    let mut destination_gaps = Vec::new();
    if status == "completed" && blackout_reported && case.workload.sweeps() {
        let waited = Instant::now();
        let mut seen = 0;
        while blackout.is_none() && waited.elapsed() < BLACKOUT_DEADLINE {
            std::thread::sleep(POLL);
            let lines = pair.vms[1].lines();
            let t_ms = asked.elapsed().as_secs_f64() * 1000.0;
            destination_gaps.extend(guest::gaps(&lines[seen.min(lines.len())..], t_ms));
            seen = lines.len();
            blackout = guest::blackout_us(&lines, CPUS);
        }
    }
    let error = if status == "destination-failed" {
        Some(format!(
            "the source completed, but the destination says {}",
            destination_status.as_deref().unwrap_or("?")
        ))
    } else if timed_out {
        status = "timeout".to_owned();
        Some(format!(
            "not finished after {:?}; cancelled",
            case.migration_timeout()
        ))
    } else {
        info["error-desc"].as_str().map(str::to_owned)
    };
    drop(pair);
    Ok(Run {
        run,
        status,
        error,
        info: Some(info),
        destination_status,
        observed_ms: Some(observed.as_millis() as u64),
        load_before,
        other_cores,
        timeline,
        memory: Some(memory),
        blackout_us: blackout,
        destination_gaps,
        source_gaps,
        max_bandwidth: case.max_bandwidth(),
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".into())
}

// ---------------------------------------------------------------------------------------------
// Reporting

struct CaseResult {
    case: Case,
    runs: Vec<Run>,
    raw: Raw,
    /// The plot of the runs, if one was drawn.
    plot: Option<PathBuf>,
}

impl CaseResult {
    fn completed(&self) -> usize {
        self.runs.iter().filter(|r| r.completed()).count()
    }

    fn converged(&self) -> usize {
        self.runs.iter().filter(|r| r.converged()).count()
    }

    fn unsupported(&self) -> bool {
        self.runs.iter().any(Run::unsupported)
    }

    /// Every run completed, or the guest cannot run the case.
    fn ok(&self) -> bool {
        self.unsupported() || self.completed() == self.runs.len()
    }

    fn done(&self) -> String {
        if self.unsupported() {
            "n/a".into()
        } else {
            format!("{}/{}", self.completed(), self.runs.len())
        }
    }

    /// The guest's blackout for the summary: the median of the runs that measured one.
    fn blackout_cell(&self) -> String {
        match self.stats("guest_blackout_ms") {
            Some(s) => format!("{:.1}", s.median),
            None => "-".into(),
        }
    }

    /// A figure's statistics over the completed runs.
    /// How many completed runs reported a downtime within max(1 ms, 10 %) of the blackout
    /// their guest measured, of those where the guest measured one.
    fn downtimes_close_to_blackout(&self) -> (usize, usize) {
        let runs = self.runs.iter().filter(|r| r.completed());
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

    fn stats(&self, key: &str) -> Option<Stats> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.completed())
            .filter_map(|r| r.figure(key, self.raw))
            .collect();
        Stats::of(&values)
    }

    fn print(&self, cancel: Option<&CancelResult>) {
        println!(
            "{}  (-smp {SMP}, -append \"{}\"): {} completed, {} converged",
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
                         runs; downtime is in whole ms)"
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

    fn to_json(&self, raw: &[RawFigures], cancel: Option<&CancelResult>) -> Value {
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
            "guest_measures_blackout": self.case.workload.sweeps(),
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
    fn draw(&self, path: &Path) -> anyhow::Result<()> {
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
            remaining.push(plot::Line {
                label: format!(
                    "{name}: {} rounds",
                    run.count(&["ram", "dirty-sync-count"])
                        .map_or("?".into(), |r| r.to_string())
                ),
                color,
                width: 2,
                points: run.timeline.remaining_mib(),
                bars: false,
                marks: marks.clone(),
            });
            bandwidth.push(plot::Line {
                label: format!("{name} sent, 100 ms"),
                color,
                width: 2,
                points: run.timeline.measured_mib_per_s(100.0),
                bars: false,
                marks: marks.clone(),
            });
            bandwidth.push(plot::Line {
                label: format!("{name} ferry mbps"),
                color: plot::light(color),
                width: 1,
                points: run.timeline.reported_mib_per_s(),
                bars: false,
                marks: Vec::new(),
            });
            let bars = |gaps: &[guest::Gap]| {
                gaps.iter()
                    .map(|g| (g.t_ms / 1000.0, g.us as f64 / 1000.0))
                    .collect::<Vec<_>>()
            };
            stalls.push(plot::Line {
                label: format!("{name} source"),
                color,
                width: 2,
                points: bars(&run.source_gaps),
                bars: true,
                marks: Vec::new(),
            });
            stalls.push(plot::Line {
                label: format!("{name} destination"),
                color: plot::light(color),
                width: 2,
                points: bars(&run.destination_gaps),
                bars: true,
                marks: Vec::new(),
            });
            if let Some(memory) = &run.memory {
                overhead.push(plot::Line {
                    label: format!("{name} source"),
                    color,
                    width: 2,
                    points: memory.overhead_mib(Side::Source),
                    bars: false,
                    marks: Vec::new(),
                });
                overhead.push(plot::Line {
                    label: format!("{name} destination"),
                    color: plot::light(color),
                    width: 2,
                    points: memory.overhead_mib(Side::Destination),
                    bars: false,
                    marks: Vec::new(),
                });
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
            "time since migrate (s), stalls when the bench read them. ticks under the plots: a \
             pre-copy round begins",
            &panels,
        )
    }
}

fn decimals(key: &str) -> usize {
    match key {
        "transferred_mib"
        | "ram_pct_of_raw"
        | "transferred_pct_of_raw"
        | "transferred_pct_of_fresh_raw"
        | "guest_blackout_ms"
        | "downtime_error_ms"
        | "source_overhead_mib"
        | "destination_overhead_mib" => 1,
        "ram_gib_per_s" | "transferred_gib_per_s" => 3,
        "other_cpu_cores" => 2,
        _ => 0,
    }
}

fn print_summary(results: &[CaseResult], cancels: &[CancelResult]) {
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
            .map_or("-".into(), |s| format!("{:.0}", s.median));
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
            &result.blackout_cell(),
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
         the guest measured it, if its vCPUs ran through the switchover; src/dst: peak VMM \
         overhead beyond guest RAM; cancel: migrate_cancel latency of the transport's cancel \
         runs; n/a: the guest lacks the workload's option)"
    );
    println!();
}

fn write_results(
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

// ---------------------------------------------------------------------------------------------

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

fn raw_section(options: &Options) -> anyhow::Result<Vec<RawFigures>> {
    println!(
        "== raw socket throughput: {} GiB from memory in {} MiB writes, reader on another thread \
         (fresh: {} GiB read into memory never touched before, on huge pages, as a \
         destination's guest RAM)",
        RAW_BYTES >> 30,
        RAW_IO_SIZE >> 20,
        FRESH_RAW_BYTES >> 30
    );
    let raw_runs = options.runs.max(RAW_MIN_RUNS);
    println!(
        "{:<9} {:>10} {:>10} {:>10}   ({raw_runs} runs; other processes' CPU in cores)",
        "GiB/s", "median", "min", "max"
    );
    let mut raw = Vec::new();
    for transport in Transport::ALL {
        let probe = CpuProbe::start(vec![std::process::id()]);
        let measure = |bytes, landing, runs| {
            (0..runs)
                .map(|_| raw_throughput(transport, bytes, landing))
                .collect::<anyhow::Result<Vec<f64>>>()
                .with_context(|| format!("raw {} throughput", transport.name()))
        };
        let runs = measure(RAW_BYTES, Landing::Reused, raw_runs)?;
        let fresh_runs = measure(FRESH_RAW_BYTES, Landing::Fresh, options.runs)?;
        let other_cores = probe.and_then(|p| p.other_cores());
        for (name, runs) in [("", &runs), (" fresh", &fresh_runs)] {
            let s = Stats::of(runs).expect("at least one run");
            println!(
                "{:<9} {:>10.2} {:>10.2} {:>10.2}   others {}",
                format!("{}{name}", transport.name()),
                s.median,
                s.min,
                s.max,
                other_cores.map_or("?".into(), |c| format!("{c:.2}")),
            );
        }
        raw.push(RawFigures {
            transport,
            runs,
            fresh_runs,
            other_cores,
        });
    }
    println!();
    Ok(raw)
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
