//! KVM's dirty logging: on for an outgoing migration, off after it.
//!
//! A memory-slot change waits until every vCPU has left the guest. With paused vCPUs that is
//! immediate; with vCPUs sweeping memory it took from a few milliseconds up to 4.5 s on this
//! host. Turning logging on pauses the vCPUs for the change (the migration is starting; a few
//! milliseconds of pause is cheap there). Turning it off after a migration that leaves the guest
//! running (a cancel, a failure) happens on a thread of its own instead, so the guest that
//! `migrate_cancel` gives back never waits for it. The next change waits for that one first:
//! a migration must not start and then have logging turned off under it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use tokio::sync::oneshot;

use crate::machine::memory::GuestMemory;
use crate::machine::Machine;
use crate::runtime::Vm;

/// A switch-off still under way on its own thread.
#[derive(Debug, Default)]
pub struct PendingSwitch(Option<oneshot::Receiver<()>>);

impl PendingSwitch {
    /// Waits until the switch-off, if any, has been made.
    async fn settle(&mut self) {
        if let Some(done) = self.0.take() {
            // An error means the thread ended without a word (it panicked): either way no
            // change is under way any more.
            let _ = done.await;
        }
    }
}

/// Turns logging on, with the vCPUs out of the guest for the change; says how long pausing
/// them took (zero if they were paused already), a measure of what a switchover's pause costs.
pub async fn start(vm: &mut Vm) -> Result<Duration, String> {
    vm.dirty_log.settle().await;
    let started = Instant::now();
    let running = vm.vcpus.running();
    if running {
        vm.vcpus.pause().await.map_err(|e| e.to_string())?;
    }
    let pause = started.elapsed();
    let result = Machine::register_memory(&vm.machine.vm, &vm.machine.memory, true)
        .map(|_| pause)
        .map_err(|e| e.to_string());
    if running {
        vm.vcpus.resume().await.map_err(|e| e.to_string())?;
    }
    tracing::debug!(
        us = started.elapsed().as_micros() as u64,
        pause_us = pause.as_micros() as u64,
        "dirty logging on"
    );
    result
}

/// Turns logging off: right away if the vCPUs are paused, else on a thread of its own while the
/// guest runs on.
pub async fn stop(vm: &mut Vm) {
    vm.dirty_log.settle().await;
    if !vm.vcpus.running() {
        switch_off(&vm.machine.vm, &vm.machine.memory);
        return;
    }
    let (done, pending) = oneshot::channel();
    let vm_fd = Arc::clone(&vm.machine.vm);
    let memory = vm.machine.memory.clone();
    let spawned = std::thread::Builder::new()
        .name("dirty-log-off".into())
        .spawn(move || {
            switch_off(&vm_fd, &memory);
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => vm.dirty_log = PendingSwitch(Some(pending)),
        Err(error) => {
            tracing::warn!(%error, "no thread for turning dirty logging off; the guest waits for it");
            switch_off(&vm.machine.vm, &vm.machine.memory);
        }
    }
}

fn switch_off(vm: &VmFd, memory: &GuestMemory) {
    let started = Instant::now();
    match Machine::register_memory(vm, memory, false) {
        Ok(_) => tracing::debug!(
            us = started.elapsed().as_micros() as u64,
            "dirty logging off"
        ),
        // The guest runs on either way; KVM merely goes on recording its writes.
        Err(error) => tracing::warn!(%error, "cannot turn KVM's dirty logging off"),
    }
}
