//! Parsing and validation of every command, without a socket or a VM.

use serde_json::json;

use super::*;

fn parse(request: Value) -> Result<Command, CommandError> {
    Command::from_request(request)
}

/// The `desc` the client would see for `request`.
fn desc(request: Value) -> String {
    parse(request.clone())
        .expect_err(&request.to_string())
        .to_string()
}

fn execute(name: &str, arguments: Value) -> Value {
    json!({"execute": name, "arguments": arguments})
}

#[test]
fn envelope_errors() {
    let cases = [
        (json!([1]), "QMP input must be a JSON object"),
        (json!(42), "QMP input must be a JSON object"),
        (json!({}), "QMP input lacks member 'execute'"),
        (json!({"id": 1}), "QMP input lacks member 'execute'"),
        (
            json!({"execute": 1}),
            "QMP input member 'execute' must be a string",
        ),
        (
            json!({"execute": "stop", "arguments": []}),
            "member 'arguments' must be an object",
        ),
        (
            json!({"execute": "stop", "arguments": null}),
            "member 'arguments' must be an object",
        ),
        (
            json!({"execute": "stop", "argument": {}}),
            "QMP input member 'argument' is unexpected",
        ),
        (
            json!({"exec-oob": "migrate-pause"}),
            "'exec-oob') is not supported",
        ),
    ];
    for (request, expected) in cases {
        let message = desc(request.clone());
        assert!(message.contains(expected), "{request}: {message}");
        assert_eq!(
            parse(request).unwrap_err().class(),
            ErrorClass::GenericError
        );
    }
}

#[test]
fn unknown_commands_are_command_not_found() {
    let err = parse(json!({"execute": "device_add"})).unwrap_err();
    assert_eq!(err.class(), ErrorClass::CommandNotFound);
    assert_eq!(err.to_string(), "The command device_add has not been found");
    // Names are exact, as in QEMU: the dash/underscore spelling matters.
    assert!(parse(json!({"execute": "migrate-cancel"})).is_err());
    assert!(parse(json!({"execute": "Stop"})).is_err());
}

#[test]
fn decode_echoes_the_id_and_reports_bad_json_without_one() {
    let (id, command) = decode(Frame::Value(
        br#"{"execute":"nope","id":["x",{"y":2}]}"#.to_vec(),
    ));
    assert_eq!(id, Some(json!(["x", {"y": 2}])));
    assert_eq!(command.unwrap_err().class(), ErrorClass::CommandNotFound);

    let (id, command) = decode(Frame::Value(br#"{"execute":"stop","id":7}"#.to_vec()));
    assert_eq!(
        (id, command.unwrap()),
        (Some(json!(7)), Command::Vm(Request::Stop))
    );

    for garbage in [&b"{\"execute\": }"[..], b"hello", b"{\"a\":1", b"\xff\xfe"] {
        let (id, command) = decode(Frame::Value(garbage.to_vec()));
        assert_eq!(id, None);
        let message = command.unwrap_err().to_string();
        assert!(message.starts_with("JSON parse error, "), "{message}");
    }
    let (id, command) = decode(Frame::Oversize);
    assert_eq!(id, None);
    assert!(command
        .unwrap_err()
        .to_string()
        .contains("exceeds 65536 bytes"));
}

#[test]
fn every_listed_command_parses_and_nothing_is_listed_twice() {
    let minimal = |name: &str| match name {
        "pmemsave" => json!({"val": 0, "size": 4096, "filename": "/tmp/m"}),
        "migrate" | "migrate-incoming" => json!({"uri": "unix:/tmp/m.sock"}),
        "migrate-set-capabilities" => json!({"capabilities": []}),
        _ => json!({}),
    };
    for name in COMMAND_NAMES {
        parse(execute(name, minimal(name))).unwrap_or_else(|err| panic!("{name}: {err}"));
        if let Err(err) = parse(json!({"execute": name, "id": "a"})) {
            assert!(
                matches!(err, CommandError::MissingArgument(_)),
                "{name}: {err}"
            );
        }
    }
    let mut sorted = COMMAND_NAMES.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), COMMAND_NAMES.len());
}

#[test]
fn commands_without_arguments_refuse_any() {
    for name in COMMAND_NAMES
        .iter()
        .filter(|name| Command::without_arguments(name).is_some())
    {
        parse(execute(name, json!({}))).unwrap();
        let message = desc(execute(name, json!({"force": true})));
        assert_eq!(
            message,
            format!("Parameter 'force' is unexpected; {name} takes no arguments")
        );
    }
}

#[test]
fn qmp_capabilities_enables_nothing() {
    assert_eq!(
        parse(json!({"execute": "qmp_capabilities"})).unwrap(),
        Command::QmpCapabilities
    );
    assert_eq!(
        parse(execute("qmp_capabilities", json!({"enable": []}))).unwrap(),
        Command::QmpCapabilities
    );
    assert_eq!(
        desc(execute("qmp_capabilities", json!({"enable": ["oob"]}))),
        "Capability 'oob' not available"
    );
    assert!(
        desc(execute("qmp_capabilities", json!({"enable": "oob"}))).contains("array of strings")
    );
}

