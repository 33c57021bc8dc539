//! Cancellation at every stage, on either side, and failures: the source runs on with a reason.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{self, free_port, migrate_to_silent_destination, wait_switchover, Transport};
use crate::{
    assert_migrated_memory, assert_source_runs, in_round_zero, kvm_world, migrate,
    migrate_into_round_zero, migrating_in_round_zero, set_multifd,
};

/// `migrate_cancel` takes effect within a bound at every stage, the source resumes, and a new
/// migration to a fresh destination then succeeds.
#[test]
fn cancel_at_every_stage_then_migrate_again() {
    let Some((_lock, mut world)) = kvm_world(Transport::Tcp) else {
        return;
    };
    let source = world.source(2);
    let mut qmp = source.qmp();
    assert_eq!(
        qmp.ok("migrate_cancel", None),
        json!({}),
        "cancel with nothing running"
    );

    let cancel_when =
        |qmp: &mut ferry::harness::Qmp, stage: &str, ready: &dyn Fn(&Value) -> bool| {
            qmp.wait_migration_until(stage, Duration::from_secs(30), ready);
            let asked = Instant::now();
            qmp.ok("migrate_cancel", None);
            // Poll tightly: the bound is on ferry, not on the test's polling interval.
            let info = loop {
                let info = qmp.ok("query-migrate", None);
                if info["status"] == "canceled" {
                    break info;
                }
                assert!(asked.elapsed() < Duration::from_secs(5), "{stage}: {info}");
                std::thread::sleep(Duration::from_millis(1));
            };
            let took = asked.elapsed();
            assert!(
                took < Duration::from_millis(100),
                "{stage}: cancel took {took:?}"
            );
            assert!(
                qmp.status() == "running",
                "{stage}: source not running after cancel: {info}"
            );
        };

    // In setup: a destination that never answers the configuration.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    qmp.ok(
        "migrate",
        Some(json!({"uri": format!("tcp:127.0.0.1:{port}")})),
    );
    cancel_when(&mut qmp, "setup", &|info| info["status"] == "setup");
    drop(listener);
    assert_source_runs(&source);

    // Mid-round: a real destination and a bandwidth cap that makes round 0 take seconds.
    let uri = world.uri();
    let mut slow = world.destination(2, &uri, true);
    qmp.ok(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 4 << 20})),
    );
    qmp.ok("migrate", Some(json!({"uri": uri})));
    cancel_when(&mut qmp, "mid-round", &in_round_zero);
    let status = slow.wait_exit(Duration::from_secs(10));
    assert!(
        !status.success(),
        "the destination of a cancelled migration must fail"
    );
    assert!(
        slow.stderr().contains("cancelled"),
        "the destination does not report the cancel: {}",
        slow.stderr()
    );
    assert_eq!(
        slow.line_count(),
        0,
        "the destination ran the guest: {:?}",
        slow.lines()
    );
    qmp.ok("migrate-set-parameters", Some(json!({"max-bandwidth": 0})));
    assert_source_runs(&source);

    // Mid-write: a destination that stops reading, so the source blocks in a socket write, on
    // a page connection and then, with `multifd` off, on the control connection, whose frame
    // is then cut short.
    for multifd in [true, false] {
        set_multifd(&mut qmp, multifd);
        let _reader = migrate_to_silent_destination(&mut qmp, false);
        // Blocked: pages have gone out, and then nothing more for a while.
        let last = std::cell::Cell::new((0, Instant::now()));
        cancel_when(&mut qmp, "mid-write", &|info| {
            let transferred = info["ram"]["transferred"].as_u64().unwrap_or(0);
            let (before, since) = last.get();
            if transferred != before {
                last.set((transferred, Instant::now()));
            }
            info["status"] == "active"
                && info["ram"]["normal"].as_u64().unwrap_or(0) > 0
                && transferred == before
                && since.elapsed() > Duration::from_millis(300)
        });
        assert_source_runs(&source);
    }
    set_multifd(&mut qmp, true);

    // At the switchover: a destination that takes everything and never says READY.
    let _reader = migrate_to_silent_destination(&mut qmp, true);
    wait_switchover(&mut qmp, Duration::from_secs(60));
    cancel_when(&mut qmp, "switchover", &|_| true);
    assert_source_runs(&source);

    // And then a real migration succeeds.
    let uri = world.uri();
    let destination = world.destination(2, &uri, true);
    migrate(&source, &uri);
    assert_migrated_memory(&mut world, &source, &destination);
}

