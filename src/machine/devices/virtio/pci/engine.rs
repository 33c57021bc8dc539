//! The half of a virtio function that touches storage: the live queues and the backend, under
//! their own lock, which the I/O thread holds for a batch of requests and a vCPU only for the
//! few register writes that change what the engine does.

use super::*;
use crate::machine::devices::lock;

/// What a batch of requests asks of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Idle,
    /// The driver must be interrupted on the queue's vector.
    Interrupt,
    /// The ring cannot be parsed; the device needs a reset.
    Broken,
}

/// The queues as far as the device got in them, and the device model.
pub struct Engine<B: VirtioBackend> {
    id: String,
    queues: Vec<Queue>,
    backend: B,
    memory: GuestMemory,
    /// The driver has the device running: set at DRIVER_OK, cleared by a reset, a broken ring
    /// or the driver giving up.
    running: bool,
    /// While set (a migration's drain, or an incoming VM not yet committed) no request is taken.
    quiesced: bool,
}

impl<B: VirtioBackend> Engine<B> {
    pub(super) fn new(id: &str, queues: Vec<Queue>, backend: B, memory: GuestMemory) -> Self {
        Self {
            id: id.to_owned(),
            queues,
            backend,
            memory,
            running: false,
            quiesced: false,
        }
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Handles every request queue `index` holds, unless the device is stopped.
    fn process(&mut self, index: usize) -> Outcome {
        if self.quiesced || !self.running {
            return Outcome::Idle;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return Outcome::Idle;
        };
        if !queue.ready() || !queue.is_valid(&self.memory) {
            return Outcome::Idle;
        }
        match self.backend.process_queue(&self.memory, queue) {
            Ok(true) => Outcome::Interrupt,
            Ok(false) => Outcome::Idle,
            Err(error) => {
                tracing::error!(device = %self.id, queue = index, %error, "virtqueue broken");
                self.running = false;
                Outcome::Broken
            }
        }
    }

    /// DRIVER_OK: the engine takes the queues as the driver set them up, from the rings' start.
    pub(super) fn start(&mut self, queues: &[Queue], features: u64) {
        for (live, setup) in self.queues.iter_mut().zip(queues) {
            let state = QueueState {
                next_avail: 0,
                next_used: 0,
                ..QueueState::of(setup, NO_VECTOR)
            };
            live.reset();
            // The values passed the same checks when the driver wrote them.
            if let Err((what, value)) = state.apply(live) {
                tracing::error!(device = %self.id, what, value, "queue setup lost at DRIVER_OK");
            }
        }
        self.backend.set_acked_features(features);
        self.running = true;
    }

    /// Puts a migrated queue state in place, where the source's device left off.
    pub(super) fn restore(
        &mut self,
        queues: &[QueueState],
        features: u64,
        running: bool,
    ) -> Result<(), RestoreError> {
        for (index, (live, state)) in self.queues.iter_mut().zip(queues).enumerate() {
            live.reset();
            state
                .apply(live)
                .map_err(|(what, value)| RestoreError::Queue { index, what, value })?;
        }
        self.backend.set_acked_features(features);
        self.running = running;
        Ok(())
    }

    pub(super) fn change_queue(&mut self, index: usize, change: impl Fn(&mut Queue)) {
        if let Some(queue) = self.queues.get_mut(index) {
            change(queue);
        }
    }

    pub(super) fn set_running(&mut self, running: bool) {
        self.running = running;
    }

    /// Where the device is in queue `index`'s rings.
    pub(super) fn position(&self, index: usize) -> (u16, u16) {
        self.queues
            .get(index)
            .map_or((0, 0), |q| (q.next_avail(), q.next_used()))
    }

    /// The engine's part of a device reset: what was written becomes durable, and the queues
    /// and features are forgotten.
    fn reset(&mut self) {
        if let Err(error) = self.backend.flush() {
            tracing::warn!(device = %self.id, %error, "flush at device reset failed");
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.backend.set_acked_features(0);
        self.running = false;
    }
}

/// A virtio-pci function as its I/O thread and a migration see it: both halves, and the lock
/// that keeps the I/O side's two-step operations (engine, then transport) from interleaving.
pub struct VirtioDevice<B: VirtioBackend> {
    transport: Arc<Mutex<VirtioPci<B>>>,
    engine: Arc<Mutex<Engine<B>>>,
    /// Held over a batch and its delivery, and over a reset, so that an interrupt or a
    /// NEEDS_RESET from before a reset never lands after it. Taken before either half's lock.
    sequence: Arc<Mutex<()>>,
}

impl<B: VirtioBackend> Clone for VirtioDevice<B> {
    fn clone(&self) -> Self {
        Self {
            transport: self.transport.clone(),
            engine: self.engine.clone(),
            sequence: self.sequence.clone(),
        }
    }
}

impl<B: VirtioBackend> VirtioDevice<B> {
    pub fn new(transport: VirtioPci<B>) -> Self {
        let engine = transport.engine.clone();
        Self {
            transport: Arc::new(Mutex::new(transport)),
            engine,
            sequence: Arc::default(),
        }
    }

    /// The transport, for the PCI bus and the migration's state.
    pub fn transport(&self) -> &Arc<Mutex<VirtioPci<B>>> {
        &self.transport
    }

    pub fn engine(&self) -> &Mutex<Engine<B>> {
        &self.engine
    }

    /// Handles queue `index` and tells the driver; the I/O thread calls this. The engine is let
    /// go before the transport is taken, as vCPUs take them the other way round.
    pub fn process(&self, index: usize) {
        let _sequence = lock(&self.sequence);
        let outcome = lock(&self.engine).process(index);
        if outcome != Outcome::Idle {
            lock(&self.transport).deliver(index, outcome);
        }
    }

    /// Carries out a reset the driver asked for, if one is pending: the engine first (it
    /// flushes, with no transport lock held), then the registers, and status reads 0.
    pub fn complete_reset(&self) {
        let _sequence = lock(&self.sequence);
        if !lock(&self.transport).reset_pending {
            return;
        }
        lock(&self.engine).reset();
        lock(&self.transport).finish_reset();
    }

    /// Stops taking requests. The I/O thread handles requests under the engine's lock, so once
    /// this returns none is in flight; their results are in guest memory (marked dirty). A
    /// reset the driver asked for before the vCPUs paused is finished, since the migration's
    /// state has no room for one under way.
    pub fn quiesce(&self) {
        lock(&self.engine).quiesced = true;
        self.complete_reset();
    }

    /// Takes requests again; the caller then has the I/O thread look at every queue, since
    /// notifications that came meanwhile were not acted on.
    pub fn unquiesce(&self) {
        lock(&self.engine).quiesced = false;
    }

    /// Whether nothing can change in the device's state until it is unquiesced.
    pub fn is_drained(&self) -> bool {
        // One lock at a time: vCPUs take the transport's before the engine's.
        let quiesced = lock(&self.engine).quiesced;
        quiesced && !lock(&self.transport).reset_pending
    }

    /// Makes every completed write durable, waiting for a batch under way.
    pub fn flush(&self) -> Result<(), B::Error> {
        lock(&self.engine).backend.flush()
    }
}
