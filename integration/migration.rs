//! Live migration between real ferry processes over TCP and UNIX sockets: memory identity,
//! continuity, dirty rounds and many hops here; cancellation and failures, convergence, and
//! misbehaving peers in `migration/`.

mod common;

#[path = "migration/bad_source.rs"]
mod bad_source;
#[path = "migration/cancel.rs"]
mod cancel;
#[path = "migration/convergence.rs"]
mod convergence;
#[path = "migration/stalling_destination.rs"]
mod stalling_destination;

use std::path::{Path, PathBuf};
use std::sync::MutexGuard;
use std::time::Duration;

use common::{kvm_turn, scratch, Ferry, Transport};
use ferry::guest::pattern::check_dump;
use ferry::guest::{last_sweep, slices_by_cpu, ticks, GuestLine};
use serde_json::{json, Value};

const MEM_MIB: u64 = 64;
const GUEST_APPEND: &str = "ferry.tick_ms=50";
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// How a migration test starts: its turn on KVM and its world, or `None` where it is skipped.
fn kvm_world(transport: Transport) -> Option<(MutexGuard<'static, ()>, World)> {
    Some((kvm_turn()?, World::new(transport)))
}

/// One test's world: a scratch directory, and fresh URIs and socket paths in it.
struct World {
    dir: tempfile::TempDir,
    transport: Transport,
    counter: u32,
}

impl World {
    fn new(transport: Transport) -> Self {
        Self {
            dir: scratch(),
            transport,
            counter: 0,
        }
    }

    fn path(&mut self, stem: &str) -> PathBuf {
        self.counter += 1;
        self.dir.path().join(format!("{stem}{}", self.counter))
    }

    fn uri(&mut self) -> String {
        let socket = self.path("mig.sock");
        common::migration_uri(self.transport, &socket)
    }

    /// A source running the built-in guest (sweeping, ticking) with QMP.
    fn source(&mut self, smp: u32) -> Ferry {
        let qmp = self.path("src.qmp");
        let smp = smp.to_string();
        let mem = MEM_MIB.to_string();
        let vm = common::start(
            "source",
            &["-smp", &smp, "-m", &mem, "-append", GUEST_APPEND],
            Some(&qmp),
        );
        vm.wait_ready();
        vm
    }

    /// A source whose two vCPUs sweep 8 MiB each as fast as they can, a working set that
    /// outruns a slowed link; returned once both have swept 20 times.
    fn fast_dirtying_source(&mut self) -> Ferry {
        let qmp = self.path("src.qmp");
        let args = [
            "-smp",
            "2",
            "-m",
            "64",
            "-append",
            "ferry.tick_ms=50 ferry.sweep_mb=8",
        ];
        let source = common::start("source", &args, Some(&qmp));
        source.wait_line("sweeps", Duration::from_secs(30), |l| l == "sweep 20 cpu=1");
        source
    }

    /// A destination waiting at `uri`; `paused` adds `-S`.
    fn destination(&mut self, smp: u32, uri: &str, paused: bool) -> Ferry {
        self.destination_with(smp, uri, paused, &[])
    }

    /// A destination with `extra` options.
    fn destination_with(&mut self, smp: u32, uri: &str, paused: bool, extra: &[&str]) -> Ferry {
        let qmp = self.path("dst.qmp");
        let smp = smp.to_string();
        let mem = MEM_MIB.to_string();
        let mut args = vec!["-smp", &smp, "-m", &mem, "-incoming", uri];
        if paused {
            args.push("-S");
        }
        args.extend_from_slice(extra);
        let vm = common::start("destination", &args, Some(&qmp));
        let mut qmp = vm.qmp();
        assert_eq!(qmp.status(), "inmigrate");
        vm
    }
}

/// Migrates and waits for `completed` on the source. The destination completes before it
/// confirms, so from then on both sides' `query-status` is the settled one: tests check it once.
fn migrate(source: &Ferry, uri: &str) -> Value {
    let mut qmp = source.qmp();
    assert_eq!(qmp.ok("migrate", Some(json!({"uri": uri}))), json!({}));
    let info = qmp.wait_migration(&["completed", "failed", "canceled"], MIGRATION_TIMEOUT);
    assert_eq!(info["status"], "completed", "{info}\n{}", source.context());
    info
}

/// Turns the page connections (`multifd`) on or off for the next migration.
fn set_multifd(qmp: &mut ferry::harness::Qmp, on: bool) {
    let capabilities = json!([{"capability": "multifd", "state": on}]);
    qmp.ok(
        "migrate-set-capabilities",
        Some(json!({"capabilities": capabilities})),
    );
}

