//! A blocking QMP client, written against QEMU's protocol, with a deadline on every read.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Why [`Qmp::next_event`] returned without the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEvent {
    TimedOut,
    Closed,
}
use NoEvent::{Closed, TimedOut};

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
        match self.next_event(timeout, matches) {
            Ok(event) => event,
            Err(Closed) => panic!("QMP closed while waiting for {what}"),
            Err(TimedOut) => panic!("no {what} event within {timeout:?}; saw {:?}", self.events),
        }
    }

    /// The first event satisfying `matches`, seen before or arriving within `timeout`; an
    /// arriving one is returned as soon as it is read, so its arrival can be timed.
    pub fn next_event(
        &mut self,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, NoEvent> {
        if let Some(index) = self.events.iter().position(&matches) {
            return Ok(self.events.remove(index));
        }
        let deadline = Instant::now() + timeout;
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(TimedOut);
            }
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => break Err(Closed),
                Ok(_) => {
                    let message: Value = serde_json::from_str(&line).unwrap();
                    if matches(&message) {
                        break Ok(message);
                    }
                    self.events.push(message);
                }
                Err(_) => continue,
            }
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        found
    }

    pub fn status(&mut self) -> String {
        self.ok("query-status", None)["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Polls `query-migrate` until its status is one of `wanted`, returning the last answer.
    pub fn wait_migration(&mut self, wanted: &[&str], timeout: Duration) -> Value {
        self.wait_migration_until(&format!("{wanted:?}"), timeout, |info| {
            wanted.contains(&info["status"].as_str().unwrap_or(""))
        })
    }

    /// Polls `query-migrate` every 20 ms until `done` accepts its answer, at most `timeout`;
    /// returns that answer. `awaited` names what `done` looks for, for the failure message.
    pub fn wait_migration_until(
        &mut self,
        awaited: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.ok("query-migrate", None);
            if done(&info) {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "the migration was never {awaited} within {timeout:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
