//! The owner's side of migrations: starting them, handing the VM to their task, and taking it
//! back with the state the outcome leaves the VM in.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{Ending, RunStatus, Vmm, MIGRATION_STOP_DEADLINE};
use crate::migrate::progress::MigrationStatus;
use crate::migrate::transport::Listener;
use crate::migrate::uri::MigrationUri;
use crate::migrate::{destination, source, Shared};
use crate::runtime::control::{Event, RequestError};
use crate::runtime::Vm;

/// What a migration task hands back with the VM.
pub(super) enum MigrationResult {
    Outgoing(source::Outcome),
    Incoming(destination::Outcome),
}

/// A migration task that holds the VM.
pub(super) struct RunningMigration {
    pub(super) task: JoinHandle<(Vm, MigrationResult)>,
    pub(super) cancel: CancellationToken,
}

impl Vmm {
    /// A migration that has reported its end may still be tidying up (its task has not handed
    /// the VM back yet); a request that arrives then waits for that, rather than being told a
    /// migration is in progress after `query-migrate` said it was over. A destination reports
    /// `completed` before it tells the source, so once the source says `completed` this side's
    /// `query-status` already waits for the guest it runs. `Some` when the VM ends: its task
    /// died, its incoming migration failed, or its vCPUs could not be started or stopped as
    /// asked meanwhile.
    pub(super) async fn settle_ended_migration(&mut self) -> Option<Ending> {
        let ended = matches!(
            self.migration.progress().status,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        );
        if !ended {
            return None;
        }
        let running = self.running_migration.as_mut()?;
        match tokio::time::timeout(MIGRATION_STOP_DEADLINE, &mut running.task).await {
            Ok(finished) => {
                self.running_migration = None;
                self.migration_ended(finished).await
            }
            Err(_) => {
                tracing::warn!("the ended migration is still tidying up");
                None
            }
        }
    }

    pub(super) fn busy_migrating(&self) -> Result<(), RequestError> {
        if self.running_migration.is_some() && self.status != RunStatus::InMigrate {
            return Err(RequestError(
                "a migration is in progress; wait for it to end or stop it with migrate_cancel"
                    .into(),
            ));
        }
        Ok(())
    }

    pub(super) fn start_outgoing(&mut self, uri: &str) -> Result<Value, RequestError> {
        let uri = MigrationUri::parse(uri).map_err(|e| RequestError(e.to_string()))?;
        if self.running_migration.is_some() {
            return Err(RequestError(
                "a migration is already in progress (query-migrate shows it, migrate_cancel stops it)"
                    .into(),
            ));
        }
        match self.status {
            RunStatus::Running | RunStatus::Paused | RunStatus::Prelaunch => {}
            RunStatus::InMigrate => {
                return Err(RequestError(
                    "this VM is waiting for an incoming migration; it has no guest to send yet"
                        .into(),
                ))
            }
            RunStatus::PostMigrate => {
                return Err(RequestError(
                    "the guest was already migrated away from here".into(),
                ))
            }
            other => {
                return Err(RequestError(format!(
                    "cannot migrate a VM in state '{}'",
                    other.name()
                )))
            }
        }
        self.spawn_migration(
            CancellationToken::new(),
            |mut vm, shared, token| async move {
                let outcome = source::migrate(&mut vm, uri, &shared, token).await;
                (vm, MigrationResult::Outgoing(outcome))
            },
        );
        Ok(json!({}))
    }

    pub(super) async fn migrate_incoming(&mut self, uri: &str) -> Result<Value, RequestError> {
        if self.status != RunStatus::InMigrate || self.running_migration.is_some() {
            return Err(RequestError(
                "migrate-incoming needs a VM started with '-incoming defer' that is not receiving yet"
                    .into(),
            ));
        }
        let uri = MigrationUri::parse(uri).map_err(|e| RequestError(e.to_string()))?;
        let listener = Listener::bind(&uri)
            .await
            .map_err(|e| RequestError(format!("cannot listen on {uri}: {e}")))?;
        self.start_incoming(listener);
        Ok(json!({}))
    }

    pub(super) fn start_incoming(&mut self, listener: Listener) {
        let cancel = self.shutdown.child_token();
        self.spawn_migration(cancel, |mut vm, shared, token| async move {
            let outcome = destination::receive(&mut vm, listener, &shared, token).await;
            (vm, MigrationResult::Incoming(outcome))
        });
    }

    /// Hands the VM to a new migration task, with the progress record already in `setup` so
    /// that a `query-migrate` right after the command shows this migration.
    pub(super) fn spawn_migration<F, Fut>(&mut self, cancel: CancellationToken, migration: F)
    where
        F: FnOnce(Vm, Arc<Shared>, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = (Vm, MigrationResult)> + Send + 'static,
    {
        let vm = self
            .vm
            .take()
            .expect("no migration runs, so the owner holds the VM");
        self.migration
            .begin(self.memory.iter().map(|r| r.len()).sum());
        let task = tokio::spawn(migration(vm, self.migration.clone(), cancel.clone()));
        self.running_migration = Some(RunningMigration { task, cancel });
    }

    /// Takes the VM back from a finished migration task and settles the VM's state.
    pub(super) async fn migration_ended(
        &mut self,
        finished: Result<(Vm, MigrationResult), tokio::task::JoinError>,
    ) -> Option<Ending> {
        let (vm, result) = match finished {
            Ok(finished) => finished,
            Err(error) => {
                return Some(Ending::Failed(format!("the migration task died: {error}")));
            }
        };
        let running = vm.vcpus.running();
        self.vm = Some(vm);
        match result {
            MigrationResult::Outgoing(source::Outcome::Completed) => {
                self.status = RunStatus::PostMigrate;
                None
            }
            // Paused, not postmigrate: the operator may resume it once sure the destination
            // does not run the guest.
            MigrationResult::Outgoing(source::Outcome::InDoubt(_)) => {
                self.status = RunStatus::Paused;
                None
            }
            MigrationResult::Outgoing(_) => {
                // A guest that ran before may have failed to resume: say it is paused, so
                // that `cont` retries rather than `query-status` claiming it runs.
                if running {
                    self.status = RunStatus::Running;
                } else if self.status == RunStatus::Running {
                    self.status = RunStatus::Paused;
                }
                None
            }
            MigrationResult::Incoming(destination::Outcome::Completed { run }) => {
                // The vCPUs run already if the commit started them; a `cont` or `stop` that came
                // after the commit's look at autostart (and was answered) takes effect here.
                let autostart = self.migration.autostart();
                if run && !running && autostart {
                    if let Err(error) = self.vm_mut().vcpus.resume().await {
                        return Some(Ending::Failed(error.to_string()));
                    }
                }
                if running && !autostart {
                    if let Err(error) = self.vm_mut().vcpus.pause().await {
                        return Some(Ending::Failed(error.to_string()));
                    }
                }
                if self.vm_mut().vcpus.running() {
                    self.status = RunStatus::Running;
                    self.handle.emit(Event::new("RESUME", None));
                } else {
                    self.status = RunStatus::Paused;
                }
                None
            }
            MigrationResult::Incoming(destination::Outcome::Failed(reason)) => {
                // The migration gave the host's cores away already, the moment it failed.
                Some(Ending::Failed(format!(
                    "incoming migration failed: {reason}"
                )))
            }
        }
    }
}

/// Waits for the migration task, or forever when there is none.
pub(super) async fn wait_migration(
    running: &mut Option<RunningMigration>,
) -> Result<(Vm, MigrationResult), tokio::task::JoinError> {
    match running {
        Some(running) => (&mut running.task).await,
        None => std::future::pending().await,
    }
}
