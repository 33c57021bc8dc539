//! The VM owner: one tokio task that holds the machine and the vCPU threads, answers control
//! requests, and reacts to guest events and host signals.

use std::path::PathBuf;

use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::control::{Envelope, Event, Request, RequestError, VmHandle};
use super::vcpus::Vcpus;
use super::GuestEvent;
use crate::cli::Config;
use crate::machine::memory::GuestMemory;
use crate::machine::Machine;

/// QEMU's run states, as `query-status` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Started with `-S`, never run yet.
    Prelaunch,
    Running,
    Paused,
    /// The guest or the host ended the VM.
    Shutdown,
    /// Waiting for or receiving an incoming migration.
    InMigrate,
    /// Paused at the switchover of an outgoing migration.
    FinishMigrate,
    /// An outgoing migration completed: the guest runs on the destination now.
    PostMigrate,
    /// A vCPU hit something it cannot go on from.
    InternalError,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Prelaunch => "prelaunch",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Shutdown => "shutdown",
            Self::InMigrate => "inmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::PostMigrate => "postmigrate",
            Self::InternalError => "internal-error",
        }
    }
}

/// How the VM ended, which decides ferry's exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Shut down by the guest, QMP or a signal: exit status 0.
    Clean,
    /// Ended by an error: exit status 1.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vcpu(#[from] super::vcpu::VcpuError),
    #[error("cannot watch for signals: {0}")]
    Signals(#[source] std::io::Error),
}

/// The owner of the VM.
pub struct Vmm {
    pub machine: Machine,
    pub vcpus: Vcpus,
    pub status: RunStatus,
    pub handle: VmHandle,
    pub config: Config,
    shutdown: CancellationToken,
}

impl Vmm {
    pub fn new(
        mut machine: Machine,
        config: Config,
        handle: VmHandle,
        guest_events: mpsc::UnboundedSender<GuestEvent>,
        shutdown: CancellationToken,
    ) -> Result<Self, VmmError> {
        let vcpu_fds = std::mem::take(&mut machine.vcpus);
        let vcpus = Vcpus::spawn(vcpu_fds, machine.devices.clone(), guest_events)?;
        Ok(Self {
            machine,
            vcpus,
            status: RunStatus::Prelaunch,
            handle,
            config,
            shutdown,
        })
    }

