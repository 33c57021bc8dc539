//! vCPU threads: one named `std::thread` per vCPU running a blocking `KVM_RUN` loop, steered by
//! events from the VM owner.
//!
//! The owner sends an event, then kicks the thread with a signal whose handler sets
//! `immediate_exit` in the vCPU's `kvm_run`: whether the thread is inside `KVM_RUN` (which then
//! returns `EINTR`) or handling an exit (the next `KVM_RUN` returns at once), it looks at its
//! events before the guest runs again. Pausing completes any port I/O or MMIO the guest is in the
//! middle of, so a paused vCPU's state is exact and can be saved.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use tokio::sync::oneshot;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::run_delay::RunDelay;
use super::start_gate::{StartGate, START_GATE_TIMEOUT};
use super::throttle::Throttle;
use super::{GuestEvent, GuestEvents};
use crate::machine::devices::Devices;
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::Arc;

/// How long the vCPUs sent an event may take to acknowledge it, all of them together, before
/// the owner calls the first one still silent stuck.
pub const ACK_DEADLINE: Duration = Duration::from_secs(2);

/// Work run on a vCPU thread while the vCPU is paused (e.g. saving or restoring its state).
pub type VcpuTask = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// What the owner asks of a vCPU thread. Each carries the channel its acknowledgement goes on;
/// a pause is acknowledged with what tells when the vCPU left the guest, a start at a gate with
/// when it went back in (the edges of the guest's blackout, for the downtime a migration
/// reports).
pub enum VcpuEvent {
    Pause {
        ack: oneshot::Sender<PauseAck>,
        /// The owner saw the thread running or waiting for a core: it may have left the guest
        /// before the pause, and its run-queue delay tells how long before.
        measure: bool,
    },
    Resume(oneshot::Sender<()>),
    /// Goes into the guest once `gate` opens, or stays paused if it shuts; acknowledged with
    /// when the vCPU went in, if it did. The thread waits at the gate, so the owner must open
    /// or shut it before it asks anything else of the vCPU.
    StartAt {
        gate: Arc<StartGate>,
        ack: oneshot::Sender<Option<Instant>>,
    },
    /// Runs the task on the paused vCPU; refused (dropped) while the vCPU runs.
    Run(VcpuTask),
    Finish,
}

/// A vCPU's answer to a pause.
#[derive(Debug, Clone, Copy)]
pub struct PauseAck {
    /// When the thread heard the pause.
    pub at: Instant,
    /// Its run-queue delay then ([`RunDelay`]), if it was asked to measure and ran the guest.
    pub run_delay: Option<Duration>,
    /// When the guest stopped, if it was already out before the pause's kick: an exit the
    /// thread was serving (port I/O, MMIO), or the one a throttle's hold-back followed (if the
    /// throttle took the pause's own kick for its own, when the thread got its core back).
    pub out_since: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {index} did not answer within {} ms", ACK_DEADLINE.as_millis())]
    Timeout { index: u32 },
    #[error("vCPU {index} has stopped")]
    Gone { index: u32 },
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU's `kvm_run` mapping, set before the thread's
        // first `KVM_RUN` and cleared before the vCPU is dropped; a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// Kicks vCPU threads out of `KVM_RUN` without an event (the throttle's periodic kick).
#[derive(Debug, Clone)]
pub struct Kicker {
    pub(super) threads: Vec<libc::pthread_t>,
}

impl Kicker {
    pub fn kick_all(&self) {
        for thread in &self.threads {
            // SAFETY: the threads are vCPU threads that outlive every kicker (the kicker lives
            // in a migration task that ends before the vCPUs are finished); a failed kill of an
            // exiting thread is harmless.
            unsafe { libc::pthread_kill(*thread, kick_signal()) };
        }
    }
}

/// The owner's end of one vCPU thread.
pub struct VcpuHandle {
    pub index: u32,
    events: Sender<VcpuEvent>,
    thread: Option<JoinHandle<()>>,
    pub thread_id: i32,
}

impl VcpuHandle {
    /// Starts the thread `vcpu N`; the vCPU starts paused and runs on the first resume.
    pub fn spawn(
        index: u32,
        vcpu: VcpuFd,
        devices: Arc<Devices>,
        guest_events: GuestEvents,
        throttle: Throttle,
    ) -> Result<Self, VcpuError> {
        let (events, receiver) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu {index}"))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                VcpuThread {
                    index,
                    vcpu,
                    devices,
                    guest_events,
                    events: receiver,
                    throttle,
                    resumed_at: None,
                    out_since: None,
                    io_pending: false,
                    run_delay: RunDelay::own(),
                }
                .run()
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        let thread_id = tid_rx.recv_timeout(ACK_DEADLINE).unwrap_or(0);
        Ok(Self {
            index,
            events,
            thread: Some(thread),
            thread_id,
        })
    }

