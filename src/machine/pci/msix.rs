//! MSI-X: the capability, the vector table and pending-bit array a BAR exposes, and delivery of
//! each vector through its own GSI route and irqfd.
//!
//! Every interrupt a ferry device raises comes from ferry's own code (an I/O thread), so masking
//! is done here: a masked vector's interrupt sets its pending bit instead of touching the irqfd,
//! and unmasking delivers it. KVM's routes always hold the latest message.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::config::ConfigSpace;
use crate::machine::interrupts::{GsiRouter, InterruptError, MsiMessage};

pub const CAPABILITY_ID: u8 = 0x11;
const ENTRY_SIZE: u64 = 16;
/// Where the PBA starts in the BAR, after a table of up to 128 vectors.
pub const PBA_OFFSET: u64 = 0x800;
/// The BAR holding table and PBA.
pub const BAR_SIZE: u64 = 0x1000;
pub const MAX_VECTORS: u16 = 128;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// One table entry as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        Self {
            address: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

/// What migrates: the table and the pending bits (enable and function mask are in the
/// config space).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<u64>,
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
}

/// A function's MSI-X vectors.
pub struct Msix {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    capability: usize,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<Vector>,
    router: Arc<GsiRouter>,
}

impl Msix {
    /// Adds the capability to `config` for `count` vectors in BAR `bar` and connects a GSI and an
    /// irqfd to each.
    pub fn new(
        config: &mut ConfigSpace,
        count: u16,
        bar: u8,
        router: Arc<GsiRouter>,
    ) -> Result<Self, InterruptError> {
        assert!((1..=MAX_VECTORS).contains(&count));
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(count - 1).to_le_bytes());
        body.extend_from_slice(&u32::from(bar).to_le_bytes());
        body.extend_from_slice(&(PBA_OFFSET as u32 | u32::from(bar)).to_le_bytes());
        let mut writable = [0u8; 10];
        writable[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        let capability = config.add_capability(CAPABILITY_ID, &body, &writable);
        let mut vectors = Vec::with_capacity(count.into());
        for _ in 0..count {
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            let gsi = router.allocate_gsi()?;
            router
                .vm()
                .register_irqfd(&irqfd, gsi)
                .map_err(|source| InterruptError::Irqfd { gsi, source })?;
            vectors.push(Vector { gsi, irqfd });
        }
        Ok(Self {
            entries: vec![MsixEntry::default(); count.into()],
            pending: vec![0; usize::from(count).div_ceil(64)],
            capability,
            enabled: false,
            function_masked: false,
            vectors,
            router,
        })
    }

    pub fn vector_count(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Picks up the enable and function-mask bits after a config write, delivering what
    /// unmasking releases.
    pub fn config_written(&mut self, config: &ConfigSpace) {
        let control = config.read_u16(self.capability + 2);
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_pending();
    }

    /// Raises `vector`; a masked one becomes pending.
    pub fn trigger(&mut self, vector: u16) {
        let index = usize::from(vector);
        if index >= self.entries.len() || !self.enabled {
            tracing::trace!(vector, enabled = self.enabled, "MSI-X interrupt dropped");
            return;
        }
        if self.masked(index) {
            self.pending[index / 64] |= 1 << (index % 64);
            return;
        }
        if let Err(error) = self.vectors[index].irqfd.write(1) {
            tracing::warn!(vector, %error, "cannot signal an MSI-X irqfd");
        }
    }

    fn masked(&self, index: usize) -> bool {
        self.function_masked || self.entries[index].control & ENTRY_MASKED != 0
    }

    fn deliver_pending(&mut self) {
        if !self.enabled {
            return;
        }
        for index in 0..self.entries.len() {
            let bit = 1u64 << (index % 64);
            if self.pending[index / 64] & bit != 0 && !self.masked(index) {
                self.pending[index / 64] &= !bit;
                self.trigger(index as u16);
            }
        }
    }

    /// A guest read of the table or the PBA.
    pub fn bar_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = if offset >= PBA_OFFSET {
            let word = ((offset - PBA_OFFSET) / 8) as usize;
            self.pending
                .get(word)
                .map(|bits| bits >> ((offset % 8) * 8))
        } else {
            let index = (offset / ENTRY_SIZE) as usize;
            self.entries
                .get(index)
                .map(|entry| match offset % ENTRY_SIZE {
                    0 => entry.address,
                    4 => entry.address >> 32,
                    8 => u64::from(entry.data) | (u64::from(entry.control) << 32),
                    12 => u64::from(entry.control),
                    _ => 0,
                })
        };
        if let Some(value) = value {
            let bytes = value.to_le_bytes();
            let len = data.len().min(8);
            data[..len].copy_from_slice(&bytes[..len]);
        }
    }