/// Dumps all guest RAM through QMP pmemsave.
fn dump(vm: &Ferry, path: &Path) -> Vec<u8> {
    vm.qmp().ok(
        "pmemsave",
        Some(json!({"val": 0, "size": MEM_MIB << 20, "filename": path})),
    );
    std::fs::read(path).unwrap()
}

/// Checks the sweep pattern of every vCPU's slices in `memory`.
fn assert_pattern(memory: &[u8], lines: &[GuestLine]) {
    let slices = slices_by_cpu(lines);
    assert!(!slices.is_empty(), "the guest printed no slices");
    for (cpu, slices) in slices {
        if let Err(error) = check_dump(memory, &slices) {
            panic!("cpu {cpu}: sweep pattern broken: {error}");
        }
    }
}

fn assert_no_tsc_errors(vm: &Ferry) {
    let bad: Vec<GuestLine> = vm
        .guest_lines()
        .into_iter()
        .filter(|l| matches!(l, GuestLine::TscBackwards { .. } | GuestLine::Fatal(_)))
        .collect();
    assert!(bad.is_empty(), "{}: {bad:?}", vm.name);
}

/// After a cancel or failure the source runs on: its guest keeps ticking.
fn assert_source_runs(source: &Ferry) {
    let mut qmp = source.qmp();
    assert_eq!(qmp.status(), "running", "{}", source.context());
    let seen = source.line_count();
    source.wait_line_from(
        seen,
        "a tick after the migration ended",
        Duration::from_secs(10),
        |l| l.starts_with("tick "),
    );
}

/// Whether a migration capped at a few MiB/s is well into its round 0: over 1 MiB sent, seconds
/// of it still to go.
fn in_round_zero(info: &Value) -> bool {
    info["status"] == "active" && info["ram"]["transferred"].as_u64().unwrap_or(0) > 1 << 20
}

/// A source migrating to a fresh destination under a 4 MiB/s cap, well into its round 0, which
/// then takes seconds: where a test steps in mid-stream.
fn migrating_in_round_zero(world: &mut World) -> (Ferry, Ferry) {
    let source = world.source(2);
    let destination = migrate_into_round_zero(world, &source);
    (source, destination)
}

/// Migrates `source` as [`migrating_in_round_zero`] does; returns the destination.
fn migrate_into_round_zero(world: &mut World, source: &Ferry) -> Ferry {
    let mut qmp = source.qmp();
    qmp.ok(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 4 << 20})),
    );
    let uri = world.uri();
    let destination = world.destination(2, &uri, false);
    qmp.ok("migrate", Some(json!({"uri": uri})));
    qmp.wait_migration_until("in round 0", Duration::from_secs(30), in_round_zero);
    destination
}

/// The destination's RAM holds the pattern the source's guest reported writing.
fn assert_migrated_memory(world: &mut World, source: &Ferry, destination: &Ferry) {
    let memory = dump(destination, &world.path("dst.mem"));
    assert_pattern(&memory, &source.guest_lines());
}

