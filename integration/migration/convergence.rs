//! Convergence: a guest that dirties memory fast converges with auto-converge's throttling, one
//! that cannot fails at the convergence timeout, and without the capability nothing throttles.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::Transport;
use crate::{assert_migrated_memory, assert_source_runs, kvm_world, MIGRATION_TIMEOUT};

/// A guest that dirties memory faster than the link carries it (a bandwidth cap makes the link
/// slow) converges only because ferry throttles its vCPUs; the pattern survives, and a
/// cancelled migration leaves the source unthrottled.
#[test]
fn fast_dirtying_guest_converges_with_throttling() {
    let Some((_lock, mut world)) = kvm_world(Transport::Unix) else {
        return;
    };
    let source = world.fast_dirtying_source();
    let mut qmp = source.qmp();
    let slow = json!({"downtime-limit": 20, "max-bandwidth": 50_000_000});
    qmp.ok("migrate-set-parameters", Some(slow));

    // First throttle, then cancel: the guest must get its full speed back.
    let uri = world.uri();
    let mut cancelled = world.destination(2, &uri, true);
    qmp.ok("migrate", Some(json!({"uri": uri})));
    let throttled = |qmp: &mut ferry::harness::Qmp| {
        qmp.wait_migration_until("throttled", Duration::from_secs(60), |info| {
            let status = info["status"].as_str();
            assert!(matches!(status, Some("setup" | "active")), "{info}");
            info["cpu-throttle-percentage"].as_u64().unwrap_or(0) >= 30
        });
    };
    throttled(&mut qmp);
    qmp.ok("migrate_cancel", None);
    qmp.wait_migration(&["canceled"], Duration::from_secs(5));
    cancelled.wait_exit(Duration::from_secs(10));
    let seen = source.line_count();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = source
        .lines_from(seen)
        .iter()
        .filter(|l| l.starts_with("tick "))
        .count();
    assert!(
        ticks >= 20,
        "the source still seems throttled: {ticks} ticks in 1 s on 2 vCPUs"
    );

    // Then let it converge.
    let uri = world.uri();
    let destination = world.destination(2, &uri, true);
    qmp.ok("migrate", Some(json!({"uri": uri})));
    throttled(&mut qmp);
    let info = qmp.wait_migration(&["completed", "failed"], MIGRATION_TIMEOUT);
    assert_eq!(info["status"], "completed", "{info}");
    let rounds = info["ram"]["dirty-sync-count"].as_u64().unwrap();
    assert!(
        rounds < 30,
        "reached the round cap instead of converging: {info}"
    );
    assert_migrated_memory(&mut world, &source, &destination);
}

/// A guest that cannot converge (throttling capped at 1 %, a 1 ms downtime limit, a slow link)
/// ends in `failed` once `convergence-timeout` has passed, with the reason, and runs on.
#[test]
fn a_guest_that_cannot_converge_fails_at_the_convergence_timeout() {
    let Some((_lock, mut world)) = kvm_world(Transport::Tcp) else {
        return;
    };
    let source = world.fast_dirtying_source();
    let mut qmp = source.qmp();
    let hopeless = json!({
        "downtime-limit": 1,
        "max-bandwidth": 50_000_000,
        "cpu-throttle-initial": 1,
        "cpu-throttle-increment": 1,
        "max-cpu-throttle": 1,
        "convergence-timeout": 2,
    });
    qmp.ok("migrate-set-parameters", Some(hopeless));
    let uri = world.uri();
    let mut destination = world.destination(2, &uri, true);
    let started = Instant::now();
    qmp.ok("migrate", Some(json!({"uri": uri})));
    let info = qmp.wait_migration(&["completed", "failed", "canceled"], MIGRATION_TIMEOUT);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(started.elapsed() >= Duration::from_secs(2), "{info}");
    let reason = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        reason.contains("did not converge within the convergence-timeout of 2 s"),
        "{reason}"
    );
    assert_source_runs(&source);
    assert!(!destination.wait_exit(Duration::from_secs(10)).success());
}

/// With the `auto-converge` capability off, a guest that outruns the link is never held back
/// (and fails at its convergence timeout); capabilities cannot change during a migration.
#[test]
fn without_auto_converge_the_guest_is_never_throttled() {
    let Some((_lock, mut world)) = kvm_world(Transport::Unix) else {
        return;
    };
    let source = world.fast_dirtying_source();
    let mut qmp = source.qmp();
    let auto_converge =
        |state: bool| json!({"capabilities": [{"capability": "auto-converge", "state": state}]});
    let listed = |qmp: &mut ferry::harness::Qmp| {
        qmp.ok("query-migrate-capabilities", None)
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|c| c["capability"] == "auto-converge")
                    .cloned()
            })
            .expect("auto-converge is listed")["state"]
            .clone()
    };
    assert_eq!(listed(&mut qmp), true, "on by default");
    qmp.ok("migrate-set-capabilities", Some(auto_converge(false)));
    assert_eq!(listed(&mut qmp), false);
    let refused = qmp.error(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]})),
    );
    assert!(
        refused.contains("does not have the migration capability 'postcopy-ram'"),
        "{refused}"
    );

    let slow = json!({"downtime-limit": 1, "max-bandwidth": 50_000_000, "convergence-timeout": 3});
    qmp.ok("migrate-set-parameters", Some(slow));
    let uri = world.uri();
    let mut destination = world.destination(2, &uri, true);
    qmp.ok("migrate", Some(json!({"uri": uri})));
    let busy = qmp.error("migrate-set-capabilities", Some(auto_converge(true)));
    assert!(busy.contains("a migration is in progress"), "{busy}");
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let mut rounds = 0;
    let info = loop {
        let info = qmp.ok("query-migrate", None);
        if !matches!(info["status"].as_str(), Some("setup" | "active")) {
            break info;
        }
        assert_eq!(
            info["cpu-throttle-percentage"].as_u64().unwrap_or(0),
            0,
            "{info}"
        );
        rounds = rounds.max(info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0));
        assert!(Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        rounds >= 3,
        "the guest outran the link for only {rounds} rounds: {info}"
    );
    assert_source_runs(&source);
    assert!(!destination.wait_exit(Duration::from_secs(10)).success());
    qmp.ok("migrate-set-capabilities", Some(auto_converge(true)));
    assert_eq!(listed(&mut qmp), true);
}