    /// A guest write to the table (the PBA is read-only).
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= PBA_OFFSET || !matches!(data.len(), 4 | 8) || offset % 4 != 0 {
            tracing::debug!(offset, len = data.len(), "ignored MSI-X write");
            return;
        }
        let index = (offset / ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        let mut value = [0u8; 8];
        value[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(value);
        let was_masked = entry.control & ENTRY_MASKED != 0;
        match (offset % ENTRY_SIZE, data.len()) {
            (0, 8) => entry.address = value,
            (0, _) => entry.address = (entry.address & !0xffff_ffff) | (value & 0xffff_ffff),
            (4, _) => entry.address = (entry.address & 0xffff_ffff) | (value << 32),
            (8, 8) => {
                entry.data = value as u32;
                entry.control = (value >> 32) as u32;
            }
            (8, _) => entry.data = value as u32,
            (12, _) => entry.control = value as u32,
            _ => return,
        }
        let entry = *entry;
        self.update_route(index);
        if was_masked && entry.control & ENTRY_MASKED == 0 {
            self.deliver_pending();
        }
    }

    fn update_route(&self, index: usize) {
        let entry = self.entries[index];
        let message = (entry.address != 0).then_some(MsiMessage {
            address: entry.address,
            data: entry.data,
        });
        if let Err(error) = self.router.set_msi(self.vectors[index].gsi, message) {
            tracing::warn!(vector = index, %error, "cannot route an MSI-X vector");
        }
    }

    pub fn save(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
        }
    }

    /// Whether a saved table has as many vectors as this one.
    pub fn check(&self, state: &MsixState) -> Result<(), MsixError> {
        if state.entries.len() != self.entries.len() || state.pending.len() != self.pending.len() {
            return Err(MsixError::VectorCount {
                source_vectors: state.entries.len(),
                here: self.entries.len(),
            });
        }
        Ok(())
    }

    /// Puts back a saved table (the config space must be restored first) and routes it.
    pub fn restore(&mut self, state: MsixState, config: &ConfigSpace) -> Result<(), MsixError> {
        self.check(&state)?;
        self.entries = state.entries;
        self.pending = state.pending;
        for index in 0..self.entries.len() {
            self.update_route(index);
        }
        self.config_written(config);
        Ok(())
    }
}

/// Why a migrated MSI-X table does not fit the function it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error(
        "{source_vectors} MSI-X vectors on the source, {here} here; the two ends configure the \
         device differently (compare its num-queues)"
    )]
    VectorCount { source_vectors: usize, here: usize },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::interrupts::router_on_a_test_vm;
    use crate::machine::pci::config::VIRTIO_BLK_IDS;

    /// A function with `vectors` MSI-X vectors on a fresh VM with an irqchip, or `None` without
    /// /dev/kvm outside CI.
    fn function(vectors: u16) -> Option<(ConfigSpace, Msix)> {
        let router = router_on_a_test_vm()?;
        let mut config = ConfigSpace::new(VIRTIO_BLK_IDS);
        let msix = Msix::new(&mut config, vectors, 1, router).unwrap();
        Some((config, msix))
    }

    fn write_u32(msix: &mut Msix, offset: u64, value: u32) {
        msix.bar_write(offset, &value.to_le_bytes());
    }

    fn pba(msix: &Msix) -> u64 {
        let mut bits = [0u8; 8];
        msix.bar_read(PBA_OFFSET, &mut bits);
        u64::from_le_bytes(bits)
    }

    // KVM consumes an irqfd's count as it injects, so a delivered interrupt is seen as a pending
    // bit that is no longer there.
    #[test]
    fn masked_vectors_pend_and_are_delivered_when_unmasked() {
        let Some((mut config, mut msix)) = function(2) else {
            return;
        };
        let control = msix.capability + 2;
        config.write(control, &CONTROL_ENABLE.to_le_bytes());
        msix.config_written(&config);
        write_u32(&mut msix, 16, 0xfee0_0000);
        write_u32(&mut msix, 16 + 8, 0x41);

        // Entries start masked: the interrupt waits in the PBA.
        msix.trigger(1);
        assert_eq!(pba(&msix), 0b10);
        write_u32(&mut msix, 16 + 12, 0);
        assert_eq!(pba(&msix), 0, "unmasking delivers the pending interrupt");
        msix.trigger(1);
        assert_eq!(pba(&msix), 0);

        // The function mask holds everything back, whatever the entries say.
        config.write(
            control,
            &(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes(),
        );
        msix.config_written(&config);
        msix.trigger(1);
        msix.trigger(0);
        assert_eq!(pba(&msix), 0b11);
        config.write(control, &CONTROL_ENABLE.to_le_bytes());
        msix.config_written(&config);
        assert_eq!(pba(&msix), 0b01, "vector 0 is still masked by its entry");

        // Out-of-range vectors and a disabled capability drop the interrupt.
        msix.trigger(7);
        config.write(control, &0u16.to_le_bytes());
        msix.config_written(&config);
        msix.trigger(1);
        assert_eq!(pba(&msix), 0b01);
    }

    #[test]
    fn the_table_reads_back_and_migrates() {
        let Some((config, mut msix)) = function(3) else {
            return;
        };
        msix.bar_write(32, &0x1_fee0_1000u64.to_le_bytes());
        write_u32(&mut msix, 32 + 8, 0x55);
        let mut word = [0u8; 4];
        msix.bar_read(32 + 4, &mut word);
        assert_eq!(u32::from_le_bytes(word), 1);
        msix.bar_read(32 + 12, &mut word);
        assert_eq!(u32::from_le_bytes(word), ENTRY_MASKED, "still masked");

        let state = msix.save();
        let Some((other_config, mut other)) = function(3) else {
            return;
        };
        other.restore(state.clone(), &other_config).unwrap();
        assert_eq!(other.save(), state);
        let Some((_, mut smaller)) = function(2) else {
            return;
        };
        let error = smaller.restore(state, &config).unwrap_err();
        assert!(
            matches!(
                error,
                MsixError::VectorCount {
                    source_vectors: 3,
                    here: 2
                }
            ),
            "{error}"
        );
    }
}
