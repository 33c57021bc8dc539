//! The seam between the control plane (QMP) and the owner of the VM.
//!
//! A QMP session never touches the machine: it turns a command into a [`Request`], sends it
//! with a reply channel through a [`VmHandle`], and waits with a deadline. The VM owner answers
//! with a JSON value already shaped as QEMU shapes that command's `return`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};

/// What a control client asks of the VM owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    QueryStatus,
    Stop,
    Cont,
    Quit,
    SystemReset,
    SystemPowerdown,
    QueryCpusFast,
    /// Guest-physical memory `[addr, addr + size)` to `path`.
    Pmemsave {
        addr: u64,
        size: u64,
        path: PathBuf,
    },
    Migrate {
        uri: String,
    },
    MigrateIncoming {
        uri: String,
    },
    MigrateCancel,
    QueryMigrate,
    MigrateSetParameters(MigrationParameterUpdate),
    QueryMigrateParameters,
    /// `(capability, state)` pairs, as the client listed them.
    MigrateSetCapabilities(Vec<(String, bool)>),
    QueryMigrateCapabilities,
}

/// The parameters of `migrate-set-parameters`; `None` leaves a parameter as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationParameterUpdate {
    /// Milliseconds the guest may be paused at the switchover.
    pub downtime_limit_ms: Option<u64>,
    /// Bytes per second, 0 for unlimited.
    pub max_bandwidth: Option<u64>,
    /// Percent of time vCPUs are held back when throttling starts.
    pub cpu_throttle_initial: Option<u64>,
    /// Percent added each round that the guest still dirties too fast.
    pub cpu_throttle_increment: Option<u64>,
    /// The most the vCPUs are ever held back, in percent.
    pub max_cpu_throttle: Option<u64>,
    /// Seconds after which a migration that has not converged fails; 0 for none.
    pub convergence_timeout_s: Option<u64>,
    /// Connections that carry pages when the `multifd` capability is on.
    pub multifd_channels: Option<u64>,
}

/// Why the VM owner refused or failed a request; the text goes to the client as `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

/// What the VM owner answers: the `return` value of the QMP reply.
pub type Reply = Result<Value, RequestError>;

/// One request and the channel its answer goes back on.
#[derive(Debug)]
pub struct Envelope {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// How long a client waits for the VM owner before it gives up on a request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// A cloneable handle that control clients use to reach the VM owner.
#[derive(Debug, Clone)]
pub struct VmHandle {
    requests: mpsc::Sender<Envelope>,
    events: broadcast::Sender<Event>,
    name: Option<String>,
}

impl VmHandle {
    /// Builds a handle together with the receiving ends the VM owner keeps.
    pub fn new(name: Option<String>) -> (Self, mpsc::Receiver<Envelope>) {
        let (requests, receiver) = mpsc::channel(64);
        let (events, _) = broadcast::channel(256);
        (
            Self {
                requests,
                events,
                name,
            },
            receiver,
        )
    }

    /// The `-name` of the VM, for `query-name`.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Sends `request` and waits for its answer, at most [`REQUEST_DEADLINE`].
    pub async fn call(&self, request: Request) -> Reply {
        let (reply, answer) = oneshot::channel();
        let envelope = Envelope { request, reply };
        let exchange = async {
            self.requests
                .send(envelope)
                .await
                .map_err(|_| RequestError("the VM is shutting down".into()))?;
            answer
                .await
                .map_err(|_| RequestError("the VM is shutting down".into()))?
        };
        tokio::time::timeout(REQUEST_DEADLINE, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(RequestError(format!(
                    "the VM did not answer within {} s",
                    REQUEST_DEADLINE.as_secs()
                )))
            })
    }

    /// A new subscription to the VM's events; each subscriber sees every event sent after it
    /// subscribed.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Publishes an event to every subscriber; having none is not an error.
    pub fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

/// A QMP event: `{"event": name, "data": ..., "timestamp": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    pub timestamp: Timestamp,
}

impl Event {
    pub fn new(name: &str, data: Option<Value>) -> Self {
        Self {
            event: name.to_owned(),
            data,
            timestamp: Timestamp::now(),
        }
    }
}

/// QEMU's event timestamp: wall-clock seconds and microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: since_epoch.as_secs(),
            microseconds: since_epoch.subsec_micros(),
        }
    }
}
