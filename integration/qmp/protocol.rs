//! The QMP envelope on the wire: greeting, negotiation, ids, framing, malformed input.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry::qmp::{COMMAND_NAMES, MAX_REQUEST_BYTES};
use serde_json::json;

use crate::support::{Client, Harness};

#[tokio::test]
async fn greeting_capabilities_and_local_queries() {
    let harness = Harness::start(Some("guest-7")).await;
    let (mut client, greeting) = Client::connect(&harness.path).await;
    let version = &greeting["QMP"]["version"];
    assert_eq!(
        version["package"],
        format!("ferry {}", env!("CARGO_PKG_VERSION"))
    );
    for part in ["major", "minor", "micro"] {
        assert!(version["qemu"][part].is_u64(), "{greeting}");
    }
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));

    assert_eq!(client.ok("qmp_capabilities", json!({})).await, json!({}));
    // Negotiating again is harmless (QEMU would refuse; ferry has nothing to negotiate).
    assert_eq!(
        client.ok("qmp_capabilities", json!({"enable": []})).await,
        json!({})
    );
    assert_eq!(client.ok("query-version", json!({})).await, *version);
    assert_eq!(
        client.ok("query-name", json!({})).await,
        json!({"name": "guest-7"})
    );
    let commands = client.ok("query-commands", json!({})).await;
    let names: BTreeSet<&str> = commands
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, COMMAND_NAMES.iter().copied().collect());
    drop(client);

    let anonymous = Harness::start(None).await;
    let (mut client, _) = Client::connect(&anonymous.path).await;
    assert_eq!(client.ok("query-name", json!({})).await, json!({}));
    anonymous.stop().await;
    harness.stop().await;
}

#[tokio::test]
async fn commands_work_without_negotiation_and_any_id_is_echoed() {
    let harness = Harness::start(None).await;
    let (mut client, _) = Client::connect(&harness.path).await;
    let status = client.ok("query-status", json!({})).await;
    assert_eq!(
        status,
        json!({"status": "running", "singlestep": false, "running": true})
    );
    for id in [
        json!(1),
        json!("abc"),
        json!({"nested": [1, {"x": null}]}),
        json!(null),
        json!(2.5),
    ] {
        let reply = client
            .request(&json!({"execute": "query-status", "id": id}))
            .await;
        assert_eq!(reply["id"], id, "{reply}");
        // An error reply echoes the id too.
        let reply = client
            .request(&json!({"execute": "no-such", "id": id}))
            .await;
        assert_eq!(
            (reply["id"].clone(), reply["error"]["class"].clone()),
            (id, json!("CommandNotFound"))
        );
    }
    let reply = client.request(&json!({"execute": "query-status"})).await;
    assert!(reply.get("id").is_none(), "{reply}");
    harness.stop().await;
}

#[tokio::test]
async fn malformed_input_gets_an_error_and_the_session_goes_on() {
    let harness = Harness::start(None).await;
    let (mut client, _) = Client::connect(&harness.path).await;
    let cases: [(&[u8], &str, &str); 11] = [
        (b"{\"execute\": }\n", "GenericError", "JSON parse error, "),
        (b"this is not json\n", "GenericError", "JSON parse error, "),
        (
            b"{\"execute\":\"stop\n",
            "GenericError",
            "JSON parse error, ",
        ),
        (b"}\n", "GenericError", "JSON parse error, "),
        (
            b"[1, 2, 3]\n",
            "GenericError",
            "QMP input must be a JSON object",
        ),
        (b"42\n", "GenericError", "QMP input must be a JSON object"),
        (
            b"{\"arguments\": {}}\n",
            "GenericError",
            "QMP input lacks member 'execute'",
        ),
        (
            b"{\"execute\": [\"stop\"]}\n",
            "GenericError",
            "member 'execute' must be a string",
        ),
        (
            b"{\"execute\": \"stop\", \"arguments\": 1}",
            "GenericError",
            "'arguments' must be an object",
        ),
        (
            b"{\"execute\": \"stop\", \"extra\": 1}",
            "GenericError",
            "member 'extra' is unexpected",
        ),
        (
            b"{\"execute\": \"eject\"}",
            "CommandNotFound",
            "The command eject has not been found",
        ),
    ];
    for (input, class, desc) in cases {
        client.send(input).await;
        let reply = client.reply().await;
        let what = String::from_utf8_lossy(input);
        assert_eq!(reply["error"]["class"], class, "{what}: {reply}");
        assert!(
            reply["error"]["desc"].as_str().unwrap().contains(desc),
            "{what}: {reply}"
        );
        assert_eq!(
            client.ok("query-status", json!({})).await["status"],
            "running",
            "after {what}"
        );
    }
    harness.stop().await;
}

#[tokio::test]
async fn requests_split_batched_pretty_printed_or_unterminated_are_understood() {
    let harness = Harness::start(None).await;
    let (mut client, _) = Client::connect(&harness.path).await;
    // Several in one write, without newlines between them.
    client
        .send(br#"{"execute":"stop","id":1}{"execute":"query-status","id":2}"#)
        .await;
    assert_eq!(client.reply().await, json!({"return": {}, "id": 1}));
    assert_eq!(client.reply().await["return"]["status"], "paused");
    // One request in many writes, across a pause.
    for piece in [
        &b"{\"exe"[..],
        b"cute\": \"co",
        b"nt\", \"id\"",
        b": \"split\"}",
    ] {
        client.send(piece).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.reply().await, json!({"return": {}, "id": "split"}));
    // Pretty-printed over several lines, with \r\n.
    let pretty = "{\r\n  \"execute\": \"migrate-set-parameters\",\r\n  \"arguments\": {\r\n    \
                  \"downtime-limit\": 120\r\n  },\r\n  \"id\": \"p\"\r\n}\r\n";
    client.send(pretty.as_bytes()).await;
    assert_eq!(client.reply().await, json!({"return": {}, "id": "p"}));
    assert_eq!(
        client.ok("query-migrate-parameters", json!({})).await["downtime-limit"],
        120
    );
    // Braces inside strings do not confuse the framing.
    let reply = client
        .request(&json!({"execute": "query-status", "id": "}{[\"]"}))
        .await;
    assert_eq!(reply["id"], "}{[\"]");
    harness.stop().await;
}

#[tokio::test]
async fn an_oversize_request_is_refused_and_the_stream_resyncs() {
    let harness = Harness::start(None).await;
    let (mut client, _) = Client::connect(&harness.path).await;
    let padding = "x".repeat(MAX_REQUEST_BYTES);
    let huge = format!("{{\"execute\":\"query-status\",\"id\":\"{padding}\"}}\n");
    client.send(huge.as_bytes()).await;
    let reply = client.reply().await;
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    assert!(
        reply["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("exceeds 65536 bytes"),
        "{reply}"
    );
    assert!(reply.get("id").is_none());
    // One error for the whole request, then business as usual.
    assert_eq!(
        client
            .request(&json!({"execute": "query-status", "id": 9}))
            .await["id"],
        9
    );
    // Garbage without any newline is bounded the same way.
    client.send(&vec![b'z'; MAX_REQUEST_BYTES + 10]).await;
    client.send(b"\n").await;
    assert!(client.reply().await["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("exceeds"));
    assert_eq!(client.ok("query-status", json!({})).await["running"], true);
    harness.stop().await;
}
