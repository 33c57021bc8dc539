//! Live-migration benchmark: the raw throughput of the two transports (TCP over 127.0.0.1 and
//! a UNIX socket pair), then ferry migrating the built-in guest over each of them, idle and
//! sweeping its RAM, at 1 GiB and 4 GiB.
//!
//! ```sh
//! cargo bench --bench migration                 # every case, FERRY_BENCH_RUNS times (3)
//! cargo bench --bench migration -- --quick      # the 1 GiB cases once (FERRY_BENCH_QUICK=1)
//! cargo bench --bench migration -- sweep unix   # only the cases whose names contain a word
//! ```
//!
//! For each case it prints the total time, setup time and downtime that `query-migrate`
//! reports, the bytes sent, the effective bandwidth (guest RAM / total time and bytes sent /
//! total time) next to the raw figure of the same transport, and the number of rounds
//! (`dirty-sync-count`), as the median, minimum and maximum of the runs. The raw figures are
//! the median of at least five runs. Next to every figure it prints how many cores' worth of
//! CPU other processes took meanwhile: the host has two cores, and other work on it skews
//! the results. The figures also go, one record per case, to
//! `target/ferry-bench/migration.json` (or `$FERRY_BENCH_OUT`).
//!
//! Destinations start with `-S`, so only the source's guest competes with the migration for the
//! host's cores; both VMs quit after every run. Every wait is bounded, and a run that goes wrong
//! (a timeout, a harness panic) is recorded as such and its processes are killed.
#![expect(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

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

