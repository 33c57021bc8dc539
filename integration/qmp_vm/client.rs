//! A blocking, line-based QMP client for real ferry processes. It keeps every message it
//! received, in order (so tests can check what came before what), sets events aside while it
//! waits for replies, and bounds every read.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The longest any single QMP exchange may take (ferry's own deadline for the VM owner is
/// 10 s; this leaves a margin).
pub const WAIT: Duration = Duration::from_secs(15);

/// One QMP session.
pub struct Client {
    name: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not finished yet (kept across read timeouts).
    partial: Vec<u8>,
    pub greeting: Value,
    /// Events received and not yet taken by [`Client::event`] or [`Client::take_events`].
    events: VecDeque<Value>,
    /// Every message after the greeting, in arrival order.
    pub transcript: Vec<Value>,
    next_id: u64,
}

impl Client {
    /// Connects to `path` and reads the greeting; `name` appears in failure messages.
    pub fn connect(path: &Path, name: &str) -> Self {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("{name}: cannot connect to {}: {e}", path.display()));
        let writer = stream.try_clone().expect("clone the stream");
        let mut client = Self {
            name: name.to_owned(),
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            greeting: Value::Null,
            events: VecDeque::new(),
            transcript: Vec::new(),
            next_id: 0,
        };
        let greeting = client
            .recv_within(WAIT)
            .unwrap_or_else(|| panic!("{name}: closed before the greeting"));
        assert!(
            greeting.get("QMP").is_some(),
            "{name}: not a greeting: {greeting}"
        );
        client.transcript.clear();
        client.greeting = greeting;
        client
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("{}: write failed: {e}", self.name));
    }

    /// The next message within `timeout`: `Some(message)`, or `None` at end of stream (a
    /// reset counts as an end). Panics when nothing complete arrives in time.
    pub fn recv_within(&mut self, timeout: Duration) -> Option<Value> {
        match self.try_recv(timeout) {
            Ok(message) => message,
            Err(()) => panic!(
                "{}: no message within {timeout:?}; received so far: {:?}",
                self.name, self.transcript
            ),
        }
    }

    /// Like [`Client::recv_within`], but `Err(())` on a timeout instead of a panic.
    pub fn try_recv(&mut self, timeout: Duration) -> Result<Option<Value>, ()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .expect("set a read timeout");
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Ok(None),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    let message: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
                        panic!(
                            "{}: not JSON ({e}): {:?}",
                            self.name,
                            String::from_utf8_lossy(&line)
                        )
                    });
                    self.transcript.push(message.clone());
                    return Ok(Some(message));
                }
                // End of stream in the middle of a line.
                Ok(_) => return Ok(None),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Ok(None),
            }
        }
    }

    pub fn recv(&mut self) -> Value {
        self.recv_within(WAIT)
            .unwrap_or_else(|| panic!("{}: the server closed the connection", self.name))
    }

    /// The next message that is not an event; events are set aside.
    pub fn reply(&mut self) -> Value {
        loop {
            let message = self.recv();
            if message.get("event").is_none() {
                return message;
            }
            self.events.push_back(message);
        }
    }

    /// Sends `request` as one line and returns the reply.
    pub fn request(&mut self, request: &Value) -> Value {
        let mut line = serde_json::to_vec(request).expect("serialise");
        line.push(b'\n');
        self.send_raw(&line);
        self.reply()
    }

    /// Runs `command` with a fresh id (checked in the reply) and returns the whole reply.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        self.next_id += 1;
        let id = json!(format!("{}-{}", self.name, self.next_id));
        let mut request = json!({"execute": command, "id": id});
        if arguments != json!({}) {
            request["arguments"] = arguments;
        }
        let reply = self.request(&request);
        assert_eq!(reply["id"], id, "{}: {command}: {reply}", self.name);
        reply
    }

    /// The `return` of `command`, which must succeed.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        let reply = self.execute(command, arguments.clone());
        match reply.get("return") {
            Some(value) => value.clone(),
            None => panic!("{}: {command} {arguments} failed: {reply}", self.name),
        }
    }

    /// The `error` of `command`, which must fail: `(class, desc)`.
    pub fn error(&mut self, command: &str, arguments: Value) -> (String, String) {
        let reply = self.execute(command, arguments.clone());
        let error = &reply["error"];
        match (error["class"].as_str(), error["desc"].as_str()) {
            (Some(class), Some(desc)) => (class.to_owned(), desc.to_owned()),
            _ => panic!(
                "{}: {command} {arguments} should fail with class and desc: {reply}",
                self.name
            ),
        }
    }

    /// `query-status`' `status`, after checking that `running` agrees with it.
    pub fn status(&mut self) -> String {
        let status = self.ok("query-status", json!({}));
        let name = status["status"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: query-status: {status}", self.name))
            .to_owned();
        assert_eq!(
            status["running"],
            json!(name == "running"),
            "{}: 'running' disagrees with 'status': {status}",
            self.name
        );
        assert_eq!(status["singlestep"], json!(false), "{status}");
        name
    }

    /// The first event called `name`, set aside earlier or arriving within `timeout`. Events
    /// with other names are set aside.
    pub fn event(&mut self, name: &str, timeout: Duration) -> Value {
        if let Some(index) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(index).expect("indexed");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = match self.try_recv(left) {
                Ok(Some(message)) => message,
                Ok(None) => panic!(
                    "{}: closed while waiting for {name}; received: {:?}",
                    self.name, self.transcript
                ),
                Err(()) => panic!(
                    "{}: no {name} event within {timeout:?}; received: {:?}",
                    self.name, self.transcript
                ),
            };
            if message["event"] == name {
                return message;
            }
            assert!(
                message.get("event").is_some(),
                "{}: a reply while waiting for {name}: {message}",
                self.name
            );
            self.events.push_back(message);
        }
    }

    /// Reads for `period` and returns the events that arrived (plus those set aside);
    /// a reply in that time is a failure.
    pub fn events_for(&mut self, period: Duration) -> Vec<Value> {
        let deadline = Instant::now() + period;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.try_recv(left) {
                Ok(Some(message)) => {
                    assert!(
                        message.get("event").is_some(),
                        "{}: an unexpected reply: {message}",
                        self.name
                    );
                    self.events.push_back(message);
                }
                Ok(None) => panic!("{}: the server closed the connection", self.name),
                Err(()) => break,
            }
        }
        self.take_events()
    }

    /// The events set aside so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Reads until the server closes the connection (within `timeout`), returning what came.
    pub fn until_closed(&mut self, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => return messages,
                Err(()) => panic!(
                    "{}: still open after {timeout:?}; received: {:?}",
                    self.name, self.transcript
                ),
            }
        }
    }
}

/// The names of `events`, in order.
pub fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
        .collect()
}