    /// Sends an event and kicks the thread out of `KVM_RUN` so that it sees it.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.queue(event)?;
        self.kick();
        Ok(())
    }

    /// Kicks the thread out of `KVM_RUN`, to look at the events queued so far.
    pub fn kick(&self) {
        if let Some(thread) = &self.thread {
            // A failed kick means the thread is exiting; the channel then reports it.
            let _ = thread.kill(kick_signal());
        }
    }

    /// Sends an event without a kick: the thread sees it after those already sent.
    pub fn queue(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone { index: self.index })
    }

    /// The thread, for a [`Kicker`].
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.thread
            .as_ref()
            .map(|t| t.as_pthread_t() as libc::pthread_t)
    }

    /// Asks the thread to end and waits for it, at most [`ACK_DEADLINE`].
    pub fn finish(&mut self) {
        let _ = self.send(VcpuEvent::Finish);
        if let Some(thread) = self.thread.take() {
            let deadline = std::time::Instant::now() + ACK_DEADLINE;
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                let _ = thread.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::error!(vcpu = self.index, "vCPU thread did not finish; leaving it");
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.finish();
    }
}

enum RunState {
    Running,
    Paused,
    Finished,
}

struct VcpuThread {
    index: u32,
    vcpu: VcpuFd,
    devices: Arc<Devices>,
    guest_events: GuestEvents,
    events: Receiver<VcpuEvent>,
    throttle: Throttle,
    /// Set by a resume until the guest's first exit, for a debug line.
    resumed_at: Option<Instant>,
    /// When the guest last stopped: when `KVM_RUN` last returned, unless a kick ended a run of
    /// the guest (it ran until the kick). `None` from a resume until the next exit.
    out_since: Option<Instant>,
    /// The last exit was port I/O or MMIO, which the guest sees done only after another
    /// `KVM_RUN`.
    io_pending: bool,
    run_delay: Option<RunDelay>,
}

impl VcpuThread {
    fn run(mut self) {
        KVM_RUN.with(|run| run.set(self.vcpu.get_kvm_run() as *mut kvm_run));
        self.prime();
        let mut state = RunState::Paused;
        loop {
            state = match state {
                RunState::Paused => match self.events.recv() {
                    Ok(event) => match self.handle_event(event, RunState::Paused) {
                        // Kicks that came while paused (each event sent to a vCPU kicks it)
                        // left `immediate_exit` set: the first `KVM_RUN` would return at once,
                        // and the guest would wait a round trip longer. Events sent since are
                        // still seen: they are looked for after the flag is cleared.
                        RunState::Running => {
                            self.clear_kick();
                            self.poll_events()
                        }
                        other => other,
                    },
                    Err(_) => RunState::Finished,
                },
                RunState::Running => {
                    let next = self.run_guest();
                    match next {
                        RunState::Running => self.poll_events(),
                        other => other,
                    }
                }
                RunState::Finished => break,
            };
        }
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
        // Where the guest was when it stopped: the first question when a guest seems stuck.
        match (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            (Ok(regs), Ok(sregs)) => tracing::debug!(
                vcpu = self.index,
                rip = format_args!("{:#x}", regs.rip),
                rsp = format_args!("{:#x}", regs.rsp),
                cr0 = format_args!("{:#x}", sregs.cr0),
                cs = format_args!("{:#x}", sregs.cs.selector),
                "vCPU thread finished"
            ),
            _ => tracing::debug!(vcpu = self.index, "vCPU thread finished"),
        }
    }

    /// Handles whatever events arrived while the guest ran.
    fn poll_events(&mut self) -> RunState {
        let mut state = RunState::Running;
        loop {
            match self.events.try_recv() {
                Ok(event) => state = self.handle_event(event, state),
                Err(TryRecvError::Empty) => return state,
                Err(TryRecvError::Disconnected) => return RunState::Finished,
            }
            if !matches!(state, RunState::Running) {
                return state;
            }
        }
    }

