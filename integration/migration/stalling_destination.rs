//! Destinations that stop answering without closing the connection: one that takes the guest's
//! last pages and state and then says nothing, and one frozen in its pre-copy. Either way the
//! source gives up within a bound and runs the guest on, rather than wait for as long as the
//! connection lives.

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry::migrate::clock::LocalClock;
use ferry::migrate::link::WRITE_DEADLINE;
use ferry::migrate::params::SWITCHOVER_DEADLINE_MIN;
use ferry::migrate::transport::TCP_USER_TIMEOUT;
use ferry::migrate::wire::{self, Incoming, Message};
use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::common::{kvm_available, kvm_lock, Transport};
use crate::{assert_source_runs, migrating_in_round_zero, set_multifd, World};

#[test]
fn a_destination_silent_after_the_state_fails_the_migration_at_the_deadline() {
    if !kvm_available() {
        return;
    }
    let _lock = kvm_lock();
    let mut world = World::new(Transport::Tcp);
    let source = world.source(2);
    let mut qmp = source.qmp();
    // The fake destination takes the pages on one connection.
    set_multifd(&mut qmp, false);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (state_came, state_at) = mpsc::channel();
    let fake = std::thread::spawn(move || silent_after_the_state(listener, state_came));
    qmp.ok(
        "migrate",
        Some(json!({"uri": format!("tcp:127.0.0.1:{port}")})),
    );
    let state_came_at = state_at
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the source never sent its state\n{}", source.context()));
    let info = qmp.wait_migration(
        &["completed", "failed", "canceled"],
        SWITCHOVER_DEADLINE_MIN * 3,
    );
    let waited = state_came_at.elapsed();
    assert_eq!(info["status"], "failed", "{info}");
    let reason = info["error-desc"].as_str().unwrap();
    let deadline = format!(
        "did not end within {:.1} s",
        SWITCHOVER_DEADLINE_MIN.as_secs_f64()
    );
    assert!(reason.contains(&deadline), "{reason}");
    assert!(
        reason.contains("waiting for the destination to restore the guest"),
        "{reason}"
    );
    // The state goes out within the deadline's first moments; the failure comes at its end.
    assert!(
        waited > SWITCHOVER_DEADLINE_MIN - Duration::from_secs(1),
        "failed {waited:?} after the state: {reason}"
    );
    assert_source_runs(&source);
    match fake.join().unwrap() {
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
    frozen_destination(Transport::Unix, WRITE_DEADLINE, "took no data");
}

fn frozen_destination(transport: Transport, bound: Duration, reason_says: &str) {
    if !kvm_available() {
        return;
    }
    let _lock = kvm_lock();
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

/// Plays a destination up to the source's state, which it never answers; returns what the
/// source said after it, before hanging up.
fn silent_after_the_state(
    listener: TcpListener,
    state_came: mpsc::Sender<Instant>,
) -> Option<Message> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).await.unwrap();
        assert_eq!(header, wire::header());
        let clock = LocalClock::start();
        loop {
            let answer = match wire::read_incoming(&mut stream).await.unwrap() {
                Incoming::Pages { data_len, .. } => {
                    let mut data = vec![0u8; data_len];
                    stream.read_exact(&mut data).await.unwrap();
                    None
                }
                Incoming::Message(Message::Config(_)) => Some(Message::Accept),
                Incoming::Message(Message::Sync) => Some(Message::Synced),
                Incoming::Message(Message::ClockProbe) => Some(Message::Clock(clock.now())),
                Incoming::Message(Message::Zeros(_) | Message::Round(_)) => None,
                Incoming::Message(Message::State(_)) => break,
                Incoming::Message(other) => panic!("{other:?} before the state"),
            };
            if let Some(answer) = answer {
                wire::write_message(&mut stream, &answer).await.unwrap();
            }
        }
        state_came.send(Instant::now()).unwrap();
        wire::read_message(&mut stream).await.ok()
    })
}
