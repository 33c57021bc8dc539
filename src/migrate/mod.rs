//! Live migration: a running VM moves from a source ferry to a destination ferry over TCP or a
//! UNIX socket, with dirty-page pre-copy, while the guest keeps running.
//!
//! ```text
//! source                                               destination (-incoming, vCPUs paused)
//!   | -- header "FERRYMIG" v8, CONFIG (VM description) -->|  checks it against its own
//!   | <------------------------ ACCEPT | ERROR(reason) ---|
//!   | -- LANES {count, session} ------------------------->|  with `multifd` (on by default):
//!   | == header, LANE {index, session} on each of count   |  connections of its own for the
//!   |    more connections ===============================>|  pages (lanes.rs)
//!   | <------------------------------------- ACCEPT -------|
//!   | -- CLOCK_PROBE ------------------------------------>|  x4: the destination's clock
//!   | <------------------------------- CLOCK (its time) ---|  against the source's (clock.rs)
//!   | -- ZEROS (pages never touched), SYNC -------------->|  round 0; backs the rest of RAM
//!   | <-------------------------------------- SYNCED -----|
//!   | == PAGES (all other RAM, zero pages as markers) ===>|  on the lanes (or this link)
//!   | -- SYNC (after a mark on every lane) -------------->|  waits for every lane's mark
//!   | <-------------------------------------- SYNCED -----|
//!   | -- ROUND, PAGES (dirty since last sync), SYNC ...-->|  rounds 1..n, guest running
//!   |    (pause vCPUs: downtime starts)                    |
//!   | == PAGES (last dirty pages), marks ================>|
//!   | -- STATE (sections) ------------------------------->|  every lane's mark; decodes and
//!   | <------------------------------ READY | ERROR -------|  checks the state, restores it while
//!   |    (the source gives the guest up)                   |  the source commits
//!   | -- COMMIT {run} ----------------------------------->|  restored: runs the guest
//!   | <---------- COMMITTED {vcpus_running_at_ns} -------|  (or ERROR: the restore failed
//!   |                                                      |   or took over 3 s)
//!   |    (completed. Downtime: the longest any vCPU was out of the guest, from when it
//!   |     stopped here to when it ran again on the destination, mapped onto the source's clock)
//! ```
//!
//! Until the source has READY in hand, any failure or `migrate_cancel` resumes the source and
//! the destination never runs the guest. The destination runs it only on COMMIT, and only once
//! its restore succeeded; otherwise it answers ERROR and the source runs the guest again, so
//! there are never two running copies.

pub mod arrival;
pub mod capabilities;
pub mod clock;
pub mod destination;
pub mod dirty;
pub mod landing;
pub mod lanes;
pub mod link;
pub mod logging;
pub mod pacing;
pub mod pages;
pub mod params;
pub mod phases;
pub mod prefault;
pub mod progress;
pub mod ranges;
pub mod source;
pub mod splice;
pub mod sprint;
pub mod state;
pub mod transit;
pub mod transport;
pub mod uri;
pub mod vmstate;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::json;

use self::capabilities::Capabilities;
use self::params::MigrationParameters;
use self::progress::{MigrationStatus, Progress};
use crate::runtime::control::{Event, VmHandle};

/// What the migration task and the VM owner share: the progress `query-migrate` reads, the
/// parameters and capabilities the operator sets, and the event channel.
pub struct Shared {
    progress: Mutex<Progress>,
    params: Mutex<MigrationParameters>,
    capabilities: Mutex<Capabilities>,
    /// Set while the source's vCPUs are paused for the switchover (`finish-migrate`).
    pub switchover: AtomicBool,
    /// Whether an incoming guest runs once it has arrived (no -S, or `cont` since).
    autostart: AtomicBool,
    events: VmHandle,
}

impl Shared {
    pub fn new(events: VmHandle, autostart: bool) -> Self {
        Self {
            progress: Mutex::new(Progress::new()),
            params: Mutex::new(MigrationParameters::default()),
            capabilities: Mutex::new(Capabilities::default()),
            switchover: AtomicBool::new(false),
            autostart: AtomicBool::new(autostart),
            events,
        }
    }

    pub fn autostart(&self) -> bool {
        self.autostart.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_autostart(&self, autostart: bool) {
        self.autostart
            .store(autostart, std::sync::atomic::Ordering::Release);
    }

    pub fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn params(&self) -> MutexGuard<'_, MigrationParameters> {
        self.params.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn capabilities(&self) -> MutexGuard<'_, Capabilities> {
        self.capabilities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn in_switchover(&self) -> bool {
        self.switchover.load(Ordering::Acquire)
    }

    /// Starts a new record for a migration of `ram_total` bytes (status `setup`).
    pub fn begin(&self, ram_total: u64) {
        *self.progress() = Progress::start(ram_total);
        self.emit_status(MigrationStatus::Setup);
    }

    pub fn set_status(&self, status: MigrationStatus) {
        self.progress().status = status;
        self.emit_status(status);
    }

    /// Ends the migration in `status`; `error` becomes `error-desc`.
    pub fn finish(&self, status: MigrationStatus, error: Option<String>) {
        {
            let mut progress = self.progress();
            progress.finish(status, error);
            if status == MigrationStatus::Completed {
                progress.remaining_pages = 0;
            }
        }
        self.switchover.store(false, Ordering::Release);
        self.emit_status(status);
    }

    fn emit_status(&self, status: MigrationStatus) {
        self.events.emit(Event::new(
            "MIGRATION",
            Some(json!({"status": status.name()})),
        ));
    }

    pub fn emit_pass(&self, pass: u64) {
        self.events
            .emit(Event::new("MIGRATION_PASS", Some(json!({"pass": pass}))));
    }

    pub fn emit(&self, event: Event) {
        self.events.emit(event);
    }
}
