//! How a VM begins (`-S`, `prelaunch`, `cont`) and ends (`quit`, `system_reset`,
//! `system_powerdown`, a guest reset or power-off), as QMP clients see it.

use std::time::Duration;

use serde_json::json;

use crate::client::{names, Client};
use crate::common::{kvm_turn, Ferry};
use crate::support::{
    assert_clean_exit, assert_no_panic, assert_quiet, assert_runs, connect, World, BOOT, QUIET,
};

/// Where `name` stands in the messages `client` received.
fn position(client: &Client, name: &str) -> usize {
    client
        .transcript
        .iter()
        .position(|m| m["event"] == name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", client.transcript))
}

#[test]
fn prelaunch_runs_nothing_until_cont() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let vm = world.start("prelaunch", &["-S"]);
    let mut qmp = connect(&vm, "qmp");
    assert_eq!(qmp.ok("qmp_capabilities", json!({})), json!({}));
    // No -name: QEMU answers an empty object.
    assert_eq!(qmp.ok("query-name", json!({})), json!({}));
    assert_eq!(
        qmp.ok("query-status", json!({})),
        json!({"status": "prelaunch", "running": false, "singlestep": false})
    );
    std::thread::sleep(QUIET);
    assert_eq!(
        vm.line_count(),
        0,
        "the guest ran before cont: {:?}",
        vm.lines()
    );
    // The vCPU threads exist already.
    let cpus = qmp.ok("query-cpus-fast", json!({}));
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");
    assert_eq!(
        qmp.ok("query-migrate", json!({})),
        json!({"status": "none"})
    );
    assert_eq!(qmp.ok("cont", json!({})), json!({}));
    qmp.event("RESUME", Duration::from_secs(5));
    assert_eq!(
        qmp.ok("query-status", json!({})),
        json!({"status": "running", "running": true, "singlestep": false})
    );
    vm.wait_line("guest 'ready'", BOOT, |l| l == "ready");
    assert!(
        vm.lines()[0].starts_with("ferry-guest: cpus=2 "),
        "{}",
        vm.context()
    );
    assert_runs(&vm, "after cont from prelaunch");
    assert_eq!(qmp.ok("stop", json!({})), json!({}));
    qmp.event("STOP", Duration::from_secs(5));
    assert_quiet(&vm, "stopped after prelaunch");
    assert_no_panic(&vm);
}

#[test]
fn quit_reaches_two_clients_and_ferry_exits_cleanly() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let mut vm = world.running("quit", &[]);
    let mut quitter = connect(&vm, "quitter");
    let mut watcher = connect(&vm, "watcher");
    quitter.ok("qmp_capabilities", json!({}));
    watcher.ok("qmp_capabilities", json!({}));

    let reply = quitter.request(&json!({"execute": "quit", "id": "bye"}));
    assert_eq!(reply, json!({"return": {}, "id": "bye"}));
    let expected = json!({"guest": false, "reason": "host-qmp-quit"});
    for client in [&mut quitter, &mut watcher] {
        let shutdown = client.event("SHUTDOWN", Duration::from_secs(5));
        assert_eq!(shutdown["data"], expected, "{shutdown}");
        let rest = client.until_closed(Duration::from_secs(10));
        assert!(rest.is_empty(), "after SHUTDOWN: {rest:?}");
    }
    assert_clean_exit(&mut vm, "quit");
    // Nobody listens any more.
    let path = vm.qmp_path.clone().unwrap();
    assert!(std::os::unix::net::UnixStream::connect(path).is_err());
}

#[test]
fn system_reset_announces_reset_and_shutdown_then_ferry_exits() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let mut vm = world.running("reset", &[]);
    let mut qmp = connect(&vm, "qmp");
    let mut watcher = connect(&vm, "watcher");
    watcher.ok("qmp_capabilities", json!({}));
    assert_eq!(qmp.ok("system_reset", json!({})), json!({}));
    let data = json!({"guest": false, "reason": "host-qmp-system-reset"});
    for client in [&mut qmp, &mut watcher] {
        let reset = client.event("RESET", Duration::from_secs(5));
        assert_eq!(reset["data"], data, "{reset}");
        let shutdown = client.event("SHUTDOWN", Duration::from_secs(5));
        assert_eq!(shutdown["data"], data, "{shutdown}");
        assert!(
            position(client, "RESET") < position(client, "SHUTDOWN"),
            "{:?}",
            client.transcript
        );
        client.until_closed(Duration::from_secs(10));
    }
    assert_clean_exit(&mut vm, "system_reset");
}

