//! The virtio 1.x modern PCI transport, laid out like QEMU's: BAR1 holds the MSI-X table and
//! PBA, BAR4 (64-bit, prefetchable) the common configuration, ISR, device configuration and
//! notification regions, each found through a vendor capability.
//!
//! Queue notifications reach the device's I/O thread through ioeventfds (KVM signals them
//! without leaving the kernel, so the notifying vCPU never waits for the disk); a notification
//! that arrives before they are registered is forwarded to the same eventfd by hand.
//!
//! A function is two halves under two locks: the transport registers ([`VirtioPci`], what the
//! vCPUs read and write) and the [`Engine`] (the live queues and the backend, which the I/O
//! thread holds for a batch of requests). Register accesses take only the first, so a vCPU never
//! waits for storage; the few that change what the engine does (DRIVER_OK, a queue changed while
//! running, a status that stops the device) take the engine's lock briefly, and a reset, which
//! flushes, is left to the I/O thread. Locks are taken in the order transport, then engine.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::machine::interrupts::{GsiRouter, InterruptError};
use crate::machine::memory::GuestMemory;
use crate::machine::pci::config::{Bar, BarKind, ConfigSpace, PciIds, COMMAND};
use crate::machine::pci::msix::{self, Msix, MsixState};
use crate::machine::pci::{BarAllocator, PciFunction};

const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern devices are 0x1040 + their virtio device type.
const MODERN_DEVICE_BASE: u16 = 0x1040;
const VENDOR_CAPABILITY: u8 = 0x09;

const MSIX_BAR: usize = 1;
const VIRTIO_BAR: usize = 4;
const VIRTIO_BAR_SIZE: u64 = 0x4000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LENGTH: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LENGTH: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
/// A window in config space onto the BARs, for firmware that cannot map them.
const CAP_PCI_CFG: u8 = 5;
/// Where, inside that capability, the BAR number, offset, length and data window are.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

pub const NO_VECTOR: u16 = 0xffff;

const STATUS_FEATURES_OK: u8 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_DRIVER_OK: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_NEEDS_RESET: u8 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const STATUS_FAILED: u8 = virtio_config::VIRTIO_CONFIG_S_FAILED as u8;
/// The feature bit as a mask of the 64 feature bits.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;

/// The device-specific registers: answered in the vCPU's exit, so they must not touch storage.
pub trait DeviceRegisters: Send {
    fn device_features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
}

/// What a virtio device model gives the transport.
pub trait VirtioBackend: Send {
    /// Why a queue could not be processed or the device could not flush.
    type Error: std::error::Error + Send + Sync + 'static;
    type Registers: DeviceRegisters;
    /// The virtio device type (2 = block).
    fn device_type(&self) -> u16;
    /// The PCI class code the function reports.
    fn pci_class(&self) -> u32;
    fn queue_count(&self) -> u16;
    fn queue_max_size(&self) -> u16;
    /// The registers the transport answers from, taken once when the function is built.
    fn registers(&self) -> Self::Registers;
    /// What the driver accepted; the engine is told at DRIVER_OK (and after a restore).
    fn set_acked_features(&mut self, features: u64);
    /// Handles every request `queue` holds; true if the driver must be interrupted.
    fn process_queue(
        &mut self,
        memory: &GuestMemory,
        queue: &mut Queue,
    ) -> Result<bool, Self::Error>;
    /// Makes every completed write durable (the migration's drain, and a reset).
    fn flush(&mut self) -> Result<(), Self::Error>;
}

/// The driver-visible registers of the common configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonState {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub msix_config: u16,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
}

/// The transport half of a virtio device on the PCI bus: the registers a vCPU reaches.
pub struct VirtioPci<B: VirtioBackend> {
    id: String,
    config: ConfigSpace,
    msix: Msix,
    common: CommonState,
    /// The queues as the driver sets them up; the engine takes copies at DRIVER_OK, and its
    /// own copies hold where in the rings the device is.
    queues: Vec<Queue>,
    vectors: Vec<u16>,
    notifiers: Vec<EventFd>,
    /// Where the VIRTIO_PCI_CAP_PCI_CFG capability starts in config space.
    pci_cfg: usize,
    /// Where the notifiers are registered with KVM, if they are.
    ioevents_at: Option<u64>,
    registers: B::Registers,
    /// The driver wrote status 0 and the I/O thread has not finished the reset (it flushes):
    /// status reads back unchanged, which tells the driver to wait, and its writes are dropped.
    reset_pending: bool,
    /// Tells the I/O thread that a reset is pending.
    reset_event: EventFd,
    engine: Arc<Mutex<Engine<B>>>,
    router: Arc<GsiRouter>,
}

