//! How long `migrate_cancel` takes to give the source its guest back: a sweeping 1 GiB guest
//! starts migrating, and once round 0 has sent about a third of its RAM the bench cancels,
//! then times the source's answer and its `MIGRATION` event saying `canceled` (ferry sends it
//! once the vCPUs run), and takes from the guest the longest stretch in which a vCPU did not
//! run after the command (`ferry.blackout`: its `gap` lines, stretches over [`BLACKOUT_MS`]
//! ms, placed in time by when each line came and how long before it the guest says the gap
//! ended; a stall the command found under way counts from the command on), and the longest
//! during the pre-copy before it: on two cores shared by two sweeping vCPUs, two VMMs and the
//! bench, the scheduler alone keeps a vCPU off its core for several ms at times, cancel or
//! not. Placing matters: a guest slowed by the pre-copy queues up ticks to print, and the
//! `gap` line of a stall that ended before the command can come tens of ms after it. The
//! latency is the time to `canceled`, plus the stall after the command if it was longer than
//! any before it (then the cancel, not the host, may have held the guest). The first `tick`
//! line after `canceled` (every [`TICK_MS`] ms) shows the guest is alive. It also notes how
//! the destination ends: ferry's README says one that never got the commit exits with status
//! 1.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry::guest::{placed_gaps, GuestLine};
use ferry::harness::{Ferry, NoEvent};
use serde_json::{json, Value};

use crate::case::Transport;
use crate::migrate::{wait_first_sweeps, Pair};
use crate::stats::Stats;
use crate::CPUS;

const MEM_MIB: u64 = 1024;
const TICK_MS: u64 = 10;
const BLACKOUT_MS: u64 = 1;
/// How long after its first tick the guest's `gap` lines are awaited: a stall is reported as
/// soon as the vCPU runs again.
const GAP_SETTLE: Duration = Duration::from_millis(50);
/// Cancel once round 0 has sent this share of RAM.
const CANCEL_AT: f64 = 0.3;
const POLL: Duration = Duration::from_millis(2);
/// How long the source may take to say `canceled` and tick again.
const RESUME_DEADLINE: Duration = Duration::from_secs(10);
/// How long the destination may take to exit after the cancel.
const DESTINATION_DEADLINE: Duration = Duration::from_secs(10);

/// One cancelled migration.
#[derive(Debug, Default)]
pub struct CancelRun {
    pub run: usize,
    /// `canceled` when the source said so and its guest ticked again; `missed` when the
    /// migration ended before the bench could cancel it; otherwise what went wrong:
    /// `not-canceled` (it ended otherwise), `not-resumed` (no tick in time), `error`.
    pub status: String,
    pub error: Option<String>,
    /// Where the migration was when the bench sent `migrate_cancel`.
    pub at_ms: Option<f64>,
    pub at_transferred: Option<u64>,
    pub at_dirty_sync_count: Option<u64>,
    /// From sending `migrate_cancel` to its answer.
    pub reply_ms: Option<f64>,
    /// ... to the `MIGRATION` event that said `canceled` (`query-migrate` then says it too).
    pub canceled_ms: Option<f64>,
    /// ... to the first `tick` line that arrived after that: the guest runs on the source.
    pub resumed_ms: Option<f64>,
    /// The longest stretch after the command in which a vCPU did not run (of a stall under
    /// way at the command, the part after it; 0 when none was over [`BLACKOUT_MS`]).
    pub stall_ms: Option<f64>,
    /// The longest stall that ended during the pre-copy before the command: how long this
    /// host alone keeps a sweeping vCPU from running (two vCPUs, two VMMs and the bench on two
    /// cores), to read `stall_ms` against. Ferry's own stops are not counted.
    pub stall_before_ms: Option<f64>,
    /// `query-status` on the source afterwards.
    pub source_status: Option<String>,
    /// How the destination ended, and when (from the cancel).
    pub destination_exit: Option<String>,
    pub destination_exit_ms: Option<f64>,
    /// The source's log lines about the cancel and the dirty log ([`LOG_FILTER`]), and from
    /// their timestamps the time from "cancelled; telling the destination" (before the hang-up,
    /// which is bounded at 100 ms) to KVM's dirty log being off.
    pub source_log: Vec<String>,
    pub hang_up_and_log_off_ms: Option<f64>,
}

