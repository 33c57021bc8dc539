//! Several sessions on one real VM: events to all of them, twenty clients at once, and a
//! client that dies mid-request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{names, Client};
use crate::common::{kvm_turn, Ferry};
use crate::support::{assert_no_panic, assert_quiet, assert_runs, connect, World};

/// How long the twenty clients keep at it.
const STORM: Duration = Duration::from_secs(4);

/// `events` alternate STOP, RESUME, STOP, ... (or starting with RESUME).
fn assert_alternating(events: &[Value], who: &str) {
    let names = names(events);
    for pair in names.windows(2) {
        assert!(
            matches!(
                (pair[0].as_str(), pair[1].as_str()),
                ("STOP", "RESUME") | ("RESUME", "STOP")
            ),
            "{who}: events out of step ({} then {}): {names:?}",
            pair[0],
            pair[1]
        );
    }
}

/// The guest's output agrees with `query-status`.
fn assert_consistent(vm: &Ferry, qmp: &mut Client, when: &str) -> String {
    let status = qmp.status();
    match status.as_str() {
        "running" => assert_runs(vm, when),
        "paused" => assert_quiet(vm, when),
        other => panic!("{when}: status {other}\n{}", vm.context()),
    }
    status
}

#[test]
fn events_reach_two_clients_at_once() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let vm = world.running("events", &[]);
    let mut a = connect(&vm, "a");
    let mut b = connect(&vm, "b");
    // A session that never sent a command is still negotiating: QEMU sends it no events.
    let mut silent = connect(&vm, "silent");
    a.ok("qmp_capabilities", json!({}));
    b.ok("qmp_capabilities", json!({}));

    for round in 0..3 {
        a.ok("stop", json!({}));
        let from_a = a.event("STOP", Duration::from_secs(5));
        let from_b = b.event("STOP", Duration::from_secs(5));
        assert_eq!(from_a, from_b, "round {round}: the same event for both");
        assert_eq!(b.status(), "paused");
        assert_quiet(&vm, &format!("round {round}, stopped by a"));

        b.ok("cont", json!({}));
        let from_b = b.event("RESUME", Duration::from_secs(5));
        let from_a = a.event("RESUME", Duration::from_secs(5));
        assert_eq!(from_a, from_b, "round {round}: the same event for both");
        assert_eq!(a.status(), "running");
        assert_runs(&vm, &format!("round {round}, resumed by b"));
    }
    for client in [&mut a, &mut b] {
        let more = client.events_for(Duration::from_millis(200));
        assert!(more.is_empty(), "unexpected events: {:?}", names(&more));
    }
    let heard = silent.events_for(Duration::from_millis(200));
    assert!(
        heard.is_empty(),
        "a session before its first command got events: {:?}",
        names(&heard)
    );
    // Once it speaks, it hears.
    silent.ok("qmp_capabilities", json!({}));
    a.ok("stop", json!({}));
    silent.event("STOP", Duration::from_secs(5));
    a.ok("cont", json!({}));
    silent.event("RESUME", Duration::from_secs(5));
    assert_no_panic(&vm);
}