/// The source migrates a sweeping two-vCPU guest to a paused destination: both sides' RAM is
/// byte-identical, the pattern is intact, and the sweeps go on after `cont`. With `channels`,
/// the pages travel over that many connections of their own (`multifd`); without, `multifd` is
/// off and everything goes over the one connection. `destination_options` go to the
/// destination's command line.
fn memory_identity(transport: Transport, channels: Option<u64>, destination_options: &[&str]) {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new(transport);
    let source = world.source(2);
    source.wait_line("sweeps on cpu 1", Duration::from_secs(30), |l| {
        l == "sweep 3 cpu=1"
    });
    let uri = world.uri();
    let destination = world.destination_with(2, &uri, true, destination_options);
    let mut qmp = source.qmp();
    set_multifd(&mut qmp, channels.is_some());
    if let Some(channels) = channels {
        let parameters = json!({"multifd-channels": channels});
        qmp.ok("migrate-set-parameters", Some(parameters));
        let listed = qmp.ok("query-migrate-parameters", None);
        assert_eq!(listed["multifd-channels"], channels, "{listed}");
    }
    let info = migrate(&source, &uri);
    let log = destination.stderr();
    match channels {
        Some(channels) => {
            let accepted = format!("page connections accepted lanes={channels}");
            assert!(log.contains(&accepted), "{log}");
        }
        None => assert!(!log.contains("page connections accepted"), "{log}"),
    }
    if destination_options.contains(&"-mem-prealloc") {
        assert!(log.contains("guest RAM preallocated"), "{log}");
    }
    assert!(info["ram"]["transferred"].as_u64().unwrap() > 0, "{info}");
    assert!(info.get("downtime").is_some(), "{info}");
    assert_eq!(source.qmp().status(), "postmigrate");
    assert_eq!(destination.qmp().status(), "paused");
    let src_memory = dump(&source, &world.path("src.mem"));
    let dst_memory = dump(&destination, &world.path("dst.mem"));
    let source_lines = source.guest_lines();
    assert_pattern(&src_memory, &source_lines);
    if let Some(page) = (0..src_memory.len())
        .step_by(4096)
        .find(|p| src_memory[*p..p + 4096] != dst_memory[*p..p + 4096])
    {
        panic!("RAM differs at page {page:#x} after the migration");
    }
    let resumed_from: Vec<u64> = (0..2).map(|cpu| last_sweep(&source_lines, cpu)).collect();
    destination.qmp().ok("cont", None);
    for cpu in 0..2u32 {
        let next = resumed_from[cpu as usize] + 2;
        let what = format!("sweep {next} of cpu {cpu} on the destination");
        destination.wait_line(&what, Duration::from_secs(30), |l| {
            matches!(GuestLine::parse(l), GuestLine::Sweep { n, cpu: c } if c == cpu && n >= next)
        });
    }
    assert_no_tsc_errors(&destination);
}

/// A power button press the guest has not taken yet (its source is paused) goes with it: the
/// guest powers off on the destination once it runs there, not on the source.
#[test]
fn a_pending_power_button_press_migrates_with_the_guest() {
    let Some((_lock, mut world)) = kvm_world(Transport::Unix) else {
        return;
    };
    let source = world.source(2);
    let mut qmp = source.qmp();
    qmp.ok("stop", None);
    assert_eq!(qmp.ok("system_powerdown", None), json!({}));
    let uri = world.uri();
    let mut destination = world.destination(2, &uri, true);
    migrate(&source, &uri);
    assert_eq!(destination.qmp().status(), "paused");
    destination.qmp().ok("cont", None);
    destination.wait_line("the press", Duration::from_secs(30), |l| {
        l == "power button"
    });
    let status = destination.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", destination.context());
    assert!(
        !source.lines().iter().any(|l| l == "power button"),
        "the source's guest took the press\n{}",
        source.context()
    );
}

#[test]
fn memory_is_identical_after_migration_over_three_tcp_page_connections() {
    memory_identity(Transport::Tcp, Some(3), &[]);
}

#[test]
fn memory_is_identical_after_migration_over_two_unix_page_connections() {
    memory_identity(Transport::Unix, Some(2), &[]);
}

#[test]
fn memory_is_identical_after_migration_over_one_tcp_connection() {
    memory_identity(Transport::Tcp, None, &[]);
}

#[test]
fn memory_is_identical_after_migration_over_one_unix_connection() {
    memory_identity(Transport::Unix, None, &[]);
}

/// A destination whose RAM is all backed before the migration ends up with the source's RAM
/// all the same. (Whether it clears landed pages that a zero run names is the unit test
/// `a_zero_run_clears_landed_pages_of_preallocated_ram`'s: a source sends zero runs before any
/// page.)
#[test]
fn memory_is_identical_after_migration_to_a_preallocated_destination() {
    memory_identity(Transport::Unix, Some(2), &["-mem-prealloc"]);
}