#[test]
fn pmemsave_arguments() {
    let ok = parse(execute(
        "pmemsave",
        json!({"val": 4096, "size": 8192, "filename": "/tmp/mem"}),
    ));
    assert_eq!(
        ok.unwrap(),
        Command::Vm(Request::Pmemsave {
            addr: 4096,
            size: 8192,
            path: PathBuf::from("/tmp/mem")
        })
    );
    let cases = [
        (
            json!({"size": 1, "filename": "f"}),
            "Parameter 'val' is missing",
        ),
        (
            json!({"val": 0, "filename": "f"}),
            "Parameter 'size' is missing",
        ),
        (
            json!({"val": 0, "size": 1}),
            "Parameter 'filename' is missing",
        ),
        (
            json!({"val": "0", "size": 1, "filename": "f"}),
            "type for 'val', expected: integer",
        ),
        (
            json!({"val": 0, "size": 1.5, "filename": "f"}),
            "type for 'size', expected: integer",
        ),
        (
            json!({"val": 0, "size": 1, "filename": 3}),
            "type for 'filename', expected: string",
        ),
        (
            json!({"val": -1, "size": 1, "filename": "f"}),
            "'val' must not be negative (got -1)",
        ),
        (
            json!({"val": u64::MAX, "size": 2, "filename": "f"}),
            "past the end of the address space",
        ),
        (
            json!({"val": 0, "size": 1, "filename": ""}),
            "'filename' is empty",
        ),
        (
            json!({"addr": 0, "size": 1, "filename": "f"}),
            "Parameter 'addr' is unexpected; pmemsave takes val, size, filename",
        ),
    ];
    for (arguments, expected) in cases {
        let message = desc(execute("pmemsave", arguments.clone()));
        assert!(message.contains(expected), "{arguments}: {message}");
    }
}

#[test]
fn migrate_arguments() {
    let migrate = |arguments: Value| parse(execute("migrate", arguments));
    let expected = Command::Vm(Request::Migrate {
        uri: "tcp:10.0.0.2:4444".into(),
    });
    assert_eq!(
        migrate(json!({"uri": "tcp:10.0.0.2:4444"})).unwrap(),
        expected
    );
    assert_eq!(
        migrate(json!({"uri": "tcp:10.0.0.2:4444", "detach": true})).unwrap(),
        expected
    );
    let all_false =
        json!({"uri": "tcp:10.0.0.2:4444", "blk": false, "inc": false, "resume": false});
    assert_eq!(migrate(all_false).unwrap(), expected);
    let cases = [
        (json!({}), "Parameter 'uri' is missing"),
        (json!({"uri": 5}), "type for 'uri', expected: string"),
        (json!({"uri": ""}), "'uri' is empty"),
        (
            json!({"url": "tcp:h:1"}),
            "Parameter 'url' is unexpected; migrate takes uri, detach",
        ),
        (
            json!({"channels": []}),
            "Parameter 'channels' is unexpected",
        ),
        (
            json!({"uri": "u", "detach": "yes"}),
            "type for 'detach', expected: boolean",
        ),
        (
            json!({"uri": "u", "blk": true}),
            "Parameter 'blk' is not supported: ferry does not",
        ),
        (
            json!({"uri": "u", "inc": true}),
            "Parameter 'inc' is not supported",
        ),
        (
            json!({"uri": "u", "resume": true}),
            "Parameter 'resume' is not supported: ferry has no",
        ),
    ];
    for (arguments, expected) in cases {
        let message = desc(execute("migrate", arguments.clone()));
        assert!(message.contains(expected), "{arguments}: {message}");
    }
}

#[test]
fn migrate_incoming_arguments() {
    assert_eq!(
        parse(execute(
            "migrate-incoming",
            json!({"uri": "tcp:0.0.0.0:4444"})
        ))
        .unwrap(),
        Command::Vm(Request::MigrateIncoming {
            uri: "tcp:0.0.0.0:4444".into()
        })
    );
    assert_eq!(
        desc(json!({"execute": "migrate-incoming"})),
        "Parameter 'uri' is missing"
    );
    let message = desc(execute(
        "migrate-incoming",
        json!({"uri": "x", "exit-on-error": false}),
    ));
    assert_eq!(
        message,
        "Parameter 'exit-on-error' is unexpected; migrate-incoming takes uri"
    );
}

