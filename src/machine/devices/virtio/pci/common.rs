//! The virtio common configuration registers: feature negotiation, device status, and the
//! queue selected for setup. Reads never touch the engine; writes do only where they change
//! what it does.

use virtio_queue::QueueT;

use crate::machine::devices::lock;

use super::*;

impl<B: VirtioBackend> VirtioPci<B> {
    pub(super) fn common_read(&self, offset: u64, data: &mut [u8]) {
        let queue = self.queues.get(usize::from(self.common.queue_select));
        let select = self.common.device_feature_select;
        let value: u64 = match offset {
            0x00 => self.common.device_feature_select.into(),
            0x04 if select < 2 => (self.registers.device_features() >> (32 * select)) & 0xffff_ffff,
            0x04 => 0,
            0x08 => self.common.driver_feature_select.into(),
            0x0c if self.common.driver_feature_select < 2 => {
                (self.common.driver_features >> (32 * self.common.driver_feature_select))
                    & 0xffff_ffff
            }
            0x0c => 0,
            0x10 => self.common.msix_config.into(),
            0x12 => self.queues.len() as u64,
            0x14 => self.common.status.into(),
            0x15 => self.common.config_generation.into(),
            0x16 => self.common.queue_select.into(),
            0x18 => queue.map_or(0, |q| q.size().into()),
            0x1a => self
                .vectors
                .get(usize::from(self.common.queue_select))
                .map_or(NO_VECTOR, |&v| v)
                .into(),
            0x1c => queue.map_or(0, |q| q.ready().into()),
            0x1e => u64::from(self.common.queue_select),
            0x20..=0x37 => {
                let address = queue.map_or(0, |q| match offset & !7 {
                    0x20 => q.desc_table(),
                    0x28 => q.avail_ring(),
                    _ => q.used_ring(),
                });
                address >> (8 * (offset & 7))
            }
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(8);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
        if self.reset_pending {
            // virtio 1.x 2.4: the driver waits for status 0 before it touches the device again.
            tracing::debug!(device = %self.id, offset, "register write during a reset dropped");
            return;
        }
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(bytes);
        let select = usize::from(self.common.queue_select);
        match offset {
            0x00 => self.common.device_feature_select = value as u32,
            0x08 => self.common.driver_feature_select = value as u32,
            // Features are settled at FEATURES_OK; later writes cannot change them.
            0x0c if self.common.status & STATUS_FEATURES_OK != 0 => {
                tracing::debug!(device = %self.id, "driver features written after FEATURES_OK");
            }
            0x0c if self.common.driver_feature_select < 2 => {
                let shift = 32 * self.common.driver_feature_select;
                self.common.driver_features =
                    (self.common.driver_features & !(0xffff_ffff << shift)) | (value << shift);
            }
            0x10 => self.common.msix_config = self.checked_vector(value as u16),
            0x14 => self.set_status(value as u8),
            0x16 => self.common.queue_select = value as u16,
            0x18 => self.queue_write(select, |queue| queue.set_size(value as u16)),
            0x1a => {
                let vector = self.checked_vector(value as u16);
                if let Some(slot) = self.vectors.get_mut(select) {
                    *slot = vector;
                }
            }
            0x1c => self.queue_write(select, |queue| queue.set_ready(value & 1 == 1)),
            0x20..=0x37 => {
                let low = (offset & 4 == 0).then_some(value as u32);
                let high = if offset & 4 != 0 {
                    Some(value as u32)
                } else if len == 8 {
                    Some((value >> 32) as u32)
                } else {
                    None
                };
                self.queue_write(select, |queue| match offset & !7 {
                    0x20 => queue.set_desc_table_address(low, high),
                    0x28 => queue.set_avail_ring_address(low, high),
                    _ => queue.set_used_ring_address(low, high),
                });
            }
            _ => tracing::debug!(device = %self.id, offset, "write to a read-only virtio register"),
        }
    }

    /// Changes the driver's view of queue `index`, and the engine's once it has the queues
    /// (after DRIVER_OK), as a driver may change a queue of a running device.
    fn queue_write(&mut self, index: usize, change: impl Fn(&mut Queue)) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        change(queue);
        if self.common.status & STATUS_DRIVER_OK != 0 {
            lock(&self.engine).change_queue(index, change);
        }
    }

    /// A vector beyond the table reads back as NO_VECTOR, which is how virtio tells the driver
    /// the assignment failed.
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.vector_count() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            self.request_reset();
            return;
        }
        let was_active = self.active();
        let newly = status & !self.common.status;
        let mut status = status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.registers.device_features();
            let wanted = self.common.driver_features;
            if wanted & !offered != 0 || wanted & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!(
                    device = %self.id,
                    offered = format_args!("{offered:#x}"),
                    wanted = format_args!("{wanted:#x}"),
                    "driver asked for features the device does not offer, or not VERSION_1"
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        self.common.status = status;
        let active = self.active();
        if newly & STATUS_DRIVER_OK != 0 && active {
            self.activate();
        } else if active != was_active {
            // The driver gave up on the device (FAILED), or took back a NEEDS_RESET.
            lock(&self.engine).set_running(active);
        }
    }

    fn activate(&mut self) {
        let event_idx = self.common.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        lock(&self.engine).start(&self.queues, self.common.driver_features);
        self.register_ioevents();
        tracing::debug!(device = %self.id, features = format_args!("{:#x}", self.common.driver_features), "virtio device activated");
        // Requests the driver queued before DRIVER_OK are looked at now.
        for fd in &self.notifiers {
            let _ = fd.write(1);
        }
    }
}