/// A running destination takes over: its first tick follows the source's last on every vCPU,
/// and the TSC never goes backwards.
#[test]
fn ticks_continue_across_the_migration() {
    let Some((_lock, mut world)) = kvm_world(Transport::Tcp) else {
        return;
    };
    let source = world.source(2);
    source.wait_line("tick 5", Duration::from_secs(30), |l| l == "tick 5 cpu=1");
    let uri = world.uri();
    let destination = world.destination(2, &uri, false);
    migrate(&source, &uri);
    let mut dst_qmp = destination.qmp();
    assert_eq!(dst_qmp.status(), "running");
    let incoming = dst_qmp.ok("query-migrate", None);
    assert_eq!(incoming["status"], "completed", "{incoming}");
    for cpu in 0..2 {
        let before = ticks(&source.guest_lines(), cpu);
        let last = *before.last().expect("the source ticked");
        let what = format!("a tick of cpu {cpu} on the destination");
        destination.wait_line(
            &what,
            Duration::from_secs(30),
            |l| matches!(GuestLine::parse(l), GuestLine::Tick { cpu: c, .. } if c == cpu),
        );
        let after = ticks(&destination.guest_lines(), cpu);
        // The line the guest was printing when it paused begins on the source and ends on the
        // destination: then the destination's first line is the rest of that tick's line.
        let straddled = format!("tick {} cpu={cpu}", last + 1);
        let first_line = destination.lines().first().cloned().unwrap_or_default();
        let split_across = after[0] == last + 2 && straddled.ends_with(&first_line);
        assert!(
            after[0] == last + 1 || split_across,
            "cpu {cpu}: source ended at tick {last}, destination began at {} (its first line: \
             {first_line:?})",
            after[0]
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_no_tsc_errors(&destination);
}

/// A tiny downtime limit keeps the guest in pre-copy; raising it lets the migration converge.
#[test]
fn dirty_rounds_happen_and_converge() {
    let Some((_lock, mut world)) = kvm_world(Transport::Unix) else {
        return;
    };
    let source = world.source(2);
    let uri = world.uri();
    let destination = world.destination(2, &uri, true);
    let mut qmp = source.qmp();
    // No downtime at all is allowed, and the link is slow enough that the guest always dirties
    // pages during a round: pre-copy must go on round after round.
    let stuck = json!({"downtime-limit": 0, "max-bandwidth": 32 << 20});
    qmp.ok("migrate-set-parameters", Some(stuck));
    assert_eq!(
        qmp.ok("query-migrate-parameters", None)["downtime-limit"],
        0
    );
    qmp.ok("migrate", Some(json!({"uri": uri})));
    qmp.wait_migration_until("past 4 rounds", MIGRATION_TIMEOUT, |info| {
        assert!(
            matches!(info["status"].as_str(), Some("setup" | "active")),
            "{info}"
        );
        info["ram"]["dirty-sync-count"].as_u64().unwrap() >= 4
    });
    // While it runs: a second migrate and stop/cont are refused, and the destination's QMP
    // answers and shows the progress too.
    let again = qmp.error("migrate", Some(json!({"uri": uri})));
    assert!(again.contains("already in progress"), "{again}");
    assert!(qmp.error("stop", None).contains("migration is in progress"));
    let mut dst_qmp = destination.qmp();
    assert_eq!(dst_qmp.status(), "inmigrate");
    let incoming = dst_qmp.ok("query-migrate", None);
    assert_eq!(incoming["status"], "active", "{incoming}");
    assert!(
        incoming["ram"]["transferred"].as_u64().unwrap() > 0,
        "{incoming}"
    );
    assert!(
        incoming["ram"]["dirty-sync-count"].as_u64().unwrap() >= 2,
        "{incoming}"
    );
    let free = json!({"downtime-limit": 10000, "max-bandwidth": 0});
    qmp.ok("migrate-set-parameters", Some(free));
    let info = qmp.wait_migration(&["completed", "failed"], MIGRATION_TIMEOUT);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap() >= 4,
        "{info}"
    );
    assert_migrated_memory(&mut world, &source, &destination);
}

/// Twenty hops, each to a fresh destination, the pattern checked at every one.
#[test]
fn twenty_migrations_back_and_forth() {
    let Some((_lock, mut world)) = kvm_world(Transport::Unix) else {
        return;
    };
    let first = world.source(2);
    let mut current = first;
    let mut all_lines: Vec<GuestLine> = current.guest_lines();
    for hop in 0..20 {
        let transport = if hop % 2 == 0 {
            Transport::Unix
        } else {
            Transport::Tcp
        };
        world.transport = transport;
        let uri = world.uri();
        let next = world.destination(2, &uri, true);
        migrate(&current, &uri);
        all_lines.extend(
            current
                .guest_lines()
                .into_iter()
                .filter(|l| !matches!(l, GuestLine::Slice { .. })),
        );
        let memory = dump(&next, &world.path("hop.mem"));
        assert_pattern(&memory, &all_lines);
        next.qmp().ok("cont", None);
        current = next;
    }
    let seen = current.line_count();
    current.wait_line_from(
        seen,
        "a sweep after 20 hops",
        Duration::from_secs(30),
        |l| l.starts_with("sweep "),
    );
    assert_no_tsc_errors(&current);
}