#[test]
fn migrate_set_parameters_arguments() {
    let set = |arguments: Value| parse(execute("migrate-set-parameters", arguments));
    let update = |downtime_limit_ms, max_bandwidth| {
        Command::Vm(Request::MigrateSetParameters(MigrationParameterUpdate {
            downtime_limit_ms,
            max_bandwidth,
            ..Default::default()
        }))
    };
    assert_eq!(
        set(json!({"downtime-limit": 300, "max-bandwidth": 134217728})).unwrap(),
        update(Some(300), Some(134_217_728))
    );
    assert_eq!(
        set(json!({"max-bandwidth": 0})).unwrap(),
        update(None, Some(0))
    );
    assert_eq!(set(json!({})).unwrap(), update(None, None));
    assert_eq!(
        set(json!({"downtime-limit": 2_000_000})).unwrap(),
        update(Some(2_000_000), None)
    );
    let cases = [
        (
            json!({"downtime-limit": -5}),
            "'downtime-limit' must not be negative (got -5)",
        ),
        (
            json!({"max-bandwidth": -1}),
            "'max-bandwidth' must not be negative",
        ),
        (
            json!({"downtime-limit": 2_000_001}),
            "range of 0 to 2000000 milliseconds",
        ),
        (
            json!({"downtime-limit": "300"}),
            "type for 'downtime-limit', expected: integer",
        ),
        (
            json!({"max-bandwidth": 1e9}),
            "type for 'max-bandwidth', expected: integer",
        ),
        (
            json!({"multifd-channels": 9}),
            "'multifd-channels' expects an integer in the range of 1 to 8 (got 9)",
        ),
        (
            json!({"xbzrle-cache-size": 4}),
            "Parameter 'xbzrle-cache-size' is unexpected; migrate-set-parameters takes \
             downtime-limit, max-bandwidth",
        ),
        (
            json!({"downtime_limit": 4}),
            "Parameter 'downtime_limit' is unexpected",
        ),
    ];
    for (arguments, expected) in cases {
        let message = desc(execute("migrate-set-parameters", arguments.clone()));
        assert!(message.contains(expected), "{arguments}: {message}");
    }
}

#[tokio::test]
async fn local_commands_answer_without_the_vm() {
    let (vm, _requests) = VmHandle::new(Some("guest-1".into()));
    let names = Command::QueryCommands.apply(&vm).await.unwrap();
    assert_eq!(names.as_array().unwrap().len(), COMMAND_NAMES.len());
    assert_eq!(names[0], json!({"name": "qmp_capabilities"}));
    assert_eq!(
        Command::QueryName.apply(&vm).await.unwrap(),
        json!({"name": "guest-1"})
    );
    assert_eq!(
        Command::QmpCapabilities.apply(&vm).await.unwrap(),
        json!({})
    );
    let version = Command::QueryVersion.apply(&vm).await.unwrap();
    assert_eq!(
        version["package"],
        format!("ferry {}", env!("CARGO_PKG_VERSION"))
    );
    let (anonymous, _requests) = VmHandle::new(None);
    assert_eq!(
        Command::QueryName.apply(&anonymous).await.unwrap(),
        json!({})
    );
}

#[tokio::test]
async fn the_vm_owners_answer_is_the_reply() {
    let (vm, mut requests) = VmHandle::new(None);
    let owner = tokio::spawn(async move {
        let envelope = requests.recv().await.unwrap();
        assert_eq!(envelope.request, Request::Cont);
        let _ = envelope
            .reply
            .send(Err(RequestError("the guest has shut down".into())));
    });
    let err = Command::Vm(Request::Cont).apply(&vm).await.unwrap_err();
    assert_eq!(
        (err.class(), err.to_string()),
        (ErrorClass::GenericError, "the guest has shut down".into())
    );
    owner.await.unwrap();
}

#[test]
fn migrate_set_capabilities_arguments() {
    let set = |arguments: Value| parse(execute("migrate-set-capabilities", arguments));
    let list = json!({"capabilities": [
        {"capability": "auto-converge", "state": false},
        {"capability": "xbzrle", "state": false},
    ]});
    assert_eq!(
        set(list).unwrap(),
        Command::Vm(Request::MigrateSetCapabilities(vec![
            ("auto-converge".into(), false),
            ("xbzrle".into(), false),
        ]))
    );
    for (arguments, message) in [
        (json!({}), "Parameter 'capabilities' is missing"),
        (
            json!({"capabilities": {"capability": "auto-converge"}}),
            "Invalid parameter type for 'capabilities', expected: array of objects",
        ),
        (
            json!({"capabilities": ["auto-converge"]}),
            "Invalid parameter type for 'capabilities', expected: array of objects",
        ),
        (
            json!({"capabilities": [{"capability": "auto-converge"}]}),
            "Parameter 'state' is missing",
        ),
        (
            json!({"capabilities": [{"capability": "auto-converge", "state": "on"}]}),
            "Invalid parameter type for 'state', expected: boolean",
        ),
        (
            json!({"capabilities": [{"name": "auto-converge", "state": true}]}),
            "Parameter 'name' is unexpected; capabilities takes capability, state",
        ),
    ] {
        assert_eq!(
            desc(execute("migrate-set-capabilities", arguments.clone())),
            message,
            "{arguments}"
        );
    }
    assert_eq!(
        parse(json!({"execute": "query-migrate-capabilities"})).unwrap(),
        Command::Vm(Request::QueryMigrateCapabilities)
    );
}