const DEFAULT_RUNS: usize = 3;
/// Raw socket runs per transport at least (they take about a second each).
const RAW_MIN_RUNS: usize = 5;
/// Bytes each raw socket measurement moves.
const RAW_BYTES: u64 = 2 << 30;
/// The size of every write and read of the raw measurement: about one frame of ferry's (1024
/// pages).
const RAW_IO_SIZE: usize = 4 << 20;
const SMP: &str = "2";
const IDLE_APPEND: &str = "ferry.run=tick";
const POLL: Duration = Duration::from_millis(20);
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// `ferry.run=tick`: the guest leaves its RAM alone.
    Idle,
    /// The default workloads: both vCPUs sweep all of RAM, QEMU's migration-test pattern.
    Sweep,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Sweep => "sweep",
        }
    }

    fn append(self) -> Option<&'static str> {
        match self {
            Self::Idle => Some(IDLE_APPEND),
            Self::Sweep => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    transport: Transport,
    workload: Workload,
    mem_mib: u64,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{}-{}-{}g",
            self.transport.name(),
            self.workload.name(),
            self.mem_mib >> 10
        )
    }

    fn label(&self) -> String {
        format!(
            "{:<4} {:<5} {} GiB",
            self.transport.name(),
            self.workload.name(),
            self.mem_mib >> 10
        )
    }

    /// The whole migration, including 30 dirty rounds of a guest that never converges.
    fn migration_timeout(&self) -> Duration {
        Duration::from_secs(120 + 120 * (self.mem_mib >> 10))
    }

    /// The sweeping guest's first pass, which touches every page of its slices.
    fn first_pass_timeout(&self) -> Duration {
        Duration::from_secs(60 + 60 * (self.mem_mib >> 10))
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

    fn cases(&self) -> Vec<Case> {
        let sizes: &[u64] = if self.quick { &[1024] } else { &[1024, 4096] };
        let mut cases = Vec::new();
        for workload in [Workload::Idle, Workload::Sweep] {
            for &mem_mib in sizes {
                for transport in Transport::ALL {
                    cases.push(Case {
                        transport,
                        workload,
                        mem_mib,
                    });
                }
            }
        }
        cases.retain(|case| {
            let name = case.name();
            self.filters.iter().all(|word| name.contains(word.as_str()))
        });
        cases
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
    /// Cores' worth of CPU other processes used while the runs went on.
    other_cores: Option<f64>,
}

impl RawFigures {
    fn median(&self) -> Option<f64> {
        Stats::of(&self.runs).map(|s| s.median)
    }

    fn to_json(&self) -> Value {
        json!({
            "transport": self.transport.name(),
            "bytes": RAW_BYTES,
            "io_size": RAW_IO_SIZE,
            "gib_per_s": stats_json(Stats::of(&self.runs)),
            "runs_gib_per_s": self.runs,
            "other_cpu_cores": self.other_cores,
        })
    }
}

/// Moves [`RAW_BYTES`] from a memory buffer through a connected socket pair, with writes of
/// [`RAW_IO_SIZE`] on this thread and the reader on another; returns GiB/s.
fn raw_throughput(transport: Transport) -> anyhow::Result<f64> {
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
    let receiver = std::thread::spawn(move || -> std::io::Result<Instant> {
        let mut reader = reader;
        let mut buffer = vec![1u8; RAW_IO_SIZE];
        let mut received = 0u64;
        while received < RAW_BYTES {
            match reader.read(&mut buffer)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => received += n as u64,
            }
        }
        Ok(Instant::now())
    });
    let buffer = vec![0x5au8; RAW_IO_SIZE];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < RAW_BYTES {
        let n = (RAW_BYTES - sent).min(RAW_IO_SIZE as u64) as usize;
        writer.write_all(&buffer[..n])?;
        sent += n as u64;
    }
    let finished = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    Ok(RAW_BYTES as f64 / GIB / (finished - started).as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// One migration

/// One migration of a case: what `query-migrate` said at the end, and what the bench saw.
#[derive(Debug, Default)]
struct Run {
    run: usize,
    /// `completed`, `failed`, `canceled`, `timeout` (cancelled at the bench's deadline),
    /// `destination-failed` or `error` (the bench could not run it).
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
}

/// The figures of a run the tables show, by key.
const FIGURES: [(&str, &str); 10] = [
    ("total_ms", "total time (ms)"),
    ("setup_ms", "setup time (ms)"),
    ("downtime_ms", "downtime (ms)"),
    ("transferred_mib", "RAM transferred (MiB)"),
    ("ram_gib_per_s", "RAM total / total time (GiB/s)"),
    ("transferred_gib_per_s", "transferred / total time (GiB/s)"),
    ("ram_pct_of_raw", "RAM total / time, % of raw"),
    ("transferred_pct_of_raw", "transferred / time, % of raw"),
    ("rounds", "rounds (dirty-sync-count)"),
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

    /// One of [`FIGURES`]; the shares are of `raw` (GiB/s of the same transport).
    fn figure(&self, key: &str, raw: Option<f64>) -> Option<f64> {
        if key == "other_cpu_cores" {
            return self.other_cores;
        }
        let seconds = self.field(&["total-time"])? / 1000.0;
        let per_second = |bytes: f64| (seconds > 0.0).then(|| bytes / GIB / seconds);
        let ram = || per_second(self.field(&["ram", "total"])?);
        let sent = || per_second(self.field(&["ram", "transferred"])?);
        let share = |rate: Option<f64>| Some(rate? / raw? * 100.0);
        match key {
            "total_ms" => self.field(&["total-time"]),
            "setup_ms" => self.field(&["setup-time"]),
            "downtime_ms" => self.field(&["downtime"]),
            "transferred_mib" => Some(self.field(&["ram", "transferred"])? / MIB),
            "ram_gib_per_s" => ram(),
            "transferred_gib_per_s" => sent(),
            "ram_pct_of_raw" => share(ram()),
            "transferred_pct_of_raw" => share(sent()),
            "rounds" => self.field(&["ram", "dirty-sync-count"]),
            _ => unreachable!("unknown figure {key}"),
        }
    }

    fn to_json(&self, raw: Option<f64>) -> Value {
        let mut record = json!({
            "run": self.run,
            "status": self.status,
            "completed": self.completed(),
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
            "query_migrate": self.info,
        });
        for (key, _) in FIGURES {
            record[key] = json!(self.figure(key, raw));
        }
        record
    }

    fn one_line(&self, raw: Option<f64>) -> String {
        if let Some(error) = &self.error {
            let first = error.lines().next().unwrap_or_default();
            return format!("{}: {first}", self.status);
        }
        let show = |key: &str, decimals: usize| {
            self.figure(key, raw)
                .map_or("-".into(), |v| format!("{v:.decimals$}"))
        };
        format!(
            "{:<9} total {} ms, setup {} ms, downtime {} ms, sent {} MiB ({} GiB/s, {}% of raw), \
             {} rounds; other processes used {} cores",
            self.status,
            show("total_ms", 0),
            show("setup_ms", 0),
            show("downtime_ms", 0),
            show("transferred_mib", 1),
            show("transferred_gib_per_s", 3),
            show("transferred_pct_of_raw", 1),
            show("rounds", 0),
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
}

impl Drop for Pair {
    fn drop(&mut self) {
        for vm in &mut self.vms {
            shut_down(vm);
        }
    }
}

fn migrate_once(binary: &Path, case: &Case, run: usize) -> anyhow::Result<Run> {
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-")
        .tempdir()
        .context("a scratch directory")?;
    let mem = case.mem_mib.to_string();
    let mut pair = Pair { vms: Vec::new() };

    let mut source_args = vec!["-smp", SMP, "-m", &mem];
    if let Some(append) = case.workload.append() {
        source_args.extend(["-append", append]);
    }
    let source_qmp = dir.path().join("source.qmp");
    pair.vms.push(Ferry::start(
        binary,
        "source",
        &source_args,
        Some(&source_qmp),
    ));
    let source = &pair.vms[0];
    source.wait_ready();
    if case.workload == Workload::Sweep {
        // Every page of RAM has been written once: round 0 has no zero pages to skip.
        for cpu in 0..2 {
            let line = format!("sweep 1 cpu={cpu}");
            source.wait_line(
                &format!("the first sweep of cpu {cpu}"),
                case.first_pass_timeout(),
                |l| l == line,
            );
        }
    }

    let uri = match case.transport {
        Transport::Tcp => {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            format!("tcp:127.0.0.1:{port}")
        }
        Transport::Unix => format!("unix:{}", dir.path().join("migration.sock").display()),
    };
    let destination_qmp = dir.path().join("destination.qmp");
    pair.vms.push(Ferry::start(
        binary,
        "destination",
        &["-smp", SMP, "-m", &mem, "-incoming", &uri, "-S"],
        Some(&destination_qmp),
    ));
    let mut destination = Qmp::connect(&destination_qmp);
    let status = destination.status();
    if status != "inmigrate" {
        bail!("the destination says {status}, not inmigrate");
    }

    let mut source = Qmp::connect(&source_qmp);
    let load_before = load_average();
    let pids = vec![
        std::process::id(),
        pair.vms[0].pid() as u32,
        pair.vms[1].pid() as u32,
    ];
    let probe = CpuProbe::start(pids);
    source.ok("migrate", Some(json!({"uri": uri})));
    let asked = Instant::now();
    let deadline = asked + case.migration_timeout();
    let mut timed_out = false;
    let info = loop {
        let info = source.ok("query-migrate", None);
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
    let status = info["status"].as_str().unwrap_or("?").to_owned();

    // The destination has the guest once the source completed (and, started with -S, stays
    // paused); otherwise it gives up.
    let (mut status, destination_status) = if status == "completed" {
        let answer = destination.wait_migration(&["completed", "failed"], Duration::from_secs(10));
        let migration = answer["status"].as_str().unwrap_or("?").to_owned();
        let vm = destination.status();
        let status = if migration == "completed" && vm == "paused" {
            status
        } else {
            "destination-failed".to_owned()
        };
        (status, Some(format!("{migration}, {vm}")))
    } else {
        (status, None)
    };
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
    raw: Option<f64>,
}

impl CaseResult {
    fn completed(&self) -> usize {
        self.runs.iter().filter(|r| r.completed()).count()
    }

    /// A figure's statistics over the completed runs.
    fn stats(&self, key: &str) -> Option<Stats> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.completed())
            .filter_map(|r| r.figure(key, self.raw))
            .collect();
        Stats::of(&values)
    }

    fn print(&self) {
        println!(
            "{}  (-smp {SMP}{}): {}/{} completed",
            self.case.label(),
            self.case
                .workload
                .append()
                .map_or(String::new(), |a| format!(", -append {a}")),
            self.completed(),
            self.runs.len()
        );
        println!("  {:<36} {:>10} {:>10} {:>10}", "", "median", "min", "max");
        for (key, label) in FIGURES {
            let label = if key.ends_with("_pct_of_raw") {
                label.replace("raw", &format!("raw {}", self.case.transport.name()))
            } else {
                label.to_owned()
            };
            let decimals = decimals(key);
            match self.stats(key) {
                Some(s) => println!(
                    "  {label:<36} {:>10.decimals$} {:>10.decimals$} {:>10.decimals$}",
                    s.median, s.min, s.max
                ),
                None => println!("  {label:<36} {:>10} {:>10} {:>10}", "-", "-", "-"),
            }
        }
        println!();
    }

    fn to_json(&self, raw: &[RawFigures]) -> Value {
        let mut summary = serde_json::Map::new();
        for (key, _) in FIGURES {
            summary.insert(key.into(), stats_json(self.stats(key)));
        }
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
                "smp": SMP.parse::<u32>().unwrap_or(0),
                "append": self.case.workload.append(),
            },
            "runs": self.runs.len(),
            "completed_runs": self.completed(),
            "raw_gib_per_s": self.raw,
            "raw": raw_figures,
            "summary": Value::Object(summary),
            "results": self.runs.iter().map(|r| r.to_json(self.raw)).collect::<Vec<_>>(),
        })
    }
}

