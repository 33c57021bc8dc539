//! What a virtio-pci function's migration carries, and putting it back.

use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;
use crate::machine::devices::lock;
use crate::machine::pci::config::ConfigSpaceError;
use crate::machine::pci::msix::MsixError;

/// Why a migrated transport does not fit the function it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "{source_queues} queues on the source, {here} here; give both ends the same num-queues"
    )]
    QueueCount { source_queues: usize, here: usize },
    #[error(
        "the guest's driver uses features {unknown:#x} that this side's device does not offer \
         (offered here: {offered:#x}); the image's file system or direct= differs"
    )]
    Features { unknown: u64, offered: u64 },
    #[error(transparent)]
    ConfigSpace(#[from] ConfigSpaceError),
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error("queue {index}: invalid {what} {value:#x}")]
    Queue {
        index: usize,
        what: &'static str,
        value: u64,
    },
}

/// One queue as the driver configured it and as far as the device got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub vector: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// Everything of the transport that migrates (the backend's own state travels beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub config_space: Vec<u8>,
    pub msix: MsixState,
    pub common: CommonState,
    pub queues: Vec<QueueState>,
}

impl QueueState {
    /// `queue`'s setup and position, with its MSI-X vector.
    pub(super) fn of(queue: &Queue, vector: u16) -> Self {
        Self {
            size: queue.size(),
            ready: queue.ready(),
            vector,
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            event_idx: queue.event_idx_enabled(),
        }
    }

    /// Sets a freshly reset `queue` up as described (all but the vector); on a value the queue
    /// refuses, says which and what it was.
    pub(super) fn apply(&self, queue: &mut Queue) -> Result<(), (&'static str, u64)> {
        queue
            .try_set_size(self.size)
            .map_err(|_| ("size", self.size.into()))?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| ("descriptor table address", self.desc_table))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|_| ("available ring address", self.avail_ring))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| ("used ring address", self.used_ring))?;
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.set_event_idx(self.event_idx);
        queue.set_ready(self.ready);
        Ok(())
    }
}

impl<B: VirtioBackend> VirtioPci<B> {
    /// The transport's state, with each queue's position taken from the engine (which waits
    /// for a batch under way: callers quiesce first).
    pub fn save(&self) -> VirtioPciState {
        let engine = lock(&self.engine);
        VirtioPciState {
            config_space: self.config.snapshot(),
            msix: self.msix.save(),
            common: self.common.clone(),
            queues: self
                .queues
                .iter()
                .zip(&self.vectors)
                .enumerate()
                .map(|(index, (queue, &vector))| {
                    let (next_avail, next_used) = engine.position(index);
                    QueueState {
                        next_avail,
                        next_used,
                        ..QueueState::of(queue, vector)
                    }
                })
                .collect(),
        }
    }

    /// Whether `state` fits this transport as built (its config space, MSI-X table, queues and
    /// the features it offers), touching nothing: a migration checks that before it tells the
    /// source it has the state.
    pub fn check(&self, state: &VirtioPciState) -> Result<(), RestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                source_queues: state.queues.len(),
                here: self.queues.len(),
            });
        }
        let offered = self.registers.device_features();
        let unknown = state.common.driver_features & !offered;
        if unknown != 0 {
            return Err(RestoreError::Features { unknown, offered });
        }
        self.config.check(&state.config_space)?;
        self.msix.check(&state.msix)?;
        let vector_count = self.msix.vector_count();
        for (index, (queue, saved)) in self.queues.iter().zip(&state.queues).enumerate() {
            if saved.vector != NO_VECTOR && saved.vector >= vector_count {
                return Err(RestoreError::Queue {
                    index,
                    what: "MSI-X vector",
                    value: saved.vector.into(),
                });
            }
            // The layout as the queue would take it, tried on a fresh one of the same size.
            let mut fresh =
                Queue::new(queue.max_size()).expect("this side built a queue this size");
            saved
                .apply(&mut fresh)
                .map_err(|(what, value)| RestoreError::Queue { index, what, value })?;
        }
        Ok(())
    }

    /// Puts a saved transport into this freshly built one (quiesced: the caller lets it run).
    pub fn restore(&mut self, state: VirtioPciState) -> Result<(), RestoreError> {
        self.check(&state)?;
        self.config.restore(&state.config_space)?;
        self.msix.restore(state.msix, &self.config)?;
        self.common = state.common;
        for (index, ((queue, vector), saved)) in self
            .queues
            .iter_mut()
            .zip(&mut self.vectors)
            .zip(&state.queues)
            .enumerate()
        {
            queue.reset();
            saved
                .apply(queue)
                .map_err(|(what, value)| RestoreError::Queue { index, what, value })?;
            *vector = saved.vector;
        }
        let active = self.active();
        lock(&self.engine).restore(&state.queues, self.common.driver_features, active)?;
        if active {
            self.register_ioevents();
        }
        Ok(())
    }
}
