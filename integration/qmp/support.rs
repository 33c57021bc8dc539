//! For `qmp_protocol.rs`: a fake VM owner, a server harness around it, and a line-based
//! QMP client. Every wait is bounded by [`WAIT`].

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::qmp::{self, QmpError, SocketFileGuard};
use ferry::runtime::control::{Envelope, Event, Request, RequestError, VmHandle};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest any single step of a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// `future`, or a panic naming `what` after [`WAIT`].
pub async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// A QMP server on a socket in a temporary directory, with a fake VM owner behind it.
pub struct Harness {
    _dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
    pub vm: VmHandle,
    /// The server's token; the fake owner cancels it on `quit`, as the real one does.
    pub shutdown: CancellationToken,
    server: JoinHandle<Result<(), QmpError>>,
    guard: SocketFileGuard,
    owner: JoinHandle<Vec<Request>>,
    owner_stop: CancellationToken,
}

impl Harness {
    pub async fn start(name: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        Self::start_inner(path, Some(dir), name)
    }

    pub async fn start_at(path: &Path, name: Option<&str>) -> Self {
        Self::start_inner(path.to_owned(), None, name)
    }

    fn start_inner(path: PathBuf, dir: Option<tempfile::TempDir>, name: Option<&str>) -> Self {
        let (listener, guard) = qmp::bind(&path).expect("bind").into_parts();
        let (vm, requests) = VmHandle::new(name.map(str::to_owned));
        let shutdown = CancellationToken::new();
        let owner_stop = CancellationToken::new();
        let owner = tokio::spawn(fake_owner(
            vm.clone(),
            requests,
            shutdown.clone(),
            owner_stop.clone(),
        ));
        let server = tokio::spawn(qmp::serve(listener, vm.clone(), shutdown.clone()));
        Self {
            _dir: dir,
            path,
            vm,
            shutdown,
            server,
            guard,
            owner,
            owner_stop,
        }
    }

    /// Shuts the server down (checking that it returns in time and that the socket file goes
    /// with the guard), then the owner; returns every request the owner saw, in order.
    pub async fn stop(self) -> Vec<Request> {
        self.shutdown.cancel();
        let served = bounded("serve() to return", self.server)
            .await
            .expect("serve panicked");
        served.expect("serve failed");
        drop(self.guard);
        assert!(
            std::fs::symlink_metadata(&self.path).is_err(),
            "socket file left behind"
        );
        self.owner_stop.cancel();
        bounded("the fake owner", self.owner)
            .await
            .expect("the fake owner panicked")
    }
}

/// Answers requests until `stop`, recording each.
async fn fake_owner(
    vm: VmHandle,
    mut requests: mpsc::Receiver<Envelope>,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> Vec<Request> {
    let mut machine = FakeVm {
        running: true,
        downtime_limit_ms: 300,
        max_bandwidth: 134_217_728,
        migration: None,
    };
    let mut seen = Vec::new();
    loop {
        let envelope = tokio::select! {
            () = stop.cancelled() => return seen,
            envelope = requests.recv() => match envelope {
                Some(envelope) => envelope,
                None => return seen,
            },
        };
        seen.push(envelope.request.clone());
        machine.answer(envelope, &vm, &shutdown);
    }
}

/// The state the fake owner keeps, and the reply shapes the real owner must produce.
struct FakeVm {
    running: bool,
    downtime_limit_ms: u64,
    max_bandwidth: u64,
    migration: Option<&'static str>,
}

impl FakeVm {
    fn answer(&mut self, envelope: Envelope, vm: &VmHandle, shutdown: &CancellationToken) {
        let Envelope { request, reply } = envelope;
        let answer = match request {
            Request::QueryStatus => Ok(json!({
                "status": if self.running { "running" } else { "paused" },
                "singlestep": false,
                "running": self.running,
            })),
            // Like QEMU: stopping a stopped VM succeeds and emits nothing.
            Request::Stop => {
                if std::mem::replace(&mut self.running, false) {
                    vm.emit(Event::new("STOP", None));
                }
                Ok(json!({}))
            }
            Request::Cont => {
                if !std::mem::replace(&mut self.running, true) {
                    vm.emit(Event::new("RESUME", None));
                }
                Ok(json!({}))
            }
            Request::Quit => {
                let data = json!({"guest": false, "reason": "host-qmp-quit"});
                vm.emit(Event::new("SHUTDOWN", Some(data)));
                let _ = reply.send(Ok(json!({})));
                shutdown.cancel();
                return;
            }
            Request::SystemReset => {
                let data = json!({"guest": false, "reason": "host-qmp-system-reset"});
                vm.emit(Event::new("RESET", Some(data)));
                Ok(json!({}))
            }
            Request::SystemPowerdown => {
                vm.emit(Event::new("POWERDOWN", None));
                Ok(json!({}))
            }
            Request::QueryCpusFast => Ok(json!([{
                "cpu-index": 0,
                "qom-path": "/machine/unattached/device[0]",
                "thread-id": std::process::id(),
                "props": {"socket-id": 0, "core-id": 0, "thread-id": 0},
                "target": "x86_64",
            }])),
            // A slow answer, for a client that leaves before it comes.
            Request::Pmemsave { path, .. } if path == Path::new("/slow") => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = reply.send(Ok(json!({})));
                });
                return;
            }
            Request::Pmemsave { .. } => Ok(json!({})),
            Request::Migrate { uri } if uri.starts_with("tcp:") || uri.starts_with("unix:") => {
                self.migration = Some("active");
                Ok(json!({}))
            }
            Request::Migrate { uri } => Err(RequestError(format!(
                "Invalid uri '{uri}': use tcp:HOST:PORT or unix:PATH"
            ))),
            Request::MigrateIncoming { .. } => Ok(json!({})),
            Request::MigrateCancel => {
                if self.migration == Some("active") {
                    self.migration = Some("cancelled");
                }
                Ok(json!({}))
            }
            Request::QueryMigrate => Ok(match self.migration {
                None => json!({}),
                Some(status) => json!({"status": status}),
            }),
            Request::MigrateSetParameters(update) => {
                self.downtime_limit_ms = update.downtime_limit_ms.unwrap_or(self.downtime_limit_ms);
                self.max_bandwidth = update.max_bandwidth.unwrap_or(self.max_bandwidth);
                Ok(json!({}))
            }
            Request::QueryMigrateParameters => Ok(json!({
                "downtime-limit": self.downtime_limit_ms,
                "max-bandwidth": self.max_bandwidth,
            })),
            Request::MigrateSetCapabilities(_) => Ok(json!({})),
            Request::QueryMigrateCapabilities => Ok(json!([])),
        };
        let _ = reply.send(answer);
    }
}