/// The source's log: ferry's info lines, and the cancel path's debug lines.
const LOG_FILTER: &str = "ferry=info,ferry::runtime::vmm=debug,ferry::migrate::source=debug,\
                          ferry::migrate::logging=debug";

/// Seconds since midnight of a log line's timestamp (`2026-01-01T12:34:56.789012Z ...`).
fn log_seconds(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// Waits for the guest's first `tick` line after line `skip`; the milliseconds since `since`.
fn wait_for_tick(vm: &Ferry, skip: usize, since: Instant) -> Result<f64, (&'static str, String)> {
    loop {
        let ticked = vm
            .lines_from(skip)
            .iter()
            .any(|l| matches!(GuestLine::parse(l), GuestLine::Tick { .. }));
        if ticked {
            return Ok(ms_since(since));
        }
        if since.elapsed() > RESUME_DEADLINE {
            return Err((
                "not-resumed",
                format!("canceled but no tick within {RESUME_DEADLINE:?}"),
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// The source's log lines of the cancel path, and the milliseconds from its start to the dirty
/// log being off.
fn cancel_log(stderr: &str) -> (Vec<String>, Option<f64>) {
    let lines: Vec<String> = stderr
        .lines()
        .filter(|l| {
            l.contains("migrate_cancel: stopping")
                || l.contains("cancelled; telling the destination")
                || l.contains("dirty logging")
                || l.contains("migration cancelled")
        })
        .map(str::to_owned)
        .collect();
    let at = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .and_then(|l| log_seconds(l))
    };
    let off = at("dirty logging off");
    let span = match (at("telling the destination"), off) {
        (Some(from), Some(to)) if to >= from => Some((to - from) * 1000.0),
        _ => None,
    };
    (lines, span)
}

impl CancelRun {
    pub fn failed(run: usize, error: String) -> Self {
        Self {
            run,
            status: "error".into(),
            error: Some(error),
            ..Self::default()
        }
    }

    pub fn canceled(&self) -> bool {
        self.status == "canceled"
    }

    /// Whether ferry misbehaved (a missed cancel is the bench's timing, not ferry's fault).
    pub fn is_failure(&self) -> bool {
        !matches!(self.status.as_str(), "canceled" | "missed")
    }

    /// When the source had its guest running again: `canceled`, and then the guest's longest
    /// stall after the command unless the host's scheduling alone stalled it as long before.
    pub fn latency_ms(&self) -> Option<f64> {
        let stall = self.stall_ms?;
        let held = if stall > self.stall_before_ms? {
            stall
        } else {
            0.0
        };
        Some(self.canceled_ms? + held)
    }

    pub fn one_line(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let mut line = format!(
            "{:<12} answer {} ms, canceled {} ms, guest stalled {} ms (before the cancel {} ms), \
             ticks {} ms; source {}, destination {} after {} ms; ferry's log: hang-up to dirty \
             log off {} ms",
            self.status,
            ms(self.reply_ms),
            ms(self.canceled_ms),
            ms(self.stall_ms),
            ms(self.stall_before_ms),
            ms(self.resumed_ms),
            self.source_status.as_deref().unwrap_or("?"),
            self.destination_exit.as_deref().unwrap_or("?"),
            ms(self.destination_exit_ms),
            ms(self.hang_up_and_log_off_ms),
        );
        if let (Some(at), Some(sent)) = (self.at_ms, self.at_transferred) {
            line += &format!(" (cancelled {at:.0} ms in, {} MiB sent)", sent >> 20);
        }
        if let Some(error) = &self.error {
            line += &format!("; {}", error.lines().next().unwrap_or_default());
        }
        line
    }

    pub fn to_json(&self) -> Value {
        json!({
            "run": self.run,
            "status": self.status,
            "error": self.error,
            "at_ms": self.at_ms,
            "at_transferred": self.at_transferred,
            "at_dirty_sync_count": self.at_dirty_sync_count,
            "reply_ms": self.reply_ms,
            "canceled_ms": self.canceled_ms,
            "resumed_ms": self.resumed_ms,
            "stall_ms": self.stall_ms,
            "stall_before_ms": self.stall_before_ms,
            "latency_ms": self.latency_ms(),
            "source_status": self.source_status,
            "destination_exit": self.destination_exit,
            "destination_exit_ms": self.destination_exit_ms,
            "source_log": self.source_log,
            "hang_up_and_dirty_log_off_ms": self.hang_up_and_log_off_ms,
        })
    }
}

/// The cancel runs of one transport.
pub struct CancelResult {
    pub transport: Transport,
    pub runs: Vec<CancelRun>,
}

impl CancelResult {
    fn stats(&self, pick: impl Fn(&CancelRun) -> Option<f64>) -> Option<Stats> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.canceled())
            .filter_map(pick)
            .collect();
        Stats::of(&values)
    }

    /// The latency: from `migrate_cancel` until the source said `canceled` and its guest ran.
    pub fn latency(&self) -> Option<Stats> {
        self.stats(CancelRun::latency_ms)
    }

    pub fn print_row(&self) {
        let cell = |s: Option<Stats>| {
            s.map_or(format!("{:>22}", "-"), |s| {
                format!("{:>8.1} {:>6.1} {:>6.1}", s.median, s.min, s.max)
            })
        };
        println!(
            "{:<5} {:>5}  {}  {}  {}  {}  {}  {}",
            self.transport.name(),
            format!(
                "{}/{}",
                self.runs.iter().filter(|r| r.canceled()).count(),
                self.runs.len()
            ),
            cell(self.stats(|r| r.reply_ms)),
            cell(self.stats(|r| r.canceled_ms)),
            cell(self.stats(|r| r.stall_ms)),
            cell(self.stats(|r| r.stall_before_ms)),
            cell(self.latency()),
            cell(self.stats(|r| r.hang_up_and_log_off_ms)),
        );
    }

    pub fn to_json(&self) -> Value {
        let stats = |s: Option<Stats>| s.map_or(Value::Null, Stats::to_json);
        json!({
            "transport": self.transport.name(),
            "guest": {
                "mem_mib": MEM_MIB,
                "smp": CPUS,
                "append": append(),
            },
            "cancel_at_share_of_ram": CANCEL_AT,
            "runs": self.runs.len(),
            "canceled_runs": self.runs.iter().filter(|r| r.canceled()).count(),
            "reply_ms": stats(self.stats(|r| r.reply_ms)),
            "canceled_ms": stats(self.stats(|r| r.canceled_ms)),
            "stall_ms": stats(self.stats(|r| r.stall_ms)),
            "stall_before_ms": stats(self.stats(|r| r.stall_before_ms)),
            "latency_ms": stats(self.latency()),
            "hang_up_and_dirty_log_off_ms": stats(self.stats(|r| r.hang_up_and_log_off_ms)),
            "results": self.runs.iter().map(CancelRun::to_json).collect::<Vec<_>>(),
        })
    }
}

pub fn print_header() {
    println!(
        "{:<5} {:>5}  {:>22}  {:>22}  {:>22}  {:>22}  {:>22}  {:>22}",
        "",
        "done",
        "answer (ms)",
        "says canceled (ms)",
        "guest stalled (ms)",
        "stalled before (ms)",
        "latency (ms)",
        "log: to dirty log off"
    );
    let stats = format!("{:>8} {:>6} {:>6}", "median", "min", "max");
    println!(
        "{:<5} {:>5}  {stats}  {stats}  {stats}  {stats}  {stats}  {stats}",
        "", ""
    );
}

fn append() -> String {
    format!("ferry.tick_ms={TICK_MS} ferry.blackout={BLACKOUT_MS}")
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

pub fn cancel_once(binary: &Path, transport: Transport, run: usize) -> anyhow::Result<CancelRun> {
    let mut pair = Pair::new(&format!("cancel-{}-run{run}", transport.name()))?;
    let source_vm = pair.start_source(binary, MEM_MIB, &append(), Some(LOG_FILTER));
    wait_first_sweeps(source_vm, Duration::from_secs(120));
    let (uri, _destination) = pair.start_destination(binary, MEM_MIB, transport, &[])?;

    let mut source = pair.vms[0].qmp();
    let lines_at_migrate = pair.vms[0].line_count();
    source.ok("migrate", Some(json!({"uri": uri})));
    let asked = Instant::now();
    let mut record = CancelRun {
        run,
        ..CancelRun::default()
    };
    // Wait for the middle of round 0.
    loop {
        let info = source.ok("query-migrate", None);
        let status = info["status"].as_str().unwrap_or("?");
        let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
        let total = info["ram"]["total"].as_u64().unwrap_or(u64::MAX);
        let rounds = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        if !matches!(status, "setup" | "active") {
            record.status = "missed".into();
            record.error = Some(format!("the migration ended ({status}) before the cancel"));
            return Ok(record);
        }
        if status == "active" && (sent as f64 >= total as f64 * CANCEL_AT || rounds > 1) {
            record.at_ms = Some(ms_since(asked));
            record.at_transferred = Some(sent);
            record.at_dirty_sync_count = Some(rounds);
            break;
        }
        if asked.elapsed() > Duration::from_secs(60) {
            bail!("round 0 did not get to {CANCEL_AT} of RAM within 60 s: {info}");
        }
        std::thread::sleep(POLL);
    }

    let cancelled = Instant::now();
    let reply = source.execute("migrate_cancel", None);
    record.reply_ms = Some(ms_since(cancelled));
    if reply.get("return").is_none() {
        bail!("migrate_cancel failed: {reply}");
    }
    // The MIGRATION event is read the moment it arrives; polling `query-migrate` would add up
    // to a poll interval to every figure.
    let ends_it = |e: &Value| {
        e["event"] == "MIGRATION"
            && !matches!(e["data"]["status"].as_str(), Some("setup" | "active"))
    };
    // One that came before the answer was read with it: it arrived by then.
    let came_with_the_answer = source.events.iter().any(ends_it);
    let ended = source.next_event(RESUME_DEADLINE, ends_it);
    let ended_ms = match record.reply_ms {
        Some(reply) if came_with_the_answer => reply,
        _ => ms_since(cancelled),
    };
    let outcome = match ended.as_ref().map(|e| e["data"]["status"].as_str()) {
        Ok(Some("canceled")) => {
            record.canceled_ms = Some(ended_ms);
            let seen_canceled_at_line = pair.vms[0].line_count();
            let status = source.ok("query-migrate", None)["status"].clone();
            if status == "canceled" {
                wait_for_tick(&pair.vms[0], seen_canceled_at_line, cancelled)
                    .map(|resumed| record.resumed_ms = Some(resumed))
            } else {
                Err((
                    "error",
                    format!("the MIGRATION event said canceled but query-migrate says {status}"),
                ))
            }
        }
        Ok(other) => Err((
            "not-canceled",
            format!("the migration ended {}", other.unwrap_or("?")),
        )),
        Err(NoEvent::TimedOut) => Err((
            "not-canceled",
            format!("no MIGRATION event ending the migration within {RESUME_DEADLINE:?}"),
        )),
        Err(NoEvent::Closed) => Err(("error", "the source closed QMP".to_owned())),
    };
    if outcome.is_ok() {
        std::thread::sleep(GAP_SETTLE);
        let gaps = placed_gaps(
            &pair.vms[0].arrived_guest_lines_from(lines_at_migrate),
            asked,
        );
        let cancel_ms = cancelled.duration_since(asked).as_secs_f64() * 1000.0;
        // The host's stalls during the pre-copy; ferry's own stops (the pause that turned
        // dirty logging on) are not the host's.
        let before = gaps
            .iter()
            .filter(|g| !g.stopped && (0.0..=cancel_ms).contains(&g.end_ms))
            .map(|g| g.us as f64 / 1000.0);
        record.stall_before_ms = Some(before.fold(0.0, f64::max));
        // A stall the command found under way counts from the command on.
        let after = gaps.iter().map(|g| g.ms_after(cancel_ms));
        record.stall_ms = Some(after.fold(0.0, f64::max));
    }
    record.source_status = Some(source.status());
    (record.source_log, record.hang_up_and_log_off_ms) = cancel_log(&pair.vms[0].stderr());
    let destination = &mut pair.vms[1];
    while destination.is_running() && cancelled.elapsed() < DESTINATION_DEADLINE {
        std::thread::sleep(POLL);
    }
    if destination.is_running() {
        record.destination_exit = Some("still running".into());
    } else {
        record.destination_exit_ms = Some(ms_since(cancelled));
        let status = destination.wait_exit(Duration::from_secs(1));
        record.destination_exit = Some(match status.code() {
            Some(code) => format!("exit {code}"),
            None => format!("{status}"),
        });
    }
    match outcome {
        Ok(()) if record.source_status.as_deref() == Some("running") => {
            record.status = "canceled".into()
        }
        Ok(()) => {
            record.status = "not-resumed".into();
            record.error = Some(format!(
                "the guest ticked, but query-status says {}",
                record.source_status.as_deref().unwrap_or("?")
            ));
        }
        Err((status, error)) => {
            record.status = status.into();
            record.error = Some(error);
        }
    }
    drop(pair);
    Ok(record)
}