impl<B: VirtioBackend> VirtioPci<B> {
    pub fn new(
        id: &str,
        backend: B,
        multifunction: bool,
        bars: &mut BarAllocator,
        router: Arc<GsiRouter>,
        memory: GuestMemory,
    ) -> Result<Self, TransportError> {
        let queue_count = backend.queue_count();
        let mut config = ConfigSpace::new(PciIds {
            vendor: VIRTIO_VENDOR,
            device: MODERN_DEVICE_BASE + backend.device_type(),
            class: backend.pci_class(),
            revision: 1,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: backend.device_type(),
        });
        config.set_multifunction(multifunction);
        let msix_bar = Bar {
            index: MSIX_BAR,
            kind: BarKind::Mem32,
            size: msix::BAR_SIZE,
        };
        let virtio_bar = Bar {
            index: VIRTIO_BAR,
            kind: BarKind::Mem64Prefetchable,
            size: VIRTIO_BAR_SIZE,
        };
        for bar in [msix_bar, virtio_bar] {
            let address = bars
                .allocate(bar.kind, bar.size)
                .ok_or(TransportError::NoBarSpace(id.to_owned()))?;
            config.add_bar(bar, address);
        }
        // One vector per queue and one for configuration changes.
        let msix = Msix::new(&mut config, queue_count + 1, MSIX_BAR as u8, router.clone())?;
        add_virtio_capability(&mut config, CAP_COMMON, COMMON_OFFSET, COMMON_LENGTH, None);
        add_virtio_capability(&mut config, CAP_ISR, ISR_OFFSET, 1, None);
        add_virtio_capability(&mut config, CAP_DEVICE, DEVICE_OFFSET, DEVICE_LENGTH, None);
        let notify_length = u64::from(queue_count) * u64::from(NOTIFY_MULTIPLIER);
        add_virtio_capability(
            &mut config,
            CAP_NOTIFY,
            NOTIFY_OFFSET,
            notify_length,
            Some(NOTIFY_MULTIPLIER),
        );
        let pci_cfg = add_pci_cfg_capability(&mut config);
        let new_queues = || {
            (0..queue_count)
                .map(|_| Queue::new(backend.queue_max_size()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TransportError::Queue(format!("{e:?}")))
        };
        let queues = new_queues()?;
        let live_queues = new_queues()?;
        let new_event = || EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd);
        let notifiers = (0..queue_count)
            .map(|_| new_event())
            .collect::<Result<Vec<_>, _>>()?;
        let registers = backend.registers();
        Ok(Self {
            id: id.to_owned(),
            config,
            msix,
            common: CommonState {
                msix_config: NO_VECTOR,
                ..Default::default()
            },
            queues,
            vectors: vec![NO_VECTOR; queue_count.into()],
            notifiers,
            pci_cfg,
            ioevents_at: None,
            registers,
            reset_pending: false,
            reset_event: new_event()?,
            engine: Arc::new(Mutex::new(Engine::new(id, live_queues, backend, memory))),
            router,
        })
    }

    /// Copies of the queue notifiers, for the I/O thread to wait on.
    pub fn notifiers(&self) -> std::io::Result<Vec<EventFd>> {
        self.notifiers.iter().map(EventFd::try_clone).collect()
    }

    /// A copy of the eventfd that announces a reset, for the I/O thread to wait on.
    pub fn reset_event(&self) -> std::io::Result<EventFd> {
        self.reset_event.try_clone()
    }

    /// Whether the device takes requests: the driver finished its setup with features both
    /// sides agreed on, neither side gave up on the device, and no reset is under way.
    fn active(&self) -> bool {
        let status = self.common.status;
        status & (STATUS_DRIVER_OK | STATUS_FEATURES_OK) == STATUS_DRIVER_OK | STATUS_FEATURES_OK
            && status & (STATUS_FAILED | STATUS_NEEDS_RESET) == 0
            && !self.reset_pending
    }