/// A guest reset (the i8042 reset line, or a triple fault) ends the VM as QEMU's `-no-reboot`
/// does: SHUTDOWN with `guest: true` and reason `guest-reset`, no RESET. A guest's power-off
/// (ACPI's sleep control register, as Linux writes it) ends it with reason `guest-shutdown`.
#[test]
fn a_guest_reset_or_power_off_is_announced_as_a_guest_shutdown() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    for (action, said, reason) in [
        ("reset", "resetting", "guest-reset"),
        ("triplefault", "triple-faulting", "guest-reset"),
        (
            "poweroff",
            "powering off through port 0x600",
            "guest-shutdown",
        ),
    ] {
        // -S, so that the clients are connected and subscribed before the guest can reset.
        let append = format!("ferry.run={action}");
        let mut vm = world.start_with(action, &append, &["-S"]);
        let mut qmp = connect(&vm, "qmp");
        let mut watcher = connect(&vm, "watcher");
        watcher.ok("qmp_capabilities", json!({}));
        assert_eq!(qmp.status(), "prelaunch");
        assert_eq!(qmp.ok("cont", json!({})), json!({}));
        let expected = json!({"guest": true, "reason": reason});
        for client in [&mut qmp, &mut watcher] {
            client.event("RESUME", Duration::from_secs(5));
            let shutdown = client.event("SHUTDOWN", BOOT);
            assert_eq!(shutdown["data"], expected, "{action}: {shutdown}");
            let rest = client.until_closed(Duration::from_secs(10));
            let mut events = client.take_events();
            events.extend(rest.into_iter().filter(|m| m.get("event").is_some()));
            assert!(
                events.is_empty(),
                "{action}: other events: {:?}",
                names(&events)
            );
            assert!(
                position(client, "RESUME") < position(client, "SHUTDOWN"),
                "{action}: {:?}",
                client.transcript
            );
        }
        assert_clean_exit(&mut vm, action);
        assert!(
            vm.lines().iter().any(|l| l == said),
            "{action}: the guest did not say '{said}'\n{}",
            vm.context()
        );
    }
}

/// `system_powerdown` presses the ACPI power button, as in QEMU: POWERDOWN at once, and a guest
/// that answers the button by powering off (the built-in one does, as Linux with logind does)
/// ends the VM with SHUTDOWN `guest-shutdown`. A paused guest sees the press when it runs.
#[test]
fn system_powerdown_presses_the_power_button() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let mut vm = world.running("powerdown", &[]);
    let mut qmp = connect(&vm, "qmp");
    assert_eq!(qmp.ok("qmp_capabilities", json!({})), json!({}));
    assert_eq!(qmp.ok("stop", json!({})), json!({}));
    qmp.event("STOP", Duration::from_secs(5));
    assert_eq!(qmp.ok("system_powerdown", json!({})), json!({}));
    qmp.event("POWERDOWN", Duration::from_secs(5));
    std::thread::sleep(QUIET);
    assert_eq!(qmp.status(), "paused");
    assert!(
        !vm.lines().iter().any(|l| l == "power button"),
        "a paused guest saw the button\n{}",
        vm.context()
    );
    assert_eq!(qmp.ok("cont", json!({})), json!({}));
    assert_powered_off_by_the_button(&mut qmp, &mut vm, "system_powerdown");
}

/// The guest took the press and powered off: SHUTDOWN `guest-shutdown`, a clean exit, and the
/// guest's own lines in that order.
fn assert_powered_off_by_the_button(qmp: &mut Client, vm: &mut Ferry, what: &str) {
    let shutdown = qmp.event("SHUTDOWN", BOOT);
    assert_eq!(
        shutdown["data"],
        json!({"guest": true, "reason": "guest-shutdown"}),
        "{what}: {shutdown}"
    );
    qmp.until_closed(Duration::from_secs(10));
    assert_clean_exit(vm, what);
    let lines = vm.lines();
    let pressed = lines.iter().position(|l| l == "power button");
    let powered_off = lines
        .iter()
        .position(|l| l == "powering off through port 0x600");
    assert!(
        matches!((pressed, powered_off), (Some(p), Some(o)) if p < o),
        "{what}: the guest did not answer the button\n{}",
        vm.context()
    );
}

/// A press before the guest has even started waits for it: the guest routes the button's
/// interrupt as it boots, takes the press and powers off.
#[test]
fn a_power_button_press_before_the_guest_starts_waits_for_it() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    let mut vm = world.start("early-press", &["-S"]);
    let mut qmp = connect(&vm, "qmp");
    assert_eq!(qmp.ok("qmp_capabilities", json!({})), json!({}));
    assert_eq!(qmp.status(), "prelaunch");
    assert_eq!(qmp.ok("system_powerdown", json!({})), json!({}));
    qmp.event("POWERDOWN", Duration::from_secs(5));
    assert_eq!(qmp.ok("cont", json!({})), json!({}));
    assert_powered_off_by_the_button(&mut qmp, &mut vm, "an early press");
}

/// SIGTERM and SIGINT end the VM like `quit`, announced with QEMU's reason `host-signal`.
#[test]
fn a_signal_is_announced_as_a_host_shutdown() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut vm = world.running("signal", &[]);
        let mut qmp = connect(&vm, "qmp");
        qmp.ok("qmp_capabilities", json!({}));
        vm.signal(signal);
        let shutdown = qmp.event("SHUTDOWN", Duration::from_secs(10));
        assert_eq!(
            shutdown["data"],
            json!({"guest": false, "reason": "host-signal"}),
            "signal {signal}: {shutdown}"
        );
        qmp.until_closed(Duration::from_secs(10));
        assert_clean_exit(&mut vm, &format!("signal {signal}"));
    }
}
