//! What the integration tests share: starting ferry, reading its guest's serial output, a QMP
//! client, and the rule that KVM tests run one at a time (two cores run everything).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use ferry::guest::GuestLine;
use serde_json::{json, Value};

/// The ferry binary cargo built for these tests.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Whether KVM tests can run. Under `CI=true` a missing `/dev/kvm` fails the test; elsewhere
/// the test says loudly that it was skipped.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("/dev/kvm is missing, and CI=true requires the KVM tests to run");
    }
    eprintln!("SKIPPED: /dev/kvm is missing; this KVM test did not run");
    false
}

/// Serialises the KVM tests of one test binary: each VM keeps a core busy, and two cores run
/// everything, so tests that overlapped would measure each other.
pub fn kvm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A scratch directory for one test, removed afterwards.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .expect("a temporary directory")
}

/// One running ferry process with its serial output collected line by line.
pub struct Ferry {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    pub qmp_path: Option<PathBuf>,
    pub name: String,
}

impl Ferry {
    /// Starts ferry with `args`; with `qmp` set, adds `-qmp unix:PATH,server,nowait` and waits
    /// until the socket accepts connections.
    pub fn start(name: &str, args: &[&str], qmp: Option<&Path>) -> Self {
        let mut command = Command::new(ferry_bin());
        command.args(args);
        if let Some(path) = qmp {
            command
                .arg("-qmp")
                .arg(format!("unix:{},server,nowait", path.display()));
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "ferry=info");
        }
        let mut child = command.spawn().expect("ferry starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let ferry = Self {
            child,
            lines,
            stderr,
            qmp_path: qmp.map(Path::to_owned),
            name: name.into(),
        };
        if let Some(path) = qmp {
            let deadline = Instant::now() + Duration::from_secs(10);
            while UnixStream::connect(path).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "{name}: QMP socket never appeared\n{}",
                    ferry.stderr()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        ferry
    }

    /// The serial output so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The serial output so far, parsed as the built-in guest's protocol.
    pub fn guest_lines(&self) -> Vec<GuestLine> {
        self.lines().iter().map(|l| GuestLine::parse(l)).collect()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Why a test gave up: the tail of the serial output and ferry's log.
    pub fn context(&self) -> String {
        let lines = self.lines();
        let tail = &lines[lines.len().saturating_sub(15)..];
        format!(
            "--- {} serial (last {} of {} lines) ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail.len(),
            lines.len(),
            tail.join("\n"),
            self.name,
            self.stderr()
        )
    }

    /// Waits until a serial line after the first `skip` lines satisfies `matches`; returns its
    /// index and the line.
    pub fn wait_line_from(
        &self,
        skip: usize,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self
                .lines()
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, l)| matches(l))
            {
                return (found.0, found.1.clone());
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {timeout:?}\n{}",
                self.name,
                self.context()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_line(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_line_from(0, what, timeout, matches).1
    }

    /// Waits until the guest has printed `ready`.
    pub fn wait_ready(&self) {
        self.wait_line("guest 'ready'", Duration::from_secs(60), |l| l == "ready");
    }

    /// Opens a QMP session.
    pub fn qmp(&self) -> Qmp {
        let path = self.qmp_path.as_deref().expect("started with QMP");
        match UnixStream::connect(path) {
            Ok(_) => Qmp::connect(path),
            Err(error) => panic!(
                "{}: QMP at {} refuses: {error}\n{}",
                self.name,
                path.display(),
                self.context()
            ),
        }
    }

    /// Waits for the process to end, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                // Let the reader threads drain what the process wrote last.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still running after {timeout:?}\n{}",
                self.name,
                self.context()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with a pid we own and a valid signal number.
        unsafe { libc::kill(self.pid(), signal) };
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("waitpid").is_none()
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP client written against QEMU's protocol, with a deadline on every read.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub greeting: Value,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("QMP connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).expect("QMP greeting");
        let greeting = serde_json::from_str(&line).expect("greeting is JSON");
        Self {
            reader,
            writer,
            greeting,
            events: Vec::new(),
        }
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .expect("QMP answers in time");
        assert!(read > 0, "QMP closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent non-JSON {line:?}: {e}"))
    }

    /// Sends a command and returns the whole reply (`return` or `error`), keeping events.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Value {
        let mut request = json!({"execute": command});
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        writeln!(self.writer, "{request}").expect("QMP write");
        loop {
            let message = self.read();
            if message.get("event").is_some() {
                self.events.push(message);
            } else {
                return message;
            }
        }
    }

    /// Sends a command that must succeed and returns its `return` value.
    pub fn ok(&mut self, command: &str, arguments: Option<Value>) -> Value {
        let reply = self.execute(command, arguments.clone());
        match reply.get("return") {
            Some(value) => value.clone(),
            None => panic!("{command} {arguments:?} failed: {reply}"),
        }
    }

    /// The `desc` of a command that must fail.
    pub fn error(&mut self, command: &str, arguments: Option<Value>) -> String {
        let reply = self.execute(command, arguments.clone());
        reply["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("{command} {arguments:?} should fail: {reply}"))
            .to_owned()
    }

    /// Waits for an event satisfying `matches` (seen before or arriving within `timeout`).
    pub fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(index) = self.events.iter().position(&matches) {
            return self.events.remove(index);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} event within {timeout:?}; saw {:?}",
                self.events
            );
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("QMP closed while waiting for {what}"),
                Ok(_) => {
                    let message: Value = serde_json::from_str(&line).unwrap();
                    if matches(&message) {
                        self.reader
                            .get_ref()
                            .set_read_timeout(Some(Duration::from_secs(30)))
                            .unwrap();
                        return message;
                    }
                    self.events.push(message);
                }
                Err(_) => continue,
            }
        }
    }

    pub fn status(&mut self) -> String {
        self.ok("query-status", None)["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Polls `query-migrate` until its status is one of `wanted`, returning the last answer.
    pub fn wait_migration(&mut self, wanted: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.ok("query-migrate", None);
            if wanted.contains(&info["status"].as_str().unwrap_or("")) {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "migration never reached {wanted:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A cache directory that survives between test runs (for downloads).
pub fn cache_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("FERRY_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("cache"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
    .clone()
}
