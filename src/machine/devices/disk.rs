//! A disk as the VM has it: a `-drive` image behind a virtio-blk-pci function, with its I/O
//! thread, and what a migration does to it (drain, state, the image lock's hand-over).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::lock;
use super::virtio::block::{BlockDevice, BlockDeviceError, BlockRegisters, QUEUE_MAX_SIZE};
use super::virtio::pci::{
    DeviceRegisters, TransportError, VirtioBackend, VirtioDevice, VirtioPci, VirtioPciState,
};
use super::virtio::worker::IoThread;
use crate::block::{BlockError, DiskImage, LockMode};
use crate::cli::{BlockDeviceConfig, DriveConfig};
use crate::machine::interrupts::GsiRouter;
use crate::machine::memory::GuestMemory;
use crate::machine::pci::{BarAllocator, SharedFunction};
use crate::migrate::state::{DeviceDescription, Migratable, StateError};

/// PCI class "mass storage, SCSI", which QEMU gives virtio-blk (drivers match on the ids).
const MASS_STORAGE_CLASS: u32 = 0x01_0000;
const VIRTIO_BLOCK_TYPE: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK as u16;

/// Why a disk could not be set up, or could not take part in a migration's hand-over.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening the image, or taking or giving up its lock.
    #[error(transparent)]
    Image(#[from] BlockError),
    /// Flushing what the disk completed to stable storage.
    #[error(transparent)]
    Device(#[from] BlockDeviceError),
    #[error("-device {id}: {source}")]
    Transport {
        id: String,
        #[source]
        source: TransportError,
    },
    #[error("-device {id}: cannot start its I/O thread: {source}")]
    Thread {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

impl DeviceRegisters for BlockRegisters {
    fn device_features(&self) -> u64 {
        BlockRegisters::device_features(self)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        BlockRegisters::read_config(self, offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        BlockRegisters::write_config(self, offset, data)
    }
}

impl VirtioBackend for BlockDevice {
    type Error = BlockDeviceError;
    type Registers = BlockRegisters;

    fn device_type(&self) -> u16 {
        VIRTIO_BLOCK_TYPE
    }
    fn pci_class(&self) -> u32 {
        MASS_STORAGE_CLASS
    }
    fn queue_count(&self) -> u16 {
        self.num_queues()
    }
    fn queue_max_size(&self) -> u16 {
        QUEUE_MAX_SIZE
    }
    fn registers(&self) -> BlockRegisters {
        BlockDevice::registers(self)
    }
    fn set_acked_features(&mut self, features: u64) {
        BlockDevice::set_acked_features(self, features)
    }
    fn process_queue(
        &mut self,
        memory: &GuestMemory,
        queue: &mut Queue,
    ) -> Result<bool, BlockDeviceError> {
        BlockDevice::process_queue(self, memory, queue)
    }
    fn flush(&mut self) -> Result<(), BlockDeviceError> {
        BlockDevice::flush(self)
    }
}

/// One virtio-blk-pci disk.
pub struct Disk {
    pub config: BlockDeviceConfig,
    pub drive: DriveConfig,
    size: u64,
    device: VirtioDevice<BlockDevice>,
    io: IoThread,
}

impl Disk {
    /// Opens the image and builds the function. An incoming VM's disk starts quiesced with its
    /// image unlocked for writing: the source still owns it until the commit.
    pub fn create(
        config: &BlockDeviceConfig,
        drive: &DriveConfig,
        multifunction: bool,
        incoming: bool,
        bars: &mut BarAllocator,
        router: Arc<GsiRouter>,
        memory: GuestMemory,
    ) -> Result<Self, DiskError> {
        let mode = if incoming {
            LockMode::Inactive
        } else {
            LockMode::Active
        };
        let image = DiskImage::open(drive, mode)?;
        let size = image.size();
        let backend = BlockDevice::new(image, config);
        let transport = VirtioPci::new(&config.id, backend, multifunction, bars, router, memory)
            .map_err(|source| DiskError::Transport {
                id: config.id.clone(),
                source,
            })?;
        let device = VirtioDevice::new(transport);
        if incoming {
            device.quiesce();
        }
        let io = IoThread::spawn(format!("iothread {}", config.id), device.clone()).map_err(
            |source| DiskError::Thread {
                id: config.id.clone(),
                source,
            },
        )?;
        tracing::info!(
            id = %config.id,
            file = %drive.file.display(),
            size,
            readonly = drive.readonly,
            direct = drive.direct,
            addr = %address(config),
            "disk attached"
        );
        Ok(Self {
            config: config.clone(),
            drive: drive.clone(),
            size,
            device,
            io,
        })
    }

    pub fn function(&self) -> SharedFunction {
        self.device.transport().clone()
    }

    /// What both ends of a migration must agree on: where the disk is, what it says it is,
    /// and the image's size (not its path, which may differ between hosts).
    pub fn description(&self) -> DeviceDescription {
        let serial = self.config.serial.clone().unwrap_or_default();
        DeviceDescription {
            kind: "virtio-blk-pci".into(),
            id: self.config.id.clone(),
            attributes: [
                ("bus", "pcie.0".to_owned()),
                ("addr", address(&self.config)),
                ("serial", serial),
                ("readonly", on_off(self.drive.readonly).to_owned()),
                ("size", self.size.to_string()),
                ("num-queues", self.config.num_queues.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        }
    }

    /// The migration's drain: no new request is taken, none is in flight, and every completed
    /// write is on stable storage.
    pub fn quiesce(&self) -> Result<(), DiskError> {
        self.device.quiesce();
        self.flush()
    }

    /// Makes what the disk completed so far durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        Ok(self.device.flush()?)
    }

    /// Gives up the image's write lock so that the destination can take it.
    pub fn release_image(&self) -> Result<(), DiskError> {
        self.set_lock_mode(LockMode::Inactive)
    }

    /// Takes the image's lock (again), without taking requests yet.
    pub fn take_image(&self) -> Result<(), DiskError> {
        self.set_lock_mode(LockMode::Active)
    }

    fn set_lock_mode(&self, mode: LockMode) -> Result<(), DiskError> {
        let mut engine = lock(self.device.engine());
        Ok(engine.backend_mut().image_mut().set_lock_mode(mode)?)
    }

    /// Takes requests again, including those the guest queued meanwhile.
    pub fn resume(&self) {
        self.device.unquiesce();
        self.io.kick();
    }

    /// The id of its section in the migration stream, apart from other parts' ids.
    pub fn section_id(&self) -> String {
        format!("disk/{}", self.config.id)
    }
}

fn address(config: &BlockDeviceConfig) -> String {
    format!("{:#x}.{}", config.addr.slot, config.addr.function)
}

fn on_off(value: bool) -> &'static str {
    if value {
        "on"
    } else {
        "off"
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // What the guest saw completed is on stable storage when ferry exits.
        if let Err(error) = self.device.flush() {
            tracing::warn!(id = %self.config.id, %error, "flush at exit failed");
        }
    }
}

/// A disk's state in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    pub transport: VirtioPciState,
}

/// The migration's view of a disk (the disk itself is shared with its I/O thread and the bus).
pub struct DiskSection<'a>(pub &'a Disk);

impl Migratable for DiskSection<'_> {
    const KIND: &'static str = "virtio-blk-pci";
    const VERSION: u32 = 1;
    type State = DiskState;

    fn save_state(&self) -> Result<DiskState, StateError> {
        let disk = self.0;
        if !disk.device.is_drained() {
            return Err(StateError::Save {
                what: disk.config.id.clone(),
                reason: "the disk was not drained".into(),
            });
        }
        Ok(DiskState {
            transport: lock(disk.device.transport()).save(),
        })
    }

    fn restore_state(&mut self, state: DiskState) -> Result<(), StateError> {
        let disk = self.0;
        lock(disk.device.transport())
            .restore(state.transport)
            .map_err(|error| self.restore_error(error))
    }
}

impl DiskSection<'_> {
    /// Whether `state` fits this disk's transport, touching nothing ([`VirtioPci::check`]).
    pub fn check(&self, state: &DiskState) -> Result<(), StateError> {
        lock(self.0.device.transport())
            .check(&state.transport)
            .map_err(|error| self.restore_error(error))
    }

    fn restore_error(&self, error: impl std::fmt::Display) -> StateError {
        StateError::Restore {
            what: self.0.config.id.clone(),
            reason: error.to_string(),
        }
    }
}
