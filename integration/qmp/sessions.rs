//! Many sessions: events to all, concurrency, clients that misbehave, shutdown, the file.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use ferry::qmp;
use ferry::runtime::control::{Event, Request};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::support::{bounded, Client, Harness};

#[tokio::test]
async fn events_reach_every_client() {
    let harness = Harness::start(None).await;
    let (mut a, _) = Client::connect(&harness.path).await;
    let (mut b, _) = Client::connect(&harness.path).await;
    a.ok("qmp_capabilities", json!({})).await;
    b.ok("qmp_capabilities", json!({})).await;
    a.ok("stop", json!({})).await;
    for client in [&mut a, &mut b] {
        let stop = client.event("STOP").await;
        let timestamp = &stop["timestamp"];
        assert!(
            timestamp["seconds"].as_u64().unwrap() > 1_600_000_000,
            "{stop}"
        );
        assert!(
            timestamp["microseconds"].as_u64().unwrap() < 1_000_000,
            "{stop}"
        );
    }
    b.ok("cont", json!({})).await;
    a.event("RESUME").await;
    b.event("RESUME").await;
    // An event the owner emits on its own (not in answer to a command) reaches both as well.
    harness
        .vm
        .emit(Event::new("MIGRATION", Some(json!({"status": "setup"}))));
    for client in [&mut a, &mut b] {
        assert_eq!(
            client.event("MIGRATION").await["data"],
            json!({"status": "setup"})
        );
    }
    harness.stop().await;
}

#[tokio::test]
async fn twenty_clients_at_once() {
    let harness = Harness::start(None).await;
    let mut clients = Vec::new();
    for n in 0..20 {
        let path = harness.path.clone();
        clients.push(tokio::spawn(async move {
            let (mut client, _) = Client::connect(&path).await;
            for round in 0..10 {
                for command in ["stop", "query-status", "cont", "query-status"] {
                    let id = json!(format!("{n}-{round}-{command}"));
                    let reply = client.request(&json!({"execute": command, "id": id})).await;
                    assert_eq!(reply["id"], id, "{reply}");
                    let value = &reply["return"];
                    if command == "query-status" {
                        assert!(["running", "paused"].contains(&value["status"].as_str().unwrap()));
                    } else {
                        assert_eq!(*value, json!({}), "{reply}");
                    }
                }
            }
            client.take_events()
        }));
    }
    for client in clients {
        let events = bounded("a client's rounds", client).await.unwrap();
        assert!(
            events
                .iter()
                .all(|e| e["event"] == "STOP" || e["event"] == "RESUME"),
            "{events:?}"
        );
    }
    assert_eq!(harness.stop().await.len(), 20 * 10 * 4);
}

#[tokio::test]
async fn a_client_that_dies_mid_request_or_sends_garbage_harms_nobody() {
    let harness = Harness::start(None).await;
    let (mut steady, _) = Client::connect(&harness.path).await;
    steady.ok("qmp_capabilities", json!({})).await;

    // Half a request, then gone.
    let (mut half, _) = Client::connect(&harness.path).await;
    half.send(br#"{"execute":"migrate","argum"#).await;
    drop(half);
    // A whole request, gone before the (slow) answer comes.
    let (mut impatient, _) = Client::connect(&harness.path).await;
    impatient
        .send(br#"{"execute":"pmemsave","arguments":{"val":0,"size":1,"filename":"/slow"}}"#)
        .await;
    drop(impatient);
    // Bytes that are not even UTF-8, then gone without reading anything.
    let mut rude = bounded("connect", UnixStream::connect(&harness.path))
        .await
        .unwrap();
    rude.write_all(b"\xff\xfe\x00{{{{[[[\n\x00").await.unwrap();
    drop(rude);

    steady.ok("stop", json!({})).await;
    steady.event("STOP").await;
    tokio::time::sleep(Duration::from_millis(400)).await; // past the slow answer
    steady.ok("cont", json!({})).await;
    steady.event("RESUME").await;
    let seen = harness.stop().await;
    assert!(seen.contains(&Request::Pmemsave {
        addr: 0,
        size: 1,
        path: "/slow".into()
    }));
    assert!(!seen
        .iter()
        .any(|request| matches!(request, Request::Migrate { .. })));
}

#[tokio::test]
async fn a_client_that_does_not_read_loses_events_but_keeps_its_session() {
    let harness = Harness::start(None).await;
    let (mut slow, _) = Client::connect(&harness.path).await;
    slow.ok("qmp_capabilities", json!({})).await;
    // Far more than the event channel holds, while the session cannot run.
    let padding = "p".repeat(1024);
    for n in 0..2000 {
        harness.vm.emit(Event::new(
            "FILLER",
            Some(json!({"n": n, "padding": padding})),
        ));
    }
    let reply = slow
        .request(&json!({"execute": "query-status", "id": "after"}))
        .await;
    assert_eq!(reply["id"], "after");
    let events = slow.take_events();
    assert!(
        !events.is_empty() && events.len() < 2000,
        "{} events",
        events.len()
    );
    // The newest events are the ones kept, in order.
    assert_eq!(events.last().unwrap()["data"]["n"], 1999);
    harness.stop().await;
}

#[tokio::test]
async fn quit_is_answered_then_shutdown_is_announced_then_the_socket_closes() {
    let harness = Harness::start(None).await;
    let (mut client, _) = Client::connect(&harness.path).await;
    let reply = client
        .request(&json!({"execute": "quit", "id": "bye"}))
        .await;
    assert_eq!(reply, json!({"return": {}, "id": "bye"}));
    let shutdown = client.event("SHUTDOWN").await;
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(client.recv_or_eof().await, None);
    // The fake owner cancelled the server's token, as the real one does.
    assert!(harness.shutdown.is_cancelled());
    harness.stop().await;
}

#[tokio::test]
async fn shutdown_closes_every_session_and_removes_the_socket_file() {
    let harness = Harness::start(None).await;
    let path = harness.path.clone();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let (mut idle, _) = Client::connect(&path).await;
    let (mut partway, _) = Client::connect(&path).await;
    partway.send(b"{\"execute\":").await;
    harness.stop().await; // asserts that serve returned in time and the file is gone
    assert_eq!(idle.recv_or_eof().await, None);
    assert_eq!(partway.recv_or_eof().await, None);
    assert!(UnixStream::connect(&path).await.is_err());
}

#[tokio::test]
async fn a_stale_socket_is_replaced_but_a_file_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.qmp");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // what a kill -9 leaves
    let harness = Harness::start_at(&path, None).await;
    let (mut client, _) = Client::connect(&path).await;
    assert_eq!(client.ok("query-status", json!({})).await["running"], true);
    // A second ferry on the same path is refused while this one lives.
    assert!(matches!(qmp::bind(&path), Err(qmp::QmpError::InUse { .. })));
    harness.stop().await;

    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let err = qmp::bind(&file).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}