    /// Acts on what the engine made of a batch of requests: the I/O thread calls this after
    /// letting go of the engine.
    fn deliver(&mut self, index: usize, outcome: Outcome) {
        match outcome {
            Outcome::Idle => {}
            Outcome::Interrupt => self.msix.trigger(self.vectors[index]),
            Outcome::Broken => {
                // virtio's answer to a ring the device cannot parse is NEEDS_RESET, and the
                // driver decides; the VM goes on.
                self.common.status |= STATUS_NEEDS_RESET;
                self.common.config_generation = self.common.config_generation.wrapping_add(1);
                self.msix.trigger(self.common.msix_config);
            }
        }
    }

    /// The driver wrote status 0. A device that never got past status 0 has nothing in the
    /// engine to undo; any other waits for the I/O thread, since the reset flushes.
    fn request_reset(&mut self) {
        if self.reset_pending {
            return;
        }
        if self.common.status == 0 {
            self.reset_registers();
            return;
        }
        self.reset_pending = true;
        self.unregister_ioevents();
        if let Err(error) = self.reset_event.write(1) {
            tracing::error!(device = %self.id, %error, "cannot hand a reset to the I/O thread");
        }
        tracing::debug!(device = %self.id, "virtio reset requested");
    }

    /// Ends a reset once the engine has been reset: status reads 0 from now on.
    fn finish_reset(&mut self) {
        self.reset_pending = false;
        self.reset_registers();
        tracing::debug!(device = %self.id, "virtio reset");
    }

    fn reset_registers(&mut self) {
        self.unregister_ioevents();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.vectors.fill(NO_VECTOR);
        self.common = CommonState {
            msix_config: NO_VECTOR,
            config_generation: self.common.config_generation,
            ..Default::default()
        };
    }

    fn register_ioevents(&mut self) {
        let Some(bar) = self.config.bar_address(VIRTIO_BAR) else {
            return;
        };
        if self.ioevents_at == Some(bar) {
            return;
        }
        self.unregister_ioevents();
        for (index, fd) in self.notifiers.iter().enumerate() {
            let address = IoEventAddress::Mmio(notify_address(bar, index));
            if let Err(error) = self.router.vm().register_ioevent(fd, &address, NoDatamatch) {
                // Notifications still arrive as MMIO exits and are forwarded by hand.
                tracing::warn!(device = %self.id, queue = index, %error, "no ioeventfd");
            }
        }
        self.ioevents_at = Some(bar);
    }

    fn unregister_ioevents(&mut self) {
        let Some(bar) = self.ioevents_at.take() else {
            return;
        };
        for (index, fd) in self.notifiers.iter().enumerate() {
            let address = IoEventAddress::Mmio(notify_address(bar, index));
            let _ = self
                .router
                .vm()
                .unregister_ioevent(fd, &address, NoDatamatch);
        }
    }
}

fn notify_address(bar: u64, queue: usize) -> u64 {
    bar + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
}

fn add_virtio_capability(
    config: &mut ConfigSpace,
    kind: u8,
    offset: u64,
    length: u64,
    notify_multiplier: Option<u32>,
) {
    let mut body = Vec::with_capacity(18);
    let cap_len = if notify_multiplier.is_some() {
        20u8
    } else {
        16
    };
    body.extend_from_slice(&[cap_len, kind, VIRTIO_BAR as u8, 0, 0, 0]);
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(multiplier) = notify_multiplier {
        body.extend_from_slice(&multiplier.to_le_bytes());
    }
    let writable = vec![0; body.len()];
    config.add_capability(VENDOR_CAPABILITY, &body, &writable);
}

