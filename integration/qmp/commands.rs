//! Each command's arguments, and what travels to the VM owner and back.

use ferry::runtime::control::{MigrationParameterUpdate, Request};
use serde_json::json;

use crate::support::{Client, Harness};

#[tokio::test]
async fn every_commands_arguments_are_validated_on_the_wire() {
    let harness = Harness::start(None).await;
    let (mut client, _) = Client::connect(&harness.path).await;
    let cases = [
        (
            "stop",
            json!({"now": true}),
            "Parameter 'now' is unexpected; stop takes no arguments",
        ),
        (
            "query-status",
            json!({"x": 1}),
            "query-status takes no arguments",
        ),
        (
            "qmp_capabilities",
            json!({"enable": ["oob"]}),
            "Capability 'oob' not available",
        ),
        (
            "pmemsave",
            json!({"size": 1, "filename": "/m"}),
            "Parameter 'val' is missing",
        ),
        (
            "pmemsave",
            json!({"val": 0, "filename": "/m"}),
            "Parameter 'size' is missing",
        ),
        (
            "pmemsave",
            json!({"val": 0, "size": 1}),
            "Parameter 'filename' is missing",
        ),
        (
            "pmemsave",
            json!({"val": "0", "size": 1, "filename": "/m"}),
            "'val', expected: integer",
        ),
        (
            "pmemsave",
            json!({"val": 0, "size": -4, "filename": "/m"}),
            "'size' must not be negative",
        ),
        (
            "pmemsave",
            json!({"val": 0, "size": 1, "filename": false}),
            "'filename', expected: string",
        ),
        (
            "pmemsave",
            json!({"addr": 0}),
            "Parameter 'addr' is unexpected; pmemsave takes val, size",
        ),
        ("migrate", json!({}), "Parameter 'uri' is missing"),
        (
            "migrate",
            json!({"uri": 1}),
            "Invalid parameter type for 'uri', expected: string",
        ),
        (
            "migrate",
            json!({"uri": "tcp:h:1", "blk": true}),
            "Parameter 'blk' is not supported",
        ),
        (
            "migrate",
            json!({"uri": "tcp:h:1", "inc": true}),
            "Parameter 'inc' is not supported",
        ),
        (
            "migrate",
            json!({"uri": "tcp:h:1", "resume": true}),
            "Parameter 'resume' is not supported",
        ),
        (
            "migrate",
            json!({"uri": "tcp:h:1", "detach": 1}),
            "'detach', expected: boolean",
        ),
        ("migrate-incoming", json!({}), "Parameter 'uri' is missing"),
        (
            "migrate-incoming",
            json!({"uri": ""}),
            "Parameter 'uri' is empty",
        ),
        (
            "migrate-set-parameters",
            json!({"downtime-limit": -1}),
            "must not be negative",
        ),
        (
            "migrate-set-parameters",
            json!({"max-bandwidth": "fast"}),
            "expected: integer",
        ),
        (
            "migrate-set-parameters",
            json!({"downtime-limit": 9_000_000}),
            "range of 0 to 2000000",
        ),
        (
            "migrate-set-parameters",
            json!({"xbzrle-cache-size": 1}),
            "'xbzrle-cache-size' is unexpected",
        ),
        (
            "migrate_cancel",
            json!({"force": true}),
            "migrate_cancel takes no arguments",
        ),
    ];
    for (command, arguments, expected) in cases {
        let reply = client.execute(command, arguments.clone()).await;
        let desc = reply["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("{command}: {reply}"));
        assert!(desc.contains(expected), "{command} {arguments}: {desc}");
        assert_eq!(reply["error"]["class"], "GenericError");
    }
    // None of those reached the VM owner.
    assert_eq!(harness.stop().await, []);
}

#[tokio::test]
async fn vm_commands_reach_the_owner_and_its_answers_come_back() {
    let harness = Harness::start(None).await;
    let (mut client, _) = Client::connect(&harness.path).await;
    let cpus = client.ok("query-cpus-fast", json!({})).await;
    assert_eq!(cpus[0]["cpu-index"], 0);
    assert_eq!(cpus[0]["target"], "x86_64");
    let args = json!({"val": 4096, "size": 8192, "filename": "/tmp/ferry-mem"});
    assert_eq!(client.ok("pmemsave", args).await, json!({}));
    assert_eq!(
        client
            .ok("migrate-set-parameters", json!({"max-bandwidth": 0}))
            .await,
        json!({})
    );
    let parameters = client.ok("query-migrate-parameters", json!({})).await;
    assert_eq!(
        parameters,
        json!({"downtime-limit": 300, "max-bandwidth": 0})
    );
    assert_eq!(client.ok("query-migrate", json!({})).await, json!({}));
    let detached = json!({"uri": "unix:/tmp/m.sock", "detach": true, "blk": false});
    assert_eq!(client.ok("migrate", detached).await, json!({}));
    assert_eq!(
        client.ok("query-migrate", json!({})).await["status"],
        "active"
    );
    assert_eq!(client.ok("migrate_cancel", json!({})).await, json!({}));
    assert_eq!(
        client
            .ok("migrate-incoming", json!({"uri": "tcp:0:4444"}))
            .await,
        json!({})
    );
    // The owner's refusal is a GenericError with its text as desc.
    let reply = client
        .execute("migrate", json!({"uri": "ftp://nowhere"}))
        .await;
    assert_eq!(
        reply["error"],
        json!({"class": "GenericError", "desc": "Invalid uri 'ftp://nowhere': use tcp:HOST:PORT or unix:PATH"})
    );
    assert_eq!(client.ok("system_reset", json!({})).await, json!({}));
    assert_eq!(
        client.event("RESET").await["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    assert_eq!(client.ok("system_powerdown", json!({})).await, json!({}));
    client.event("POWERDOWN").await;

    let seen = harness.stop().await;
    assert_eq!(
        seen,
        [
            Request::QueryCpusFast,
            Request::Pmemsave {
                addr: 4096,
                size: 8192,
                path: "/tmp/ferry-mem".into()
            },
            Request::MigrateSetParameters(MigrationParameterUpdate {
                downtime_limit_ms: None,
                max_bandwidth: Some(0),
                ..Default::default()
            }),
            Request::QueryMigrateParameters,
            Request::QueryMigrate,
            Request::Migrate {
                uri: "unix:/tmp/m.sock".into()
            },
            Request::QueryMigrate,
            Request::MigrateCancel,
            Request::MigrateIncoming {
                uri: "tcp:0:4444".into()
            },
            Request::Migrate {
                uri: "ftp://nowhere".into()
            },
            Request::SystemReset,
            Request::SystemPowerdown,
        ]
    );
}
