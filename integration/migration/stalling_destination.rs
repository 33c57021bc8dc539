//! Destinations that stop answering without closing the connection: one that takes the guest's
//! last pages and state and then says nothing, and one frozen in its pre-copy. Either way the
//! source gives up within a bound and runs the guest on, rather than wait for as long as the
//! connection lives.

use std::time::{Duration, Instant};

use ferry::migrate::link::WRITE_DEADLINE;
use ferry::migrate::params::SWITCHOVER_DEADLINE_MIN;
use ferry::migrate::transport::TCP_USER_TIMEOUT;
use ferry::migrate::wire::Message;

use crate::common::{kvm_turn, migrate_to_silent_destination, wait_switchover, Transport};
use crate::{assert_source_runs, kvm_world, migrating_in_round_zero, World};

#[test]
fn a_destination_silent_after_the_state_fails_the_migration_at_the_deadline() {
    let Some((_lock, mut world)) = kvm_world(Transport::Tcp) else {
        return;
    };
    let source = world.source(2);
    let mut qmp = source.qmp();
    let fake = migrate_to_silent_destination(&mut qmp, true);
    wait_switchover(&mut qmp, Duration::from_secs(60));
    let paused = Instant::now();
    let info = qmp.wait_migration(
        &["completed", "failed", "canceled"],
        SWITCHOVER_DEADLINE_MIN * 3,
    );
    let waited = paused.elapsed();
    assert_eq!(info["status"], "failed", "{info}");
    let reason = info["error-desc"].as_str().unwrap();
    let deadline = format!(
        "did not end within {:.1} s",
        SWITCHOVER_DEADLINE_MIN.as_secs_f64()
    );
    assert!(reason.contains(&deadline), "{reason}");
    assert!(
        reason.contains("waiting for the destination to take the last pages and the state"),
        "{reason}"
    );
    // The test sees the pause within ms of it; the failure comes at the deadline's end.
    assert!(
        waited > SWITCHOVER_DEADLINE_MIN - Duration::from_secs(1),
        "failed {waited:?} after the pause: {reason}"
    );
    assert_source_runs(&source);
    match fake.join().unwrap().last_word {
        Some(Message::Error(told)) => assert!(told.contains(&deadline), "{told}"),
        other => panic!("the destination was told {other:?}, not why"),
    }
}

/// A destination stopped (SIGSTOP) in round 0 over TCP: its kernel holds the connections open
/// and shuts their windows once its buffers are full. The source's writes then wait, and TCP
/// gives up on them after [`TCP_USER_TIMEOUT`] (by default it would probe the window for as long
/// as the peer's kernel answers).
#[test]
fn a_frozen_destination_fails_the_migration_within_the_tcp_user_timeout() {
    frozen_destination(Transport::Tcp, TCP_USER_TIMEOUT, "timed out");
}

/// The same over a UNIX socket, where only ferry's own [`WRITE_DEADLINE`] notices.
#[test]
fn a_frozen_destination_fails_the_migration_at_the_write_deadline() {
    frozen_destination(
        Transport::Unix,
        WRITE_DEADLINE,
        "did not take a whole frame",
    );
}

fn frozen_destination(transport: Transport, bound: Duration, reason_says: &str) {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut world = World::new(transport);
    // The freeze lands in round 0 with far more of the 64 MiB left to send than the
    // connections' kernel buffers hold (about 10 MiB each with Linux's defaults), so the source
    // is writing, not waiting for an answer, when the destination stops.
    let (source, mut destination) = migrating_in_round_zero(&mut world);
    let mut qmp = source.qmp();
    destination.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let info = qmp.wait_migration(&["completed", "failed", "canceled"], bound * 2);
    let waited = frozen.elapsed();
    destination.signal(libc::SIGKILL);
    destination.wait_exit(Duration::from_secs(10));
    assert_eq!(info["status"], "failed", "{info}");
    let reason = info["error-desc"].as_str().unwrap_or_default();
    assert!(reason.contains(reason_says), "{info}");
    assert!(
        waited >= bound,
        "failed {waited:?} after the freeze, before its bound of {bound:?}: {info}"
    );
    assert_source_runs(&source);
}