/// A `migrate_cancel` on the destination ends its incoming migration before the commit: the
/// source hears why, fails with that reason and runs on, and the destination never runs the
/// guest.
#[test]
fn a_cancel_on_the_destination_reaches_the_source() {
    let Some((_lock, mut world)) = kvm_world(Transport::Unix) else {
        return;
    };
    let (source, mut destination) = migrating_in_round_zero(&mut world);
    let mut qmp = source.qmp();
    assert_eq!(destination.qmp().ok("migrate_cancel", None), json!({}));
    let info = qmp.wait_migration(
        &["completed", "failed", "canceled"],
        Duration::from_secs(10),
    );
    assert_eq!(info["status"], "failed", "{info}");
    let reason = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the incoming migration was cancelled"),
        "the source does not say the destination cancelled: {info}"
    );
    let status = destination.wait_exit(Duration::from_secs(10));
    assert!(
        !status.success(),
        "the destination of a cancelled migration must fail"
    );
    assert_eq!(destination.line_count(), 0, "the destination ran the guest");
    assert_source_runs(&source);
}

/// Failures leave the source running with a reason, and no destination runs a partial guest.
#[test]
fn failures_leave_the_source_running_with_a_reason() {
    let Some((_lock, mut world)) = kvm_world(Transport::Unix) else {
        return;
    };
    let source = world.source(2);
    let mut qmp = source.qmp();

    // Nobody listening.
    qmp.ok(
        "migrate",
        Some(json!({"uri": format!("tcp:127.0.0.1:{}", free_port())})),
    );
    let info = qmp.wait_migration(&["failed"], Duration::from_secs(10));
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{info}"
    );
    assert_source_runs(&source);

    // Malformed URIs and a second migrate while one runs.
    assert!(qmp
        .error("migrate", Some(json!({"uri": "tcp:nowhere"})))
        .contains("missing :PORT"));
    assert!(qmp
        .error("migrate", Some(json!({"uri": "ftp://x"})))
        .contains("unknown transport"));

    // Configuration mismatches, named on both sides.
    for (flag, value, expected) in [("-m", "128", "-m 64"), ("-smp", "1", "-smp 2")] {
        let uri = world.uri();
        let qmp_path = world.path("dst.qmp");
        let (mem, smp) = if flag == "-m" {
            (value, "2")
        } else {
            ("64", value)
        };
        let mut destination = common::start(
            "mismatch",
            &["-m", mem, "-smp", smp, "-incoming", &uri],
            Some(&qmp_path),
        );
        qmp.ok("migrate", Some(json!({"uri": uri})));
        let info = qmp.wait_migration(&["failed"], Duration::from_secs(30));
        let reason = info["error-desc"].as_str().unwrap();
        assert!(
            reason.contains("refused") && reason.contains(expected),
            "{flag}: {reason}"
        );
        let status = destination.wait_exit(Duration::from_secs(10));
        assert!(!status.success());
        assert!(
            destination.stderr().contains(expected),
            "{flag}: {}",
            destination.stderr()
        );
        assert_eq!(destination.line_count(), 0, "the destination ran the guest");
        assert_source_runs(&source);
    }

    // The destination dies mid-stream.
    let mut destination = migrate_into_round_zero(&mut world, &source);
    destination.signal(libc::SIGKILL);
    destination.wait_exit(Duration::from_secs(5));
    let info = qmp.wait_migration(&["failed"], Duration::from_secs(30));
    assert!(info["error-desc"].as_str().is_some(), "{info}");
    qmp.ok("migrate-set-parameters", Some(json!({"max-bandwidth": 0})));
    assert_source_runs(&source);
}
