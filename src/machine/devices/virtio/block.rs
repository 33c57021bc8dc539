//! The virtio-blk device model: feature bits, the configuration space, and the request engine
//! that turns descriptor chains into reads and writes of a [`DiskImage`].
//!
//! The transport owns the queues and calls [`BlockDevice::process_queue`] when the driver kicks
//! one. Each call finishes every request it takes (I/O is synchronous), so once it returns no
//! request is in flight: a migration that stops calling it and then calls
//! [`BlockDevice::flush`] has drained the disk. All guest-memory writes (read data, IDs, status
//! bytes, the used ring) go through vm-memory, whose bitmap migration folds into the dirty log.

mod request;

use std::mem::offset_of;

use virtio_bindings::virtio_blk::{self as blk, virtio_blk_config};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::block::{AlignedBuf, DiskImage, SECTOR_SIZE};
use crate::cli::BlockDeviceConfig;
use crate::machine::memory::GuestMemory;

/// The largest queue the device offers (QEMU's virtio-blk default).
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Bytes of the configuration space the device implements: `struct virtio_blk_config` up to
/// the secure-erase fields, whose feature ferry does not offer.
pub const CONFIG_SIZE: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// The most sectors one discard or write-zeroes segment may cover (just under 2 GiB), so a
/// single request cannot keep the I/O thread busy for long.
const MAX_ZERO_SECTORS: u32 = (1 << 22) - 1;
/// Discard and write-zeroes segments per request; Linux sends one unless told more.
const MAX_ZERO_SEGMENTS: u32 = 1;
/// Bytes moved between the image and guest memory per system call.
const BOUNCE_SIZE: usize = 1 << 20;

/// A failure of the queue itself (as opposed to a failed request, which the guest is told about
/// through the request's status byte), or of the image when the VMM flushes it.
#[derive(Debug, thiserror::Error)]
pub enum BlockDeviceError {
    #[error("virtio-blk {id}: the driver left the queue in a state the device cannot use")]
    Queue {
        id: String,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("disk {id}: flush failed: {source}")]
    Flush {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// One virtio-blk device.
pub struct BlockDevice {
    id: String,
    image: DiskImage,
    /// What GET_ID returns, zero-padded.
    serial: [u8; blk::VIRTIO_BLK_ID_BYTES as usize],
    num_queues: u16,
    acked_features: u64,
    bounce: AlignedBuf,
}

impl BlockDevice {
    /// A device for `config` over `image`. A serial longer than 20 bytes is cut to 20, as QEMU
    /// does.
    pub fn new(image: DiskImage, config: &BlockDeviceConfig) -> Self {
        let mut serial = [0; blk::VIRTIO_BLK_ID_BYTES as usize];
        if let Some(text) = &config.serial {
            let n = text.len().min(serial.len());
            serial[..n].copy_from_slice(&text.as_bytes()[..n]);
        }
        Self {
            id: config.id.clone(),
            image,
            serial,
            num_queues: config.num_queues.max(1),
            acked_features: 0,
            bounce: AlignedBuf::new(BOUNCE_SIZE),
        }
    }

    /// The image, to switch its lock mode at a migration's hand-over.
    pub fn image_mut(&mut self) -> &mut DiskImage {
        &mut self.image
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Every feature the device offers.
    pub fn device_features(&self) -> u64 {
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(blk::VIRTIO_BLK_F_SEG_MAX)
            | bit(blk::VIRTIO_BLK_F_BLK_SIZE)
            | bit(blk::VIRTIO_BLK_F_FLUSH);
        if self.image.readonly() {
            features |= bit(blk::VIRTIO_BLK_F_RO);
        }
        if self.num_queues > 1 {
            features |= bit(blk::VIRTIO_BLK_F_MQ);
        }
        if self.image.supports_discard() {
            features |= bit(blk::VIRTIO_BLK_F_DISCARD);
        }
        if self.image.supports_write_zeroes() {
            features |= bit(blk::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        features
    }

    /// Records what the driver accepted at FEATURES_OK; bits the device did not offer are
    /// dropped. The transport still sets `Queue::set_event_idx` itself.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.device_features();
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }

    /// The features and configuration space, which the transport answers the driver from
    /// without waiting for a request in progress: none of them changes once the image is open.
    pub fn registers(&self) -> BlockRegisters {
        BlockRegisters {
            id: self.id.clone(),
            features: self.device_features(),
            config: self.config_bytes(),
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0; CONFIG_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        let block_sectors = self.image.block_size() / SECTOR_SIZE as u32;
        put(
            offset_of!(virtio_blk_config, capacity),
            &(self.image.size() / SECTOR_SIZE).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &u32::from(QUEUE_MAX_SIZE - 2).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &self.image.block_size().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.num_queues.to_le_bytes(),
        );
        for (field, value) in [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                MAX_ZERO_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                MAX_ZERO_SEGMENTS,
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                block_sectors,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                MAX_ZERO_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                MAX_ZERO_SEGMENTS,
            ),
        ] {
            put(field, &value.to_le_bytes());
        }
        put(
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            &[u8::from(self.image.supports_discard())],
        );
        config
    }

    /// Executes every request the driver has made available on `queue` and returns whether the
    /// driver must be interrupted. A bad request fails with its status byte; only a queue that
    /// cannot be walked (not ready, an available index running ahead of the ring, rings outside
    /// guest memory) is an error, after which the transport should mark the device broken.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
    ) -> Result<bool, BlockDeviceError> {
        loop {
            queue
                .disable_notification(mem)
                .map_err(|e| self.queue_error(e))?;
            while let Some(chain) = queue.iter(mem).map_err(|e| self.queue_error(e))?.next() {
                let head = chain.head_index();
                let used_len = self.execute(mem, chain);
                queue
                    .add_used(mem, head, used_len)
                    .map_err(|e| self.queue_error(e))?;
            }
            // A request made available while notifications were off is picked up here.
            if !queue
                .enable_notification(mem)
                .map_err(|e| self.queue_error(e))?
            {
                break;
            }
        }
        queue
            .needs_notification(mem)
            .map_err(|e| self.queue_error(e))
    }

    fn queue_error(&self, source: virtio_queue::Error) -> BlockDeviceError {
        BlockDeviceError::Queue {
            id: self.id.clone(),
            source,
        }
    }

    /// Makes every write the guest completed durable, for a migration's drain.
    pub fn flush(&self) -> Result<(), BlockDeviceError> {
        self.image
            .flush()
            .map_err(|source| BlockDeviceError::Flush {
                id: self.id.clone(),
                source,
            })
    }
}

/// What a driver reads and writes of a virtio-blk device outside its queues.
pub struct BlockRegisters {
    id: String,
    features: u64,
    config: [u8; CONFIG_SIZE],
}

impl BlockRegisters {
    pub fn device_features(&self) -> u64 {
        self.features
    }

    /// Reads the configuration space; bytes past [`CONFIG_SIZE`] read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| self.config.get(at).copied())
                .unwrap_or(0);
        }
    }

    /// Writes to the configuration space. Only `wce` is writable, and only with
    /// VIRTIO_BLK_F_CONFIG_WCE, which the device does not offer, so every write is dropped.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(id = %self.id, offset, len = data.len(), "ignored virtio-blk config write");
    }
}

fn bit(feature: u32) -> u64 {
    1 << feature
}

#[cfg(test)]
mod tests;
