//! Outside clients: QEMU's Python library `qemu.qmp`, and `ncat -U` in StratoVirt's
//! transcript style. Without the tool: a failure under `CI=true`, a loud skip elsewhere.

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::require_tool;
use crate::support::{bounded, Harness};

#[tokio::test]
async fn qemus_python_client_library_agrees() {
    if !require_tool(
        "python3",
        &["-c", "import qemu.qmp"],
        "pip install qemu.qmp",
    ) {
        return;
    }
    let harness = Harness::start(None).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/qmp/qemu_qmp_client.py");
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .arg(&harness.path)
        .kill_on_drop(true)
        .output();
    let output = bounded("qemu_qmp_client.py", run).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "qemu_qmp_client.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    harness.stop().await;
}

#[tokio::test]
async fn ncat_transcript_in_stratovirts_style() {
    if !require_tool("ncat", &["--version"], "apt-get install -y ncat") {
        return;
    }
    let harness = Harness::start(None).await;
    let transcript = concat!(
        "{\"execute\":\"qmp_capabilities\"}\n",
        "{\"execute\":\"query-status\"}\n",
        "{\"execute\":\"stop\",\"id\":\"s\"}\n",
        "{\"execute\":\"query-status\"}\n",
        "{\"execute\":\"cont\"}\n",
        "{ \"execute\" : \"query-status\" }\r\n",
        "{\"execute\":\"block-commit\"}\n",
    );
    let mut ncat = tokio::process::Command::new("ncat")
        .arg("-U")
        .arg(&harness.path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = ncat.stdin.take().unwrap();
    stdin.write_all(transcript.as_bytes()).await.unwrap();
    drop(stdin); // ncat half-closes; the server answers everything, then closes
    let output = bounded("ncat", ncat.wait_with_output()).await.unwrap();
    assert!(output.status.success(), "ncat: {:?}", output.status);
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or_default()
        .split('\n')
        .collect();
    assert!(
        lines.iter().all(|line| line.ends_with('\r')),
        "QEMU ends lines with \\r\\n: {text:?}"
    );
    let messages: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (events, replies): (Vec<&Value>, Vec<&Value>) =
        messages[1..].iter().partition(|m| m.get("event").is_some());
    assert!(
        messages[0]["QMP"]["version"]["package"].is_string(),
        "{text}"
    );
    let running = json!({"status": "running", "singlestep": false, "running": true});
    let paused = json!({"status": "paused", "singlestep": false, "running": false});
    let expected = [
        json!({"return": {}}),
        json!({"return": running}),
        json!({"return": {}, "id": "s"}),
        json!({"return": paused}),
        json!({"return": {}}),
        json!({"return": running}),
        json!({"error": {"class": "CommandNotFound", "desc": "The command block-commit has not been found"}}),
    ];
    assert_eq!(
        replies.into_iter().cloned().collect::<Vec<_>>(),
        expected,
        "{text}"
    );
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["STOP", "RESUME"], "{text}");
    harness.stop().await;
}
