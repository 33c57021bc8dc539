//! The VM owner: one tokio task that holds the VM, answers control requests, and reacts to
//! guest events, host signals and the end of migrations.
//!
//! A migration borrows the VM by move: the owner hands the [`Vm`] to a migration task and gets
//! it back when the task ends, whatever the outcome. Meanwhile the owner keeps answering QMP
//! from what it holds itself (status, memory handle, thread ids, migration progress).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::control::{Envelope, Event, Request, RequestError, VmHandle};
use super::vcpus::Vcpus;
use super::{GuestEvent, Vm};
use crate::cli::Config;
use crate::machine::memory::GuestMemory;
use crate::machine::Machine;
use crate::migrate::transport::Listener;
use crate::migrate::Shared;

mod migration;

use self::migration::{wait_migration, RunningMigration};

/// How long the owner waits for a migration task to hand the VM back at shutdown.
const MIGRATION_STOP_DEADLINE: Duration = Duration::from_secs(5);

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
    /// `None` while a migration task holds the VM.
    vm: Option<Vm>,
    memory: GuestMemory,
    thread_ids: Vec<i32>,
    status: RunStatus,
    handle: VmHandle,
    shutdown: CancellationToken,
    migration: Arc<Shared>,
    running_migration: Option<RunningMigration>,
}

impl Vmm {
    pub fn new(
        mut machine: Machine,
        config: &Config,
        handle: VmHandle,
        shutdown: CancellationToken,
    ) -> Result<Self, VmmError> {
        let vcpu_fds = std::mem::take(&mut machine.vcpus);
        let vcpus = Vcpus::spawn(
            vcpu_fds,
            machine.devices.clone(),
            machine.guest_events.clone(),
        )?;
        Ok(Self {
            memory: machine.memory.clone(),
            thread_ids: vcpus.thread_ids(),
            vm: Some(Vm {
                machine,
                vcpus,
                dirty_log: Default::default(),
            }),
            status: RunStatus::Prelaunch,
            migration: Arc::new(Shared::new(handle.clone(), !config.start_paused)),
            handle,
            shutdown,
            running_migration: None,
        })
    }

