//! Every command on a running built-in guest, checked against what the guest and the host
//! really show.

use std::time::Duration;

use ferry::guest::pattern::check_dump;
use ferry::guest::{slices_by_cpu, GuestLine};
use serde_json::{json, Value};

use crate::client::names;
use crate::common::kvm_turn;
use crate::support::{
    assert_absent, assert_no_panic, assert_quiet, assert_runs, connect, last_sweep, settle, World,
    MEM_MIB,
};

/// What the README lists as supported, in QEMU's spelling.
const SUPPORTED: [&str; 20] = [
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-name",
    "query-status",
    "query-cpus-fast",
    "stop",
    "cont",
    "quit",
    "system_reset",
    "system_powerdown",
    "pmemsave",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "query-migrate",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
];

#[test]
fn greeting_version_name_and_the_command_list() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let vm = world.running("named", &["-name", "vm-under-test"]);
    let mut qmp = connect(&vm, "qmp");

    let parts: Vec<u64> = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse().expect("a numeric crate version"))
        .collect();
    let version = json!({
        "qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
        "package": format!("ferry {}", env!("CARGO_PKG_VERSION")),
    });
    assert_eq!(
        qmp.greeting,
        json!({"QMP": {"version": version, "capabilities": []}})
    );
    assert_eq!(qmp.ok("qmp_capabilities", json!({})), json!({}));
    assert_eq!(qmp.ok("query-version", json!({})), version);
    assert_eq!(
        qmp.ok("query-name", json!({})),
        json!({"name": "vm-under-test"})
    );

    // query-commands lists every supported command, each once, as {"name": ...}.
    let listed = qmp.ok("query-commands", json!({}));
    let listed: Vec<String> = listed
        .as_array()
        .unwrap_or_else(|| panic!("query-commands returns an array: {listed}"))
        .iter()
        .map(|entry| {
            assert_eq!(
                entry.as_object().map(|o| o.len()),
                Some(1),
                "an entry of query-commands has only 'name': {entry}"
            );
            entry["name"].as_str().expect("a name").to_owned()
        })
        .collect();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), listed.len(), "duplicates in {listed:?}");
    let missing: Vec<&str> = SUPPORTED
        .into_iter()
        .filter(|name| !listed.iter().any(|l| l == name))
        .collect();
    assert!(
        missing.is_empty(),
        "query-commands lacks {missing:?}: {listed:?}"
    );

    // Every listed command exists: an argument it does not take is a GenericError about that
    // argument (refused before anything runs), never CommandNotFound.
    for command in &listed {
        let (class, desc) = qmp.error(command, json!({"ferry-bogus": 1}));
        assert_eq!(class, "GenericError", "{command}: {desc}");
        assert!(
            desc.contains("'ferry-bogus' is unexpected"),
            "{command}: {desc}"
        );
    }
    let (class, desc) = qmp.error("human-monitor-command", json!({}));
    assert_eq!(class, "CommandNotFound", "{desc}");
    assert_eq!(desc, "The command human-monitor-command has not been found");

    // None of that touched the guest.
    assert_eq!(qmp.status(), "running");
    assert_runs(&vm, "after the command list");
    assert!(qmp.take_events().is_empty());
    assert_no_panic(&vm);
}