fn decimals(key: &str) -> usize {
    match key {
        "transferred_mib" | "ram_pct_of_raw" | "transferred_pct_of_raw" => 1,
        "ram_gib_per_s" | "transferred_gib_per_s" => 3,
        "other_cpu_cores" => 2,
        _ => 0,
    }
}

fn print_summary(results: &[CaseResult]) {
    println!("== summary (medians of the completed runs)");
    println!(
        "{:<16} {:>5} {:>8} {:>6} {:>9} {:>9} {:>9} {:>6} {:>10} {:>6} {:>7} {:>7}",
        "case",
        "done",
        "total",
        "setup",
        "downtime",
        "sent",
        "RAM/t",
        "% raw",
        "sent/t",
        "% raw",
        "rounds",
        "others"
    );
    println!(
        "{:<16} {:>5} {:>8} {:>6} {:>9} {:>9} {:>9} {:>6} {:>10} {:>6} {:>7} {:>7}",
        "", "", "ms", "ms", "ms", "MiB", "GiB/s", "", "GiB/s", "", "", "cores"
    );
    for result in results {
        let cell = |key: &str| {
            let decimals = decimals(key);
            result
                .stats(key)
                .map_or("-".into(), |s| format!("{:.decimals$}", s.median))
        };
        println!(
            "{:<16} {:>5} {:>8} {:>6} {:>9} {:>9} {:>9} {:>6} {:>10} {:>6} {:>7} {:>7}",
            result.case.label(),
            format!("{}/{}", result.completed(), result.runs.len()),
            cell("total_ms"),
            cell("setup_ms"),
            cell("downtime_ms"),
            cell("transferred_mib"),
            cell("ram_gib_per_s"),
            cell("ram_pct_of_raw"),
            cell("transferred_gib_per_s"),
            cell("transferred_pct_of_raw"),
            cell("rounds"),
            cell("other_cpu_cores"),
        );
    }
    println!();
}