    fn handle_event(&mut self, event: VcpuEvent, state: RunState) -> RunState {
        match event {
            VcpuEvent::Pause { ack, measure } => {
                let at = Instant::now();
                let mut run_delay = None;
                if matches!(state, RunState::Running) {
                    // A vCPU out already (serving an exit) left the guest then, whatever it
                    // waited for a core since: its delay would go unread.
                    if measure && self.out_since.is_none() {
                        run_delay = self.run_delay.as_ref().and_then(RunDelay::read);
                    }
                    if self.io_pending {
                        self.complete_pending_io();
                    }
                    tracing::debug!(vcpu = self.index, "vCPU out of the guest");
                }
                let out_since = self
                    .out_since
                    .filter(|_| matches!(state, RunState::Running));
                let _ = ack.send(PauseAck {
                    at,
                    run_delay,
                    out_since,
                });
                RunState::Paused
            }
            VcpuEvent::Resume(ack) => {
                self.enter(matches!(state, RunState::Paused));
                let _ = ack.send(());
                RunState::Running
            }
            VcpuEvent::StartAt { gate, ack } => {
                if gate.wait(Instant::now() + START_GATE_TIMEOUT) {
                    let _ = ack.send(Some(self.enter(matches!(state, RunState::Paused))));
                    RunState::Running
                } else {
                    let _ = ack.send(None);
                    state
                }
            }
            VcpuEvent::Run(task) => {
                if matches!(state, RunState::Paused) {
                    task(&mut self.vcpu);
                } else {
                    tracing::error!(vcpu = self.index, "state access refused while running");
                }
                state
            }
            VcpuEvent::Finish => RunState::Finished,
        }
    }

    /// Readies a paused vCPU to go back into the guest; returns when it goes.
    fn enter(&mut self, paused: bool) -> Instant {
        if paused {
            self.tell_guest_it_was_stopped();
            // What the last exit said is of the previous run: a pause handled before the next
            // `KVM_RUN` must not date the guest's stop from it.
            self.out_since = None;
            let now = Instant::now();
            self.resumed_at = Some(now);
            now
        } else {
            Instant::now()
        }
    }

    /// Makes this thread's first `KVM_RUN` now, without entering the guest: KVM does one-time
    /// work on a VM's first run (in recent kernels it creates the VM's NX huge page recovery
    /// task then, a fork of this process), and on a migration's destination the first entry
    /// into the guest is downtime. Only for a fresh vCPU: an exit in flight would be lost.
    fn prime(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        match self.vcpu.run() {
            Err(error) if error.errno() == libc::EINTR => {}
            Err(error) => tracing::debug!(vcpu = self.index, %error, "priming KVM_RUN failed"),
            Ok(exit) => {
                let exit = exit_name(&exit);
                tracing::debug!(vcpu = self.index, exit, "priming KVM_RUN exited");
            }
        }
        self.clear_kick();
    }

    /// Clears `immediate_exit`, which a kick sets. The store must not sink past what follows
    /// (a look at the event channel): a kick whose event that look missed would be wiped out.
    fn clear_kick(&mut self) {
        self.vcpu.set_kvm_immediate_exit(0);
        compiler_fence(Ordering::SeqCst);
    }

    /// Sets `PVCLOCK_GUEST_STOPPED` in the guest's kvmclock page as the vCPU goes back in, as
    /// QEMU does on every resume: Linux's lockup watchdogs then do not take a pause or a
    /// migration's switchover for a hung CPU.
    fn tell_guest_it_was_stopped(&self) {
        match self.vcpu.kvmclock_ctrl() {
            Ok(()) => {}
            // The guest has not enabled kvmclock on this vCPU.
            Err(error) if error.errno() == libc::EINVAL => {}
            Err(error) => {
                tracing::debug!(vcpu = self.index, %error, "cannot mark the guest's clock stopped")
            }
        }
    }

