//! One migration run: a source and a destination ferry, the migration, and what it measured.

use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry::guest::{placed_gaps, stop_blackout_us, GuestLine};
use ferry::harness::{Ferry, Qmp};
use serde_json::json;

use crate::case::{migration_uri, Case, Transport};
use crate::memory::MemoryProbe;
use crate::probe::{load_average, CpuProbe};
use crate::record::{Backing, Run};
use crate::timeline::Timeline;
use crate::{guest, CPUS, POLL};

/// How long after a completed migration the destination's guest may take to report its
/// blackout.
const BLACKOUT_DEADLINE: Duration = Duration::from_secs(2);
/// How long a VM may take to quit before it is killed.
const QUIT_DEADLINE: Duration = Duration::from_secs(20);

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

/// Waits until every vCPU of the guest on `vm` has swept its slices once.
pub(crate) fn wait_first_sweeps(vm: &Ferry, timeout: Duration) {
    for cpu in 0..CPUS {
        let line = format!("sweep 1 cpu={cpu}");
        vm.wait_line(&format!("the first sweep of cpu {cpu}"), timeout, |l| {
            l == line
        });
    }
}

/// Both VMs of a run; whatever happens, they quit (or are killed) when this goes.
pub(crate) struct Pair {
    pub(crate) vms: Vec<Ferry>,
    /// Their sockets, removed once they have quit.
    dir: tempfile::TempDir,
    /// With `$FERRY_BENCH_LOGS` set: where each VM's log and serial output go, as
    /// `PREFIX-NAME.log` (run the bench with `RUST_LOG=ferry=debug` to see the switchover's
    /// steps).
    logs: Option<PathBuf>,
}

impl Pair {
    pub(crate) fn new(name: &str) -> anyhow::Result<Self> {
        Ok(Self {
            vms: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("ferry-bench-")
                .tempdir()
                .context("a scratch directory")?,
            logs: std::env::var_os("FERRY_BENCH_LOGS").map(|dir| PathBuf::from(dir).join(name)),
        })
    }

    /// Starts the source, `CPUS` vCPUs and `mem_mib` of RAM with `append` for its guest (its
    /// log filtered by `log_filter`, else by `$RUST_LOG`), and waits until the guest is ready.
    pub(crate) fn start_source(
        &mut self,
        binary: &Path,
        mem_mib: u64,
        append: &str,
        log_filter: Option<&str>,
    ) -> &Ferry {
        let qmp = self.dir.path().join("source.qmp");
        let (cpus, mem) = (CPUS.to_string(), mem_mib.to_string());
        let args = ["-smp", &cpus, "-m", &mem, "-append", append];
        let vm = match log_filter {
            Some(filter) => Ferry::start_logging(binary, "source", &args, Some(&qmp), filter),
            None => Ferry::start(binary, "source", &args, Some(&qmp)),
        };
        vm.wait_ready();
        self.vms.push(vm);
        &self.vms[0]
    }

    /// Starts the destination, waiting for the migration on a `transport` URI; returns the
    /// URI and the destination's QMP once it says `inmigrate`.
    pub(crate) fn start_destination(
        &mut self,
        binary: &Path,
        mem_mib: u64,
        transport: Transport,
        extra: &[&str],
    ) -> anyhow::Result<(String, Qmp)> {
        let uri = migration_uri(transport, self.dir.path())?;
        let qmp = self.dir.path().join("destination.qmp");
        let (cpus, mem) = (CPUS.to_string(), mem_mib.to_string());
        let mut args = vec!["-smp", &cpus, "-m", &mem, "-incoming", &uri];
        args.extend_from_slice(extra);
        let vm = Ferry::start(binary, "destination", &args, Some(&qmp));
        let mut destination = vm.qmp();
        self.vms.push(vm);
        let status = destination.status();
        if status != "inmigrate" {
            bail!("the destination says {status}, not inmigrate");
        }
        Ok((uri, destination))
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

pub(crate) fn migrate_once(binary: &Path, case: &Case, run: usize) -> anyhow::Result<Run> {
    let append = case.workload.append();
    let mut pair = Pair::new(&format!("{}-run{run}", case.name()))?;
    let source_vm = pair.start_source(binary, case.mem_mib, &append, None);
    // The guest warns of what it lacks before it says it is ready.
    let ready = source_vm.guest_lines();
    if let Some(warning) = case
        .workload
        .option()
        .and_then(|option| guest::unknown_option(&ready, option))
    {
        return Ok(Run {
            run,
            status: "unsupported".into(),
            error: Some(format!("the guest says: {warning}")),
            ..Run::default()
        });
    }
    let blackout_reported = guest::unknown_option(&ready, "ferry.blackout").is_none()
        && guest::no_stop_flag(&ready).is_none();
    if case.workload.sweeps() {
        // Every page of RAM has been written once: round 0 has no zero pages to skip.
        wait_first_sweeps(source_vm, case.first_pass_timeout());
    }
    let options = case.destination_options();
    let (uri, mut destination) =
        pair.start_destination(binary, case.mem_mib, case.transport, options)?;

    let mut source = pair.vms[0].qmp();
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
    let source_lines_before = pair.vms[0].line_count();
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
        let lines = pair.vms[0].arrived_guest_lines_from(source_lines_seen);
        source_lines_seen += lines.len();
        // Ferry's own stops (the pause that turns dirty logging on) are not the host's stalls.
        let stalls = placed_gaps(&lines, asked)
            .into_iter()
            .filter(|g| !g.stopped);
        source_gaps.extend(stalls);
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
    if status == "completed" && blackout_reported {
        let waited = Instant::now();
        let mut lines: Vec<GuestLine> = Vec::new();
        while blackout.is_none() && waited.elapsed() < BLACKOUT_DEADLINE {
            std::thread::sleep(POLL);
            let new = pair.vms[1].arrived_guest_lines_from(lines.len());
            let stalls = placed_gaps(&new, asked).into_iter().filter(|g| !g.stopped);
            destination_gaps.extend(stalls);
            lines.extend(new.into_iter().map(|(_, line)| line));
            blackout = stop_blackout_us(&lines, CPUS);
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
    let measured_downtime_us = measured_downtime_us(&pair.vms[0].stderr());
    let destination_backing = destination_backing(&pair.vms[1].stderr());
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
        measured_downtime_us,
        destination_backing,
        blackout_us: blackout,
        destination_gaps,
        source_gaps,
        max_bandwidth: case.max_bandwidth(),
    })
}

/// The downtime in µs that the source's log gives in its `migration completed` line.
fn measured_downtime_us(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("migration completed"))?;
    log_field(line, "downtime_us")
}

/// How much of its RAM the destination backed ahead of the pages, and how fast: its log's
/// `guest RAM backed ahead of the pages` line.
fn destination_backing(log: &str) -> Option<Backing> {
    let line = log
        .lines()
        .find(|l| l.contains("guest RAM backed ahead of the pages"))?;
    Some(Backing {
        backed_mib: log_field(line, "backed_mib")?,
        wanted_mib: log_field(line, "wanted_mib")?,
        ms: log_field(line, "ms")?,
    })
}

/// The number a log line gives as `name=N` (the whole key: `ms` does not match `downtime_ms`).
fn log_field(line: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&key))?
        .parse()
        .ok()
}
