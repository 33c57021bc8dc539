//! What a virtio-pci function's migration carries, and putting it back.

use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;
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

impl<B: VirtioBackend> VirtioPci<B> {
    pub fn save(&self) -> VirtioPciState {
        VirtioPciState {
            config_space: self.config.snapshot(),
            msix: self.msix.save(),
            common: self.common.clone(),
            queues: self
                .queues
                .iter()
                .zip(&self.vectors)
                .map(|(q, &vector)| QueueState {
                    size: q.size(),
                    ready: q.ready(),
                    vector,
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
        }
    }

    /// Puts a saved transport into this freshly built one (quiesced: the caller lets it run).
    pub fn restore(&mut self, state: VirtioPciState) -> Result<(), RestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                source_queues: state.queues.len(),
                here: self.queues.len(),
            });
        }
        let offered = self.backend.device_features();
        let unknown = state.common.driver_features & !offered;
        if unknown != 0 {
            return Err(RestoreError::Features { unknown, offered });
        }
        self.config.restore(&state.config_space)?;
        self.msix.restore(state.msix, &self.config)?;
        self.common = state.common;
        let vector_count = self.msix.vector_count();
        for (index, ((queue, vector), saved)) in self
            .queues
            .iter_mut()
            .zip(&mut self.vectors)
            .zip(state.queues)
            .enumerate()
        {
            let invalid =
                |what: &'static str, value: u64| RestoreError::Queue { index, what, value };
            queue
                .try_set_size(saved.size)
                .map_err(|_| invalid("size", saved.size.into()))?;
            queue
                .try_set_desc_table_address(GuestAddress(saved.desc_table))
                .map_err(|_| invalid("descriptor table address", saved.desc_table))?;
            queue
                .try_set_avail_ring_address(GuestAddress(saved.avail_ring))
                .map_err(|_| invalid("available ring address", saved.avail_ring))?;
            queue
                .try_set_used_ring_address(GuestAddress(saved.used_ring))
                .map_err(|_| invalid("used ring address", saved.used_ring))?;
            if saved.vector != NO_VECTOR && saved.vector >= vector_count {
                return Err(invalid("MSI-X vector", saved.vector.into()));
            }
            queue.set_next_avail(saved.next_avail);
            queue.set_next_used(saved.next_used);
            queue.set_event_idx(saved.event_idx);
            queue.set_ready(saved.ready);
            *vector = saved.vector;
        }
        self.backend.set_acked_features(self.common.driver_features);
        if self.active() {
            self.register_ioevents();
        }
        Ok(())
    }
}