fn write_results(
    options: &Options,
    binary: &Path,
    raw: &[RawFigures],
    results: &[CaseResult],
) -> anyhow::Result<()> {
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
        "raw": raw.iter().map(RawFigures::to_json).collect::<Vec<_>>(),
        "cases": results.iter().map(|r| r.to_json(raw)).collect::<Vec<_>>(),
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

/// Runs the benchmark; `Ok(false)` if some migration did not complete.
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
    println!(
        "ferry migration benchmark: {} case(s), {} run(s) each{}; host: {} CPUs, load {}",
        cases.len(),
        options.runs,
        if options.quick { " (quick)" } else { "" },
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average().map_or("?".into(), |l| format!("{l:.2}")),
    );
    println!();

    println!(
        "== raw socket throughput: {} GiB from memory in {} MiB writes, reader on another thread",
        RAW_BYTES >> 30,
        RAW_IO_SIZE >> 20
    );
    let raw_runs = options.runs.max(RAW_MIN_RUNS);
    println!(
        "{:<9} {:>10} {:>10} {:>10}   ({raw_runs} runs; other processes' CPU in cores)",
        "GiB/s", "median", "min", "max"
    );
    let mut raw = Vec::new();
    for transport in Transport::ALL {
        let mut runs = Vec::new();
        let probe = CpuProbe::start(vec![std::process::id()]);
        for _ in 0..raw_runs {
            runs.push(
                raw_throughput(transport)
                    .with_context(|| format!("raw {} throughput", transport.name()))?,
            );
        }
        let other_cores = probe.and_then(|p| p.other_cores());
        let s = Stats::of(&runs).expect("at least one run");
        println!(
            "{:<9} {:>10.2} {:>10.2} {:>10.2}   others {}",
            transport.name(),
            s.median,
            s.min,
            s.max,
            other_cores.map_or("?".into(), |c| format!("{c:.2}")),
        );
        raw.push(RawFigures {
            transport,
            runs,
            other_cores,
        });
    }
    println!();

    println!("== ferry live migration (destinations start with -S)");
    let mut results = Vec::new();
    for case in cases {
        let raw_median = raw
            .iter()
            .find(|r| r.transport == case.transport)
            .and_then(RawFigures::median);
        let mut runs = Vec::new();
        for run in 1..=options.runs {
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| migrate_once(&binary, &case, run)));
            let record = match outcome {
                Ok(Ok(record)) => record,
                Ok(Err(error)) => Run::failed(run, format!("{error:#}")),
                Err(payload) => Run::failed(run, panic_message(payload.as_ref())),
            };
            println!(
                "{}  run {run}/{}: {}",
                case.label(),
                options.runs,
                record.one_line(raw_median)
            );
            runs.push(record);
        }
        let result = CaseResult {
            case,
            runs,
            raw: raw_median,
        };
        result.print();
        results.push(result);
    }

    print_summary(&results);
    write_results(&options, &binary, &raw, &results)?;
    println!("results: {}", options.out.display());
    Ok(results.iter().all(|r| r.completed() == r.runs.len()))
}