#[test]
fn stop_pauses_the_guest_and_cont_resumes_it() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let vm = world.running("stopcont", &[]);
    let mut qmp = connect(&vm, "qmp");
    assert_eq!(qmp.status(), "running");
    assert_eq!(
        qmp.ok("query-status", json!({})),
        json!({"status": "running", "running": true, "singlestep": false})
    );

    for round in 0..3 {
        assert_eq!(qmp.ok("stop", json!({})), json!({}));
        let stop = qmp.event("STOP", Duration::from_secs(5));
        assert_timestamp(&stop);
        assert!(stop.get("data").is_none(), "STOP has no data: {stop}");
        assert_eq!(
            qmp.ok("query-status", json!({})),
            json!({"status": "paused", "running": false, "singlestep": false})
        );
        assert_quiet(&vm, &format!("round {round}, after stop"));

        // Stopping a stopped VM succeeds and announces nothing, as in QEMU.
        assert_eq!(qmp.ok("stop", json!({})), json!({}));
        let extra = qmp.events_for(Duration::from_millis(200));
        assert!(extra.is_empty(), "a second stop emitted {extra:?}");
        assert_eq!(qmp.status(), "paused");

        assert_eq!(qmp.ok("cont", json!({})), json!({}));
        let resume = qmp.event("RESUME", Duration::from_secs(5));
        assert_timestamp(&resume);
        assert_eq!(qmp.status(), "running");
        assert_runs(&vm, &format!("round {round}, after cont"));
    }
    // cont on a running VM succeeds, announces nothing (QEMU's vm_start returns early) and
    // leaves it running.
    assert_eq!(qmp.ok("cont", json!({})), json!({}));
    let extra = qmp.events_for(Duration::from_millis(200));
    assert!(extra.is_empty(), "a second cont emitted {extra:?}");
    assert_eq!(qmp.status(), "running");
    assert_runs(&vm, "after a second cont");
    assert!(
        ticks_count_up_by_one(&vm.guest_lines()),
        "tick lines skip or repeat across stop/cont\n{}",
        vm.context()
    );
    assert_no_panic(&vm);
}

/// QEMU emits STOP (RESUME) while it runs `stop` (`cont`), before the command's reply, and
/// the README's transcript shows them in that order: a client that reads up to the reply has
/// the event already.
#[test]
fn stop_and_cont_events_precede_their_replies_as_in_qemu() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let vm = world.running("order", &[]);
    let mut qmp = connect(&vm, "qmp");
    qmp.ok("qmp_capabilities", json!({}));
    let mut orders = Vec::new();
    for _ in 0..10 {
        for (command, event) in [("stop", "STOP"), ("cont", "RESUME")] {
            let start = qmp.transcript.len();
            qmp.ok(command, json!({}));
            qmp.event(event, Duration::from_secs(5));
            let order: Vec<String> = qmp.transcript[start..]
                .iter()
                .map(|m| match m.get("event") {
                    Some(name) => name.as_str().unwrap_or("?").to_owned(),
                    None => "reply".to_owned(),
                })
                .collect();
            orders.push(format!("{command}: {}", order.join(" then ")));
        }
    }
    let late: Vec<&String> = orders
        .iter()
        .filter(|o| o.ends_with("reply then STOP") || o.ends_with("reply then RESUME"))
        .collect();
    assert!(
        late.is_empty(),
        "{} of {} commands had their event after the reply (QEMU sends it before): {orders:?}",
        late.len(),
        orders.len()
    );
}

#[test]
fn query_cpus_fast_names_the_vcpu_threads() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let vm = world.running("cpus", &[]);
    let mut qmp = connect(&vm, "qmp");
    let cpus = qmp.ok("query-cpus-fast", json!({}));
    let cpus = cpus.as_array().expect("an array");
    assert_eq!(cpus.len(), 2, "{cpus:?}");
    let mut tids = Vec::new();
    for (index, cpu) in cpus.iter().enumerate() {
        assert_eq!(cpu["cpu-index"], index, "{cpu}");
        assert_eq!(cpu["target"], "x86_64", "{cpu}");
        assert_eq!(
            cpu["qom-path"],
            format!("/machine/unattached/device[{index}]"),
            "{cpu}"
        );
        for prop in ["socket-id", "core-id", "thread-id"] {
            assert!(cpu["props"][prop].is_u64(), "props.{prop}: {cpu}");
        }
        let tid = cpu["thread-id"]
            .as_i64()
            .unwrap_or_else(|| panic!("thread-id is an integer: {cpu}"));
        assert_ne!(tid, i64::from(vm.pid()), "the main thread is no vCPU");
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", vm.pid()))
            .unwrap_or_else(|e| panic!("thread {tid} is not a thread of ferry {}: {e}", vm.pid()));
        assert_eq!(comm.trim_end(), format!("vcpu {index}"), "thread {tid}");
        tids.push(tid);
    }
    assert_ne!(tids[0], tids[1]);
    // The same answer while paused.
    qmp.ok("stop", json!({}));
    let paused: Vec<i64> = qmp
        .ok("query-cpus-fast", json!({}))
        .as_array()
        .expect("an array")
        .iter()
        .map(|cpu| cpu["thread-id"].as_i64().unwrap())
        .collect();
    assert_eq!(paused, tids);
    qmp.ok("cont", json!({}));
    assert_runs(&vm, "after query-cpus-fast");
}