/// A QMP client that reads one JSON message per line and sets events aside while it waits
/// for replies.
pub struct Client {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    /// Connects and returns the greeting.
    pub async fn connect(path: &Path) -> (Self, Value) {
        let stream = bounded("connect", UnixStream::connect(path))
            .await
            .expect("connect");
        let (read, writer) = stream.into_split();
        let lines = BufReader::new(read).lines();
        let mut client = Self {
            lines,
            writer,
            events: VecDeque::new(),
            next_id: 0,
        };
        let greeting = client.recv().await;
        assert!(greeting.get("QMP").is_some(), "not a greeting: {greeting}");
        (client, greeting)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        bounded("a write", self.writer.write_all(bytes))
            .await
            .expect("write");
    }

    /// The next message, or `None` once the server has closed the connection.
    pub async fn recv_or_eof(&mut self) -> Option<Value> {
        // A reset is a close too: the server may close with our bytes unread.
        let line = bounded("a message", self.lines.next_line())
            .await
            .ok()
            .flatten()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line:?}")))
    }

    pub async fn recv(&mut self) -> Value {
        self.recv_or_eof()
            .await
            .expect("the server closed the connection")
    }

    /// The next message that is not an event.
    pub async fn reply(&mut self) -> Value {
        loop {
            let message = self.recv().await;
            if message.get("event").is_none() {
                return message;
            }
            self.events.push_back(message);
        }
    }

    pub async fn request(&mut self, request: &Value) -> Value {
        let mut line = serde_json::to_vec(request).expect("serialise");
        line.push(b'\n');
        self.send(&line).await;
        self.reply().await
    }

    /// Runs `command` with a fresh id and checks that the reply echoes it.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Value {
        self.next_id += 1;
        let id = json!(self.next_id);
        let reply = self
            .request(&json!({"execute": command, "arguments": arguments, "id": id}))
            .await;
        assert_eq!(reply["id"], id, "{command}: {reply}");
        reply
    }

    /// The `return` of `command`, which must succeed.
    pub async fn ok(&mut self, command: &str, arguments: Value) -> Value {
        let reply = self.execute(command, arguments).await;
        reply
            .get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{command} failed: {reply}"))
    }

    /// The first event called `name`, set aside earlier or still to come.
    pub async fn event(&mut self, name: &str) -> Value {
        if let Some(index) = self.events.iter().position(|event| event["event"] == name) {
            return self.events.remove(index).expect("indexed");
        }
        loop {
            let message = self.recv().await;
            if message["event"] == name {
                return message;
            }
            assert!(
                message.get("event").is_some(),
                "a reply while waiting for {name}: {message}"
            );
            self.events.push_back(message);
        }
    }

    /// The events set aside so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }
}