/// The VIRTIO_PCI_CAP_PCI_CFG capability: BAR number, offset and length are the driver's to set,
/// and the data window reads and writes the BAR there.
fn add_pci_cfg_capability(config: &mut ConfigSpace) -> usize {
    let mut body = vec![0u8; 18];
    body[0] = 20;
    body[1] = CAP_PCI_CFG;
    let mut writable = vec![0u8; 18];
    // Relative to the body, which starts 2 bytes into the capability.
    writable[PCI_CFG_BAR - 2] = 0xff;
    writable[PCI_CFG_OFFSET - 2..PCI_CFG_DATA - 2 + 4].fill(0xff);
    config.add_capability(VENDOR_CAPABILITY, &body, &writable)
}

impl<B: VirtioBackend> VirtioPci<B> {
    /// The BAR access the PCI_CFG window describes, if the driver set a sensible one.
    fn pci_cfg_access(&self) -> Option<(usize, u64, usize)> {
        let cap = self.pci_cfg;
        let mut bar = [0u8];
        self.config.read(cap + PCI_CFG_BAR, &mut bar);
        let offset = self.config.read_u32(cap + PCI_CFG_OFFSET);
        let length = self.config.read_u32(cap + PCI_CFG_LENGTH) as usize;
        (matches!(length, 1 | 2 | 4) && offset as usize % length == 0).then_some((
            usize::from(bar[0]),
            u64::from(offset),
            length,
        ))
    }

    fn in_pci_cfg_window(&self, offset: usize, len: usize) -> bool {
        let window = self.pci_cfg + PCI_CFG_DATA;
        offset < window + 4 && window < offset + len
    }
}

impl<B: VirtioBackend> PciFunction for VirtioPci<B> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.in_pci_cfg_window(offset, data.len()) {
            if let Some((bar, bar_offset, length)) = self.pci_cfg_access() {
                let mut value = [0u8; 4];
                self.bar_read(bar, bar_offset, &mut value[..length]);
                self.config.put(self.pci_cfg + PCI_CFG_DATA, &value);
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if self.in_pci_cfg_window(offset, data.len()) {
            if let Some((bar, bar_offset, length)) = self.pci_cfg_access() {
                let mut value = [0u8; 4];
                self.config.read(self.pci_cfg + PCI_CFG_DATA, &mut value);
                self.bar_write(bar, bar_offset, &value[..length]);
            }
            return;
        }
        self.msix.config_written(&self.config);
        if (COMMAND..COMMAND + 2).contains(&offset) || (0x10..0x28).contains(&offset) {
            // Memory decoding switched or a BAR moved: the notifiers follow BAR4.
            if self.ioevents_at.is_some() && self.ioevents_at != self.config.bar_address(VIRTIO_BAR)
            {
                self.unregister_ioevents();
            }
            if self.active() {
                self.register_ioevents();
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (bar, offset) {
            (MSIX_BAR, _) => self.msix.bar_read(offset, data),
            (VIRTIO_BAR, COMMON_OFFSET..ISR_OFFSET) => self.common_read(offset, data),
            // With MSI-X there is nothing for the ISR to report.
            (VIRTIO_BAR, ISR_OFFSET..DEVICE_OFFSET) => {}
            (VIRTIO_BAR, DEVICE_OFFSET..NOTIFY_OFFSET) => {
                self.registers.read_config(offset - DEVICE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset) {
            (MSIX_BAR, _) => self.msix.bar_write(offset, data),
            (VIRTIO_BAR, COMMON_OFFSET..ISR_OFFSET) => self.common_write(offset, data),
            (VIRTIO_BAR, DEVICE_OFFSET..NOTIFY_OFFSET) => {
                self.registers.write_config(offset - DEVICE_OFFSET, data);
            }
            (VIRTIO_BAR, NOTIFY_OFFSET..) => {
                let index = ((offset - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(fd) = self.notifiers.get(index) {
                    let _ = fd.write(1);
                }
            }
            _ => {}
        }
    }
}

/// Why a virtio-pci function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}: no room left for its BARs in the PCI MMIO windows")]
    NoBarSpace(String),
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
    #[error("cannot create a virtqueue: {0}")]
    Queue(String),
    #[error("cannot create a queue notifier: {0}")]
    EventFd(#[source] std::io::Error),
}

mod common;
mod engine;
mod persist;

use engine::Outcome;
pub use engine::{Engine, VirtioDevice};
pub use persist::{QueueState, RestoreError, VirtioPciState};
#[cfg(test)]
mod tests;