#[test]
fn pmemsave_writes_exactly_the_guest_memory_asked_for() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let vm = world.running("pmemsave", &[]);
    let mut qmp = connect(&vm, "qmp");
    for cpu in 0..2 {
        let sweep = format!("sweep 2 cpu={cpu}");
        vm.wait_line(&sweep, Duration::from_secs(60), |l| l == sweep);
    }
    let ram = MEM_MIB << 20;

    // While the guest runs: the size is exact (the content moves).
    let running = world.path("running.mem");
    let size = 3 * 4096 + 123;
    let saved = qmp.ok(
        "pmemsave",
        json!({"val": 0x40_0000, "size": size, "filename": running}),
    );
    assert_eq!(saved, json!({}));
    assert_eq!(std::fs::metadata(&running).unwrap().len(), size);
    // An existing file is replaced, not appended to or left longer.
    std::fs::write(&running, vec![0xa5u8; 1 << 20]).unwrap();
    qmp.ok(
        "pmemsave",
        json!({"val": 0x40_0000, "size": 4096, "filename": running}),
    );
    assert_eq!(std::fs::metadata(&running).unwrap().len(), 4096);
    // An empty range writes an empty file, as QEMU does.
    let empty = world.path("empty.mem");
    qmp.ok(
        "pmemsave",
        json!({"val": 0x1000, "size": 0, "filename": empty}),
    );
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

    // Paused: the dump holds the sweep pattern, and smaller dumps agree with it byte for byte.
    qmp.ok("stop", json!({}));
    settle(&vm);
    let lines = vm.guest_lines();
    let whole_path = world.path("whole.mem");
    qmp.ok(
        "pmemsave",
        json!({"val": 0, "size": ram, "filename": whole_path}),
    );
    let whole = std::fs::read(&whole_path).unwrap();
    assert_eq!(whole.len() as u64, ram);
    let slices = slices_by_cpu(&lines);
    assert_eq!(slices.len(), 2, "{slices:?}");
    for (cpu, slices) in &slices {
        if let Err(error) = check_dump(&whole, slices) {
            panic!("cpu {cpu}: the dump breaks the sweep pattern: {error}");
        }
    }
    let first = slices[&0][0].start;
    assert_eq!(first, 0x40_0000, "cpu 0's first slice: {slices:?}");
    let n = last_sweep(&vm, 0);
    let byte = whole[first as usize];
    // After pass N every page holds N (mod 256); pass N+1 may have begun, or ended unprinted.
    assert!(
        byte == n as u8 || byte == (n + 1) as u8,
        "page {first:#x} holds {byte} but cpu 0 printed sweep {n}"
    );
    let ranges = [
        (first, 4096),
        (slices[&1][0].start - 2048, 4096),
        (0x1000, 0x20_0000),
        (ram - 4096, 4096),
    ];
    for (addr, size) in ranges {
        let path = world.path("part.mem");
        qmp.ok(
            "pmemsave",
            json!({"val": addr, "size": size, "filename": path}),
        );
        let part = std::fs::read(&path).unwrap();
        assert_eq!(part.len() as u64, size, "{addr:#x}+{size:#x}");
        assert!(
            part[..] == whole[addr as usize..(addr + size) as usize],
            "{addr:#x}+{size:#x} differs from the same bytes of the whole dump"
        );
    }
    // Nothing changes in RAM while the vCPUs are stopped.
    let again_path = world.path("again.mem");
    qmp.ok(
        "pmemsave",
        json!({"val": 0, "size": ram, "filename": again_path}),
    );
    let again = std::fs::read(&again_path).unwrap();
    if let Some(page) = (0..whole.len())
        .step_by(4096)
        .find(|p| whole[*p..p + 4096] != again[*p..p + 4096])
    {
        panic!("RAM page {page:#x} changed while the VM was stopped");
    }

    // Ranges that are not all RAM are refused with a reason, and no file is written.
    let refusals: [(Value, &[&str]); 7] = [
        (json!(ram - 4096), &["not guest RAM", "0x4000000"]),
        (json!(ram), &["not guest RAM", "0x4000000"]),
        (json!(1u64 << 40), &["not guest RAM", "0x10000000000"]),
        (json!(u64::MAX), &["size"]),
        (json!(-1), &["'val'", "negative"]),
        (json!("0"), &["'val'", "integer"]),
        (json!(1.5), &["'val'", "integer"]),
    ];
    for (val, expected) in refusals {
        let path = world.path("refused.mem");
        let (class, desc) = qmp.error(
            "pmemsave",
            json!({"val": val, "size": 8192, "filename": path}),
        );
        assert_eq!(class, "GenericError", "{val}: {desc}");
        for part in expected {
            assert!(desc.contains(part), "val {val}: {desc:?} lacks {part:?}");
        }
        assert_absent(&path, &format!("pmemsave at {val}"));
    }
    // A size that would take the range past RAM (and past 2^64) is refused too.
    for (val, size) in [(0u64, u64::MAX), (4096, u64::MAX), (0, ram + 1)] {
        let path = world.path("refused.mem");
        let (_, desc) = qmp.error(
            "pmemsave",
            json!({"val": val, "size": size, "filename": path}),
        );
        assert!(
            desc.contains("not guest RAM") || desc.contains("address space"),
            "{val:#x}+{size:#x}: {desc}"
        );
        assert_absent(&path, &format!("pmemsave {val:#x}+{size:#x}"));
    }
    // A refused range leaves a file already at the path alone.
    let precious = world.path("precious");
    std::fs::write(&precious, b"keep me").unwrap();
    qmp.error(
        "pmemsave",
        json!({"val": ram - 4096, "size": 8192, "filename": precious}),
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    let (_, desc) = qmp.error(
        "pmemsave",
        json!({"val": 0, "size": 4096, "filename": "/nonexistent-dir/x.mem"}),
    );
    assert!(desc.contains("/nonexistent-dir/x.mem"), "{desc}");
    let (_, desc) = qmp.error("pmemsave", json!({"val": 0, "size": 4096}));
    assert!(desc.contains("'filename' is missing"), "{desc}");

    // The refusals left the VM as it was.
    assert_eq!(qmp.status(), "paused");
    assert_quiet(&vm, "after the refused pmemsaves");
    qmp.ok("cont", json!({}));
    assert_runs(&vm, "after pmemsave");
    assert_no_panic(&vm);
}