    /// Lets KVM finish an instruction whose port I/O or MMIO userspace just served, without
    /// running the guest further: `KVM_RUN` with `immediate_exit` set does exactly that.
    fn complete_pending_io(&mut self) {
        /// An access split in fragments (MMIO over 8 bytes or across pages) exits once per
        /// fragment; more than this means something is wrong.
        const MAX_FRAGMENTS: u32 = 16;
        self.vcpu.set_kvm_immediate_exit(1);
        for _ in 0..MAX_FRAGMENTS {
            let devices = &self.devices;
            match self.vcpu.run() {
                Err(error) if error.errno() == libc::EINTR => break,
                Ok(VcpuExit::IoIn(port, data)) => devices.pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => devices.pio_write(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => devices.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => devices.mmio_write(addr, data),
                Ok(exit) => {
                    let exit = exit_name(&exit);
                    tracing::warn!(
                        vcpu = self.index,
                        exit,
                        "unexpected exit while completing I/O"
                    );
                    break;
                }
                Err(error) => {
                    tracing::warn!(vcpu = self.index, %error, "completing I/O failed");
                    break;
                }
            }
        }
        self.vcpu.set_kvm_immediate_exit(0);
        self.io_pending = false;
    }

    fn run_guest(&mut self) -> RunState {
        let devices = &self.devices;
        // Set before the call, the flag makes `KVM_RUN` return without entering the guest: its
        // EINTR then says nothing of when the guest stopped. (A kick landing between this read
        // and the call is taken for one that stopped a running guest: a few µs off.)
        let enters_guest = self.vcpu.get_kvm_run().immediate_exit == 0;
        let exit = self.vcpu.run();
        let exited = Instant::now();
        let kicked = matches!(&exit, Err(error) if error.errno() == libc::EINTR);
        if !kicked {
            self.out_since = Some(exited);
        }
        if let Some(resumed_at) = self.resumed_at.take() {
            // How long the guest ran before its first exit, and when that was: a switchover's
            // blackout ends somewhere before this line.
            tracing::debug!(
                vcpu = self.index,
                us = resumed_at.elapsed().as_micros() as u64,
                "first exit after the resume"
            );
        }
        // Only port I/O and MMIO need the next KVM_RUN to complete (the pause makes one).
        self.io_pending = matches!(
            exit,
            Ok(VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        );
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => devices.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => devices.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => devices.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => devices.mmio_write(addr, data),
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                tracing::info!(vcpu = self.index, "guest triple fault");
                self.guest_events.send(GuestEvent::TripleFault);
                return RunState::Paused;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let event = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestEvent::Reset,
                    _ => GuestEvent::Poweroff,
                };
                self.guest_events.send(event);
                return RunState::Paused;
            }
            Ok(exit) => {
                let reason = format!(
                    "vCPU {} stopped on an unexpected exit: {:?}",
                    self.index,
                    exit_name(&exit)
                );
                return self.fail(reason);
            }
            Err(_) if kicked => {
                self.clear_kick();
                let hold_back = self.throttle.hold_back();
                if enters_guest {
                    // The guest ran until the kick; held back, it stops from here.
                    self.out_since = hold_back.map(|_| exited);
                }
                if let Some(hold_back) = hold_back {
                    return self.hold_back(hold_back);
                }
            }
            Err(error) if error.errno() == libc::EAGAIN => {}
            Err(error) => {
                let reason = format!("KVM_RUN failed on vCPU {}: {error}", self.index);
                return self.fail(reason);
            }
        }
        RunState::Running
    }

    /// Stays out of the guest for `duration` (auto-converge), unless the owner asks for
    /// something meanwhile.
    fn hold_back(&mut self, duration: Duration) -> RunState {
        match self.events.recv_timeout(duration) {
            Ok(event) => self.handle_event(event, RunState::Running),
            Err(mpsc::RecvTimeoutError::Timeout) => RunState::Running,
            Err(mpsc::RecvTimeoutError::Disconnected) => RunState::Finished,
        }
    }

    fn fail(&mut self, reason: String) -> RunState {
        if let Ok(regs) = self.vcpu.get_regs() {
            tracing::error!(
                vcpu = self.index,
                rip = format_args!("{:#x}", regs.rip),
                "{reason}"
            );
        }
        self.guest_events.send(GuestEvent::Crashed(reason));
        RunState::Paused
    }
}

/// A printable summary of an exit (the exit borrows the vCPU, so it can't be kept).
fn exit_name(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::InternalError => "internal error (an instruction KVM cannot emulate)".into(),
        VcpuExit::FailEntry(reason, cpu) => format!("failed entry (reason {reason:#x}, cpu {cpu})"),
        other => format!("{other:?}"),
    }
}