    /// Runs the VM until it ends.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<Envelope>,
        mut guest_events: mpsc::UnboundedReceiver<GuestEvent>,
    ) -> Result<Ending, VmmError> {
        let mut interrupt = signal(SignalKind::interrupt()).map_err(VmmError::Signals)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(VmmError::Signals)?;
        if !self.config.start_paused {
            self.vcpus.resume().await?;
            self.status = RunStatus::Running;
        }
        let ending = loop {
            tokio::select! {
                Some(envelope) = requests.recv() => {
                    if let Some(ending) = self.handle_request(envelope).await {
                        break ending;
                    }
                }
                Some(event) = guest_events.recv() => {
                    if let Some(ending) = self.handle_guest_event(event) {
                        break ending;
                    }
                }
                _ = interrupt.recv() => break self.host_shutdown("host-signal"),
                _ = terminate.recv() => break self.host_shutdown("host-signal"),
            }
        };
        self.vcpus.finish();
        self.shutdown.cancel();
        Ok(ending)
    }

    fn host_shutdown(&mut self, reason: &str) -> Ending {
        tracing::info!(reason, "shutting down");
        self.status = RunStatus::Shutdown;
        self.handle.emit(Event::new(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": reason})),
        ));
        Ending::Clean
    }

    fn handle_guest_event(&mut self, event: GuestEvent) -> Option<Ending> {
        let reason = match event {
            GuestEvent::Reset | GuestEvent::TripleFault => "guest-reset",
            GuestEvent::Poweroff => "guest-shutdown",
            GuestEvent::Crashed(reason) => {
                tracing::error!("{reason}");
                self.status = RunStatus::InternalError;
                return Some(Ending::Failed(reason));
            }
        };
        tracing::info!(?event, "the guest ended the VM");
        self.status = RunStatus::Shutdown;
        self.handle.emit(Event::new(
            "SHUTDOWN",
            Some(json!({"guest": true, "reason": reason})),
        ));
        Some(Ending::Clean)
    }

    /// Answers one request; `Some` when the request ends the VM.
    async fn handle_request(&mut self, envelope: Envelope) -> Option<Ending> {
        let Envelope { request, reply } = envelope;
        let mut ending = None;
        let answer = match request {
            Request::QueryStatus => Ok(self.query_status()),
            Request::Stop => self.stop().await,
            Request::Cont => self.cont().await,
            Request::Quit => {
                ending = Some(self.host_shutdown("host-qmp-quit"));
                Ok(json!({}))
            }
            Request::SystemReset => {
                // Like a guest reset, a reset ends the VM (QEMU's -no-reboot behaviour).
                self.handle.emit(Event::new("RESET", Some(json!({"guest": false, "reason": "host-qmp-system-reset"}))));
                ending = Some(self.host_shutdown("host-qmp-system-reset"));
                Ok(json!({}))
            }
            Request::SystemPowerdown => Err(RequestError(
                "system_powerdown needs an ACPI power button, which this machine does not have; use 'quit'"
                    .into(),
            )),
            Request::QueryCpusFast => Ok(self.query_cpus_fast()),
            Request::Pmemsave { addr, size, path } => {
                let memory = self.machine.memory.clone();
                // Dumping gigabytes must not hold up other requests: answer from a task.
                tokio::task::spawn_blocking(move || {
                    let _ = reply.send(pmemsave(&memory, addr, size, &path));
                });
                return None;
            }
            other => Err(RequestError(format!("{other:?} is not available yet"))),
        };
        let _ = reply.send(answer);
        ending
    }

    fn query_status(&self) -> Value {
        json!({
            "status": self.status.name(),
            "running": self.status == RunStatus::Running,
            "singlestep": false,
        })
    }

    fn query_cpus_fast(&self) -> Value {
        let cpus: Vec<Value> = self
            .vcpus
            .thread_ids()
            .into_iter()
            .enumerate()
            .map(|(index, thread_id)| {
                json!({
                    "cpu-index": index,
                    "qom-path": format!("/machine/unattached/device[{index}]"),
                    "thread-id": thread_id,
                    "props": {"core-id": index, "thread-id": 0, "socket-id": 0},
                    "target": "x86_64",
                })
            })
            .collect();
        Value::Array(cpus)
    }

    async fn stop(&mut self) -> Result<Value, RequestError> {
        match self.status {
            RunStatus::Running => {
                self.vcpus
                    .pause()
                    .await
                    .map_err(|e| RequestError(e.to_string()))?;
                self.status = RunStatus::Paused;
                self.handle.emit(Event::new("STOP", None));
            }
            RunStatus::Prelaunch => self.status = RunStatus::Paused,
            _ => {}
        }
        Ok(json!({}))
    }

    async fn cont(&mut self) -> Result<Value, RequestError> {
        match self.status {
            RunStatus::Paused | RunStatus::Prelaunch => {
                self.vcpus.resume().await.map_err(|e| RequestError(e.to_string()))?;
                self.status = RunStatus::Running;
                self.handle.emit(Event::new("RESUME", None));
                Ok(json!({}))
            }
            RunStatus::Running => Ok(json!({})),
            RunStatus::PostMigrate => Err(RequestError(
                "the guest was migrated and runs on the destination; resuming it here would run two copies"
                    .into(),
            )),
            other => Err(RequestError(format!("cannot continue a VM in state '{}'", other.name()))),
        }
    }
}

/// Writes guest-physical memory `[addr, addr + size)` to `path`; every byte must be RAM.
pub fn pmemsave(
    memory: &GuestMemory,
    addr: u64,
    size: u64,
    path: &PathBuf,
) -> Result<Value, RequestError> {
    let end = addr
        .checked_add(size)
        .ok_or_else(|| RequestError(format!("pmemsave: {addr:#x} + {size:#x} overflows")))?;
    let mut file = std::fs::File::create(path)
        .map_err(|e| RequestError(format!("pmemsave: cannot create '{}': {e}", path.display())))?;
    let mut at = addr;
    while at < end {
        let region = memory.find_region(GuestAddress(at)).ok_or_else(|| {
            RequestError(format!(
                "pmemsave: {at:#x} is not guest RAM (the range {addr:#x}..{end:#x} must lie within RAM)"
            ))
        })?;
        let region_end = vm_memory::GuestMemoryRegion::start_addr(region).0
            + vm_memory::GuestMemoryRegion::len(region);
        let chunk = (end.min(region_end) - at) as usize;
        memory
            .write_volatile_to(GuestAddress(at), &mut file, chunk)
            .and_then(|written| {
                if written == chunk {
                    Ok(())
                } else {
                    memory.write_all_volatile_to(
                        GuestAddress(at + written as u64),
                        &mut file,
                        chunk - written,
                    )
                }
            })
            .map_err(|e| {
                RequestError(format!(
                    "pmemsave: writing '{}' failed: {e}",
                    path.display()
                ))
            })?;
        at += chunk as u64;
    }
    Ok(json!({}))
}