#[test]
fn migration_queries_parameters_and_refusals() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let vm = world.running("params", &[]);
    let mut qmp = connect(&vm, "qmp");

    assert_eq!(
        qmp.ok("query-migrate", json!({})),
        json!({"status": "none"})
    );
    assert_eq!(parameters(&mut qmp), (300, 0));
    assert_eq!(
        qmp.ok(
            "migrate-set-parameters",
            json!({"downtime-limit": 1234, "max-bandwidth": 1 << 20})
        ),
        json!({})
    );
    assert_eq!(parameters(&mut qmp), (1234, 1 << 20));
    // One at a time leaves the other alone.
    qmp.ok("migrate-set-parameters", json!({"max-bandwidth": 0}));
    qmp.ok(
        "migrate-set-parameters",
        json!({"downtime-limit": 2_000_000}),
    );
    assert_eq!(parameters(&mut qmp), (2_000_000, 0));
    qmp.ok("migrate-set-parameters", json!({"downtime-limit": 300}));
    let bad: [(Value, &str); 6] = [
        (json!({"downtime-limit": 2_000_001}), "downtime-limit"),
        (json!({"downtime-limit": -1}), "negative"),
        (json!({"downtime-limit": "300"}), "integer"),
        (json!({"max-bandwidth": -5}), "negative"),
        (json!({"max-bandwidth": 1.5}), "integer"),
        (
            json!({"xbzrle-cache-size": 1}),
            "'xbzrle-cache-size' is unexpected",
        ),
    ];
    for (arguments, expected) in bad {
        let (class, desc) = qmp.error("migrate-set-parameters", arguments.clone());
        assert_eq!(class, "GenericError");
        assert!(desc.contains(expected), "{arguments}: {desc}");
    }
    // A refused update changes nothing, not even the valid half of it.
    let (_, desc) = qmp.error(
        "migrate-set-parameters",
        json!({"max-bandwidth": 77, "downtime-limit": 9_000_000}),
    );
    assert!(desc.contains("downtime-limit"), "{desc}");
    assert_eq!(parameters(&mut qmp), (300, 0));

    // Malformed URIs are refused at once, and no migration starts.
    for (uri, expected) in [
        ("tcp:127.0.0.1", "missing :PORT"),
        ("tcp:127.0.0.1:0", "port"),
        ("tcp:127.0.0.1:99999", "port"),
        ("ftp://example", "unknown transport"),
        ("unix:", "empty socket path"),
        ("", "'uri' is empty"),
    ] {
        let (class, desc) = qmp.error("migrate", json!({"uri": uri}));
        assert_eq!(class, "GenericError", "{uri}: {desc}");
        assert!(desc.contains(expected), "{uri:?}: {desc}");
    }
    let (_, desc) = qmp.error("migrate", json!({}));
    assert!(desc.contains("'uri' is missing"), "{desc}");
    assert_eq!(
        qmp.ok("query-migrate", json!({})),
        json!({"status": "none"})
    );

    // migrate_cancel with nothing to cancel.
    assert_eq!(qmp.ok("migrate_cancel", json!({})), json!({}));
    assert_eq!(
        qmp.ok("query-migrate", json!({})),
        json!({"status": "none"})
    );
    // migrate-incoming needs -incoming defer.
    let (_, desc) = qmp.error("migrate-incoming", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(desc.contains("-incoming defer"), "{desc}");

    assert_eq!(qmp.status(), "running");
    let events = qmp.events_for(Duration::from_millis(200));
    assert!(events.is_empty(), "{:?}", names(&events));
    assert_runs(&vm, "after the refusals");
    assert_no_panic(&vm);
}

