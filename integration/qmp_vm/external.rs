//! Outside clients against real ferry processes: QEMU's Python library `qemu.qmp`, and `ncat -U`
//! replaying StratoVirt's migration guide. Without the tool: a failure under `CI=true`, a loud
//! skip elsewhere.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::names;
use crate::common::require_tool;
use crate::common::{free_port, kvm_available, kvm_lock, Ferry};
use crate::support::{
    assert_no_panic, assert_quiet, assert_runs, connect, run_bounded, World, BOOT, MEM_MIB,
};

/// How long a migration of the 64 MiB test guest may take.
const MIGRATION: Duration = Duration::from_secs(60);

#[test]
fn qemus_python_client_drives_a_real_vm() {
    if !kvm_available() {
        return;
    }
    if !require_tool(
        "python3",
        &["-c", "import qemu.qmp"],
        "pip install qemu.qmp",
    ) {
        return;
    }
    let _lock = kvm_lock();
    let mut world = World::new();
    let vm = world.running("python", &[]);
    let mut watcher = connect(&vm, "watcher");
    watcher.ok("qmp_capabilities", json!({}));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/qmp/qemu_qmp_client.py");
    let mut command = Command::new("python3");
    command.arg(script).arg(vm.qmp_path.as_deref().unwrap());
    let output = run_bounded(command, Duration::from_secs(60));
    assert!(
        output.status.success() && output.stdout.contains("all checks passed"),
        "qemu_qmp_client.py: {}\n{}\n{}\n{}",
        output.status,
        output.stdout,
        output.stderr,
        vm.context()
    );
    // What the library did, seen from another session and from the guest.
    watcher.event("STOP", Duration::from_secs(5));
    watcher.event("RESUME", Duration::from_secs(5));
    assert_eq!(watcher.status(), "running");
    assert_runs(&vm, "after the Python client");
    assert_no_panic(&vm);
}

/// `ncat -U SOCKET` with its input fed line by line and its output read as it comes.
struct Ncat {
    child: std::process::Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Everything ncat printed so far, for failure messages.
    output: Vec<String>,
}

impl Ncat {
    fn start(socket: &Path) -> Self {
        let mut child = Command::new("ncat")
            .arg("-U")
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ncat starts");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            // `lines()` would hide the `\r` of `\r\n`; the test checks it.
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&line).into_owned();
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            output: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to ncat");
        stdin.flush().expect("flush to ncat");
    }

    /// The next line ncat printed, parsed; `None` once ncat's output ended.
    fn next(&mut self, timeout: Duration) -> Option<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.output.push(line.clone());
                assert!(
                    line.ends_with("\r\n"),
                    "QEMU ends lines with \\r\\n: {line:?}"
                );
                Some(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("ncat printed non-JSON {line:?}: {e}")),
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "ncat printed nothing within {timeout:?}; so far: {:?}",
                self.output
            ),
        }
    }

    /// The next line that is not an event.
    fn reply(&mut self) -> Value {
        loop {
            let message = self
                .next(Duration::from_secs(15))
                .unwrap_or_else(|| panic!("ncat's output ended: {:?}", self.output));
            if message.get("event").is_none() {
                return message;
            }
        }
    }

    /// Closes ncat's input, reads the rest and waits for ncat to exit; returns all it printed.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        while self.next(Duration::from_secs(15)).is_some() {}
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "ncat did not exit: {:?}",
                self.output
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "ncat: {status}: {:?}", self.output);
        std::mem::take(&mut self.output)
    }
}