    /// Runs the VM until it ends. `incoming` is the listener of `-incoming`, if any.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<Envelope>,
        mut guest_events: mpsc::UnboundedReceiver<GuestEvent>,
        incoming: Option<Option<Listener>>,
    ) -> Result<Ending, VmmError> {
        let mut interrupt = signal(SignalKind::interrupt()).map_err(VmmError::Signals)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(VmmError::Signals)?;
        match incoming {
            Some(listener) => {
                self.status = RunStatus::InMigrate;
                if let Some(listener) = listener {
                    self.start_incoming(listener);
                }
            }
            None if self.migration.autostart() => {
                self.vm_mut().vcpus.resume().await?;
                self.status = RunStatus::Running;
            }
            None => {}
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
                finished = wait_migration(&mut self.running_migration) => {
                    self.running_migration = None;
                    if let Some(ending) = self.migration_ended(finished).await {
                        break ending;
                    }
                }
                _ = interrupt.recv() => break self.host_shutdown("host-signal"),
                _ = terminate.recv() => break self.host_shutdown("host-signal"),
            }
        };
        if let Some(running) = self.running_migration.take() {
            running.cancel.cancel();
            match tokio::time::timeout(MIGRATION_STOP_DEADLINE, running.task).await {
                Ok(Ok((vm, _))) => self.vm = Some(vm),
                _ => tracing::error!("the migration task did not stop in time"),
            }
        }
        if let Some(vm) = self.vm.as_mut() {
            vm.vcpus.finish();
        }
        self.shutdown.cancel();
        Ok(ending)
    }

    fn vm_mut(&mut self) -> &mut Vm {
        self.vm
            .as_mut()
            .expect("the owner holds the VM when no migration runs")
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
        // `query-migrate` answers from the progress record as it is; everything else, the run
        // state included, waits for a migration that said it ended to hand the VM back, so
        // that `completed` is never followed by a `query-status` that still says `running`.
        if !matches!(request, Request::QueryMigrate) {
            if let Some(ending) = self.settle_ended_migration().await {
                let _ = reply.send(Err(RequestError(format!("the VM has ended: {ending:?}"))));
                return Some(ending);
            }
        }
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
                let data = json!({"guest": false, "reason": "host-qmp-system-reset"});
                self.handle.emit(Event::new("RESET", Some(data)));
                ending = Some(self.host_shutdown("host-qmp-system-reset"));
                Ok(json!({}))
            }
            Request::SystemPowerdown => self.system_powerdown(),
            Request::QueryCpusFast => Ok(self.query_cpus_fast()),
            Request::Pmemsave { addr, size, path } => {
                let memory = self.memory.clone();
                // Dumping gigabytes must not hold up other requests: answer from a task.
                tokio::task::spawn_blocking(move || {
                    let _ = reply.send(pmemsave(&memory, addr, size, &path));
                });
                return None;
            }
            Request::Migrate { uri } => self.start_outgoing(&uri),
            Request::MigrateIncoming { uri } => self.migrate_incoming(&uri).await,
            Request::MigrateCancel => {
                if let Some(running) = &self.running_migration {
                    tracing::debug!("migrate_cancel: stopping the migration");
                    running.cancel.cancel();
                }
                Ok(json!({}))
            }
            Request::QueryMigrate => Ok(self.migration.progress().to_json()),
            Request::MigrateSetParameters(update) => self
                .migration
                .params()
                .update(&update)
                .map(|()| json!({}))
                .map_err(RequestError),
            Request::QueryMigrateParameters => Ok(self.migration.params().to_json()),
            // As QEMU: capabilities hold for a whole migration, so they change between them.
            Request::MigrateSetCapabilities(changes) => self.busy_migrating().and_then(|()| {
                self.migration
                    .capabilities()
                    .update(&changes)
                    .map(|()| json!({}))
                    .map_err(|e| RequestError(e.to_string()))
            }),
            Request::QueryMigrateCapabilities => Ok(self.migration.capabilities().to_json()),
        };
        let _ = reply.send(answer);
        ending
    }

    fn query_status(&self) -> Value {
        let status = if self.migration.in_switchover() {
            "finish-migrate"
        } else {
            self.status.name()
        };
        json!({
            "status": status,
            "running": self.status == RunStatus::Running && !self.migration.in_switchover(),
            "singlestep": false,
        })
    }

    fn query_cpus_fast(&self) -> Value {
        let cpus: Vec<Value> = self
            .thread_ids
            .iter()
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

    /// Presses the ACPI power button, as QEMU does: the guest decides whether and how to shut
    /// down. The press waits for the guest's event handler (a paused or not yet started guest
    /// takes it when it runs).
    fn system_powerdown(&mut self) -> Result<Value, RequestError> {
        self.busy_migrating()?;
        match self.status {
            RunStatus::Running | RunStatus::Paused | RunStatus::Prelaunch => {}
            RunStatus::InMigrate => {
                return Err(RequestError(
                    "this VM is waiting for an incoming migration; it has no guest to power down \
                     yet"
                    .into(),
                ))
            }
            other => {
                return Err(RequestError(format!(
                    "cannot power down a VM in state '{}'",
                    other.name()
                )))
            }
        }
        crate::machine::devices::lock(&self.vm_mut().machine.devices.power_button)
            .press()
            .map_err(|e| RequestError(format!("cannot press the power button: {e}")))?;
        tracing::info!("power button pressed");
        self.handle.emit(Event::new("POWERDOWN", None));
        Ok(json!({}))
    }

    async fn stop(&mut self) -> Result<Value, RequestError> {
        self.busy_migrating()?;
        match self.status {
            RunStatus::Running => {
                self.vm_mut()
                    .vcpus
                    .pause()
                    .await
                    .map_err(|e| RequestError(e.to_string()))?;
                self.status = RunStatus::Paused;
                self.handle.emit(Event::new("STOP", None));
            }
            // As QEMU: a VM that never ran stays in prelaunch, and nothing changed to announce.
            RunStatus::Prelaunch => {}
            RunStatus::InMigrate => self.migration.set_autostart(false),
            _ => {}
        }
        Ok(json!({}))
    }

    async fn cont(&mut self) -> Result<Value, RequestError> {
        self.busy_migrating()?;
        match self.status {
            RunStatus::Paused | RunStatus::Prelaunch => {
                // After a migration that ended in doubt the disks are drained and their images
                // unlocked: taking the locks back fails if the destination runs the guest.
                self.vm_mut()
                    .machine
                    .devices
                    .activate_disks()
                    .map_err(|e| RequestError(format!("cannot resume: {e}")))?;
                self.vm_mut()
                    .vcpus
                    .resume()
                    .await
                    .map_err(|e| RequestError(e.to_string()))?;
                self.status = RunStatus::Running;
                self.handle.emit(Event::new("RESUME", None));
                Ok(json!({}))
            }
            RunStatus::Running => Ok(json!({})),
            // As in QEMU: the guest will run as soon as it has arrived.
            RunStatus::InMigrate => {
                self.migration.set_autostart(true);
                Ok(json!({}))
            }
            RunStatus::PostMigrate => Err(RequestError(
                "the guest was migrated and runs on the destination; running it here too would \
                 run two copies"
                    .into(),
            )),
            other => Err(RequestError(format!(
                "cannot continue a VM in state '{}'",
                other.name()
            ))),
        }
    }
}

/// Writes guest-physical memory `[addr, addr + size)` to `path`; every byte must be RAM.
pub fn pmemsave(
    memory: &GuestMemory,
    addr: u64,
    size: u64,
    path: &Path,
) -> Result<Value, RequestError> {
    let end = addr
        .checked_add(size)
        .ok_or_else(|| RequestError(format!("pmemsave: {addr:#x} + {size:#x} overflows")))?;
    let mut at = addr;
    while at < end {
        let region = memory.find_region(GuestAddress(at)).ok_or_else(|| {
            RequestError(format!(
                "pmemsave: {at:#x} is not guest RAM (the range {addr:#x}..{end:#x} must lie within RAM)"
            ))
        })?;
        at = region.start_addr().0 + region.len();
    }
    let mut file = std::fs::File::create(path)
        .map_err(|e| RequestError(format!("pmemsave: cannot create '{}': {e}", path.display())))?;
    let mut at = addr;
    while at < end {
        let region = memory.find_region(GuestAddress(at)).expect("checked above");
        let chunk = (end.min(region.start_addr().0 + region.len()) - at) as usize;
        memory
            .write_all_volatile_to(GuestAddress(at), &mut file, chunk)
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