/// `query-migrate-parameters`' `downtime-limit` and `max-bandwidth` (other parameters may be
/// listed too).
fn parameters(qmp: &mut crate::client::Client) -> (u64, u64) {
    let all = qmp.ok("query-migrate-parameters", json!({}));
    let field = |name: &str| {
        all[name]
            .as_u64()
            .unwrap_or_else(|| panic!("query-migrate-parameters lacks {name}: {all}"))
    };
    (field("downtime-limit"), field("max-bandwidth"))
}

fn assert_timestamp(event: &Value) {
    let seconds = event["timestamp"]["seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("no timestamp: {event}"));
    let micros = event["timestamp"]["microseconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("no timestamp: {event}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        seconds <= now && seconds + 60 >= now,
        "timestamp {seconds} is not now ({now}): {event}"
    );
    assert!(micros < 1_000_000, "{event}");
}

/// Each vCPU's tick lines count 1, 2, 3, ... (the guest prints every count it reaches; a
/// pause only delays them).
fn ticks_count_up_by_one(lines: &[GuestLine]) -> bool {
    (0..2).all(|cpu| {
        let ticks: Vec<u64> = lines
            .iter()
            .filter_map(|l| match l {
                GuestLine::Tick { n, cpu: c } if *c == cpu => Some(*n),
                _ => None,
            })
            .collect();
        ticks.first() == Some(&1) && ticks.windows(2).all(|w| w[1] == w[0] + 1)
    })
}