#[test]
fn twenty_clients_stop_and_cont_at_once_and_the_vm_stays_consistent() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let mut vm = world.running("storm", &[]);
    let path = vm.qmp_path.clone().unwrap();

    // An observer that only listens, reading all the time so that it never lags.
    let mut observer = connect(&vm, "observer");
    observer.ok("qmp_capabilities", json!({}));
    let done = Arc::new(AtomicBool::new(false));
    let observing = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut events = Vec::new();
            let mut quiet_since = Instant::now();
            loop {
                match observer.try_recv(Duration::from_millis(50)) {
                    Ok(Some(message)) => {
                        assert!(message.get("event").is_some(), "observer: {message}");
                        events.push(message);
                        quiet_since = Instant::now();
                    }
                    Ok(None) => panic!("observer: the server closed the connection"),
                    Err(()) => {}
                }
                if done.load(Ordering::SeqCst) && quiet_since.elapsed() > Duration::from_millis(500)
                {
                    return events;
                }
            }
        })
    };

    let started = Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|n| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&path, &format!("c{n}"));
                let commands = ["stop", "query-status", "cont", "query-status"];
                let mut done = 0u32;
                let mut index = n;
                while started.elapsed() < STORM {
                    let command = commands[index % commands.len()];
                    index += 1 + n % 3;
                    let reply = client.execute(command, json!({}));
                    let value = reply
                        .get("return")
                        .unwrap_or_else(|| panic!("c{n}: {command} failed: {reply}"));
                    if command == "query-status" {
                        let status = value["status"].as_str().unwrap_or("?");
                        assert!(matches!(status, "running" | "paused"), "c{n}: {value}");
                        assert_eq!(value["running"], json!(status == "running"), "c{n}");
                    } else {
                        assert_eq!(*value, json!({}), "c{n}: {command}");
                    }
                    done += 1;
                }
                (done, client.take_events())
            })
        })
        .collect();
    let mut total = 0;
    for (n, client) in clients.into_iter().enumerate() {
        let (done, events) = client
            .join()
            .unwrap_or_else(|_| panic!("client c{n} failed\n{}", vm.context()));
        assert_alternating(&events, &format!("c{n}"));
        total += done;
    }
    done.store(true, Ordering::SeqCst);
    let events = observing.join().expect("the observer failed");
    assert!(vm.is_running(), "ferry died\n{}", vm.context());
    assert!(total >= 20 * 10, "only {total} commands in {STORM:?}");
    assert!(
        !events.is_empty(),
        "the observer saw no STOP/RESUME in {total} commands"
    );

    // The observer subscribed while the VM ran: STOP first, then strictly alternating, and
    // the last event says what the VM is now.
    assert_eq!(events[0]["event"], "STOP", "{:?}", names(&events));
    assert_alternating(&events, "observer");
    let mut qmp = connect(&vm, "after");
    let status = assert_consistent(&vm, &mut qmp, "after the storm");
    let last = events.last().unwrap()["event"].as_str().unwrap().to_owned();
    assert_eq!(
        (last.as_str(), status.as_str()),
        if status == "running" {
            ("RESUME", "running")
        } else {
            ("STOP", "paused")
        },
        "the last event the observer saw disagrees with query-status ({} events)",
        events.len()
    );

    // And it still obeys.
    qmp.ok("stop", json!({}));
    assert_consistent(&vm, &mut qmp, "stop after the storm");
    qmp.ok("cont", json!({}));
    assert_consistent(&vm, &mut qmp, "cont after the storm");
    let stderr = vm.stderr();
    assert!(
        !stderr.contains("did not answer") && !stderr.contains("events dropped"),
        "{stderr}"
    );
    assert_no_panic(&vm);
    eprintln!("storm: {total} commands, {} events", events.len());
}

#[test]
fn a_client_killed_mid_request_harms_nothing() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let mut vm = world.running("killed", &[]);
    let mut steady = connect(&vm, "steady");
    steady.ok("qmp_capabilities", json!({}));

    // Half a JSON object, then gone. Each kind of request, cut in several places.
    let requests = [
        r#"{"execute":"stop","id":"half"}"#.to_owned(),
        r#"{"execute":"quit"}"#.to_owned(),
        r#"{"execute":"system_reset","id":1}"#.to_owned(),
        format!(
            r#"{{"execute":"pmemsave","arguments":{{"val":0,"size":4096,"filename":"{}"}}}}"#,
            world.path("never.mem").display()
        ),
    ];
    for request in &requests {
        for cut in [1, request.len() / 2, request.len() - 1] {
            let mut client = connect(&vm, "half");
            client.send_raw(&request.as_bytes()[..cut]);
            drop(client);
        }
    }
    // A session that was subscribed, then died in the middle of its next request.
    let mut subscribed = connect(&vm, "subscribed");
    subscribed.ok("qmp_capabilities", json!({}));
    subscribed.send_raw(br#"{"execute":"stop","argu"#);
    drop(subscribed);
    std::thread::sleep(Duration::from_millis(300));

    assert!(vm.is_running(), "ferry died\n{}", vm.context());
    assert_eq!(steady.status(), "running");
    let events = steady.events_for(Duration::from_millis(200));
    assert!(events.is_empty(), "{:?}", names(&events));
    assert_runs(&vm, "after the killed clients");
    assert_eq!(
        steady.ok("query-migrate", json!({})),
        json!({"status": "none"})
    );

    // A whole request from a client gone before its reply: it takes effect (as in QEMU) or not
    // at all, and the VM agrees with what the others are told.
    let mut gone = connect(&vm, "gone");
    gone.send_raw(b"{\"execute\":\"stop\"}\n");
    drop(gone);
    std::thread::sleep(Duration::from_millis(300));
    let status = assert_consistent(&vm, &mut steady, "after a client left mid-stop");
    let events = steady.events_for(Duration::from_millis(200));
    let expected: &[&str] = if status == "paused" { &["STOP"] } else { &[] };
    assert_eq!(names(&events), expected);
    if status == "paused" {
        steady.ok("cont", json!({}));
        steady.event("RESUME", Duration::from_secs(5));
    }

    // The other sessions, old and new, work as before.
    steady.ok("stop", json!({}));
    steady.event("STOP", Duration::from_secs(5));
    let mut fresh = connect(&vm, "fresh");
    assert_eq!(fresh.status(), "paused");
    assert_quiet(&vm, "stopped after the killed clients");
    fresh.ok("cont", json!({}));
    steady.event("RESUME", Duration::from_secs(5));
    assert_runs(&vm, "resumed after the killed clients");
    assert_no_panic(&vm);
}