impl Drop for Ncat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// StratoVirt's migration guide, typed into `ncat -U` on the source's QMP socket.
fn stratovirt_migration_guide(uri: &str) {
    let mut world = World::new();
    let source = world.running("source", &[]);
    let destination = world.start("destination", &["-incoming", uri]);
    let mut dst_qmp = connect(&destination, "dst");
    assert_eq!(dst_qmp.status(), "inmigrate");
    let (_, desc) = dst_qmp.error("system_powerdown", json!({}));
    assert!(desc.contains("incoming migration"), "{desc}");

    let mut ncat = Ncat::start(source.qmp_path.as_deref().unwrap());
    let greeting = ncat.next(Duration::from_secs(15)).expect("a greeting");
    assert!(
        greeting["QMP"]["version"]["package"].is_string(),
        "{greeting}"
    );
    ncat.send(&format!(
        r#"{{"execute":"migrate", "arguments":{{"uri":"{uri}"}}}}"#
    ));
    assert_eq!(ncat.reply(), json!({"return": {}}));
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Instant::now() + MIGRATION;
    let info = loop {
        ncat.send(r#"{"execute":"query-migrate"}"#);
        let reply = ncat.reply();
        let info = reply
            .get("return")
            .unwrap_or_else(|| panic!("query-migrate failed: {reply}"))
            .clone();
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("setup" | "active") => {}
            _ => panic!(
                "the migration did not complete: {info}\n{}\n{}",
                source.context(),
                destination.context()
            ),
        }
        assert!(
            Instant::now() < deadline,
            "still not completed after {MIGRATION:?}: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The README's shape of a completed migration.
    for field in ["total-time", "setup-time", "downtime"] {
        assert!(info[field].is_u64(), "{field}: {info}");
    }
    let ram = &info["ram"];
    assert_eq!(ram["total"], MEM_MIB << 20, "{info}");
    assert_eq!(ram["remaining"], 0, "{info}");
    assert_eq!(ram["page-size"], 4096, "{info}");
    assert!(ram["transferred"].as_u64().unwrap_or(0) > 0, "{info}");
    assert!(ram["dirty-sync-count"].as_u64().unwrap_or(0) >= 1, "{info}");
    for field in ["duplicate", "normal", "normal-bytes", "dirty-pages-rate"] {
        assert!(ram[field].is_u64(), "{field}: {info}");
    }
    assert!(ram["mbps"].is_number(), "{info}");
    assert!(info.get("error-desc").is_none(), "{info}");

    ncat.send(r#"{"execute":"migrate_cancel"}"#);
    assert_eq!(ncat.reply(), json!({"return": {}}));
    // Cancelling a finished migration changes nothing.
    ncat.send(r#"{"execute":"query-migrate"}"#);
    assert_eq!(ncat.reply()["return"]["status"], "completed");
    let output = ncat.finish();
    let events: Vec<Value> = output
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m.get("event").is_some())
        .collect();
    // The source stopped its guest for the switchover.
    assert!(
        names(&events).contains(&"STOP".to_owned()),
        "{:?}",
        names(&events)
    );

    // The guest runs on the destination, and only there.
    let mut src_qmp = connect(&source, "src");
    assert_eq!(src_qmp.status(), "postmigrate");
    assert_quiet(&source, "the source after the migration");
    assert_eq!(dst_qmp.status(), "running");
    dst_qmp.event("RESUME", Duration::from_secs(5));
    wait_ticks_on(&destination);
    assert_eq!(
        src_qmp.ok("query-migrate", json!({}))["status"],
        "completed"
    );
    assert_no_panic(&source);
    assert_no_panic(&destination);
}

/// The destination's guest prints ticks (it printed nothing before the migration).
fn wait_ticks_on(destination: &Ferry) {
    destination.wait_line("a tick on the destination", BOOT, |l| {
        l.starts_with("tick ")
    });
    assert_runs(destination, "on the destination");
}

fn ncat_ready() -> bool {
    require_tool("ncat", &["--version"], "apt-get install -y ncat")
}

#[test]
fn ncat_replays_stratovirts_migration_guide_over_tcp() {
    if !kvm_available() || !ncat_ready() {
        return;
    }
    let _lock = kvm_lock();
    stratovirt_migration_guide(&format!("tcp:127.0.0.1:{}", free_port()));
}

#[test]
fn ncat_replays_stratovirts_migration_guide_over_unix() {
    if !kvm_available() || !ncat_ready() {
        return;
    }
    let _lock = kvm_lock();
    let dir = crate::common::scratch();
    let socket = dir.path().join("migration.sock");
    stratovirt_migration_guide(&format!("unix:{}", socket.display()));
}
