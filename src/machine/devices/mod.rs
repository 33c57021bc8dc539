//! Devices emulated in ferry (the irqchip and PIT live in KVM), and the port-I/O and MMIO
//! dispatch that vCPU threads call on every exit.

pub mod disk;
pub mod i8042;
pub mod power;
pub mod serial;
pub mod virtio;

use std::sync::Mutex;

use super::pci::PciRoot;
use power::{GED_EVENT_PORT, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};

pub use disk::{Disk, DiskError};
pub use i8042::{ResetTrigger, I8042};
pub use power::{PowerButton, SleepControl};
pub use serial::{Serial, SerialError, SerialOutput, SerialState};

const SERIAL_PORT_BASE: u16 = 0x3f8;
const SERIAL_PORT_END: u16 = 0x3ff;
const I8042_DATA_PORT: u16 = 0x60;
const I8042_COMMAND_PORT: u16 = 0x64;

/// The devices a vCPU can reach through port I/O and MMIO.
pub struct Devices {
    pub serial: Mutex<Serial>,
    pub i8042: Mutex<I8042>,
    /// ACPI's sleep registers: the guest's power-off.
    pub sleep: SleepControl,
    /// ACPI's power button: `system_powerdown`.
    pub power_button: Mutex<PowerButton>,
    /// `pcie.0`: the host bridge and every PCI function, their config space and BARs.
    pub pci: PciRoot,
    /// The virtio-blk-pci disks, in command-line order (they are also functions on `pci`).
    pub disks: Vec<Disk>,
    /// Held while the disks change state for a migration (drain, hand-over, take-over), so
    /// that a drain cut short by a cancel ends before the disks are given back.
    pub disk_transition: Mutex<()>,
}

impl Devices {
    /// Handles an `in` from the guest.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.pci.pio_read(port, data) {
            return;
        }
        match port {
            SERIAL_PORT_BASE..=SERIAL_PORT_END if data.len() == 1 => {
                data[0] = lock(&self.serial).read((port - SERIAL_PORT_BASE) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                data[0] = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
            }
            SLEEP_CONTROL_PORT if data.len() == 1 => data[0] = self.sleep.read_control(),
            SLEEP_STATUS_PORT if data.len() == 1 => data[0] = self.sleep.read_status(),
            GED_EVENT_PORT if data.len() == 1 => data[0] = lock(&self.power_button).read_events(),
            _ => {
                tracing::trace!(
                    port = format_args!("{port:#x}"),
                    size = data.len(),
                    "unhandled port read"
                );
                data.fill(0xff);
            }
        }
    }

    /// Handles an `out` from the guest.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.pci.pio_write(port, data) {
            return;
        }
        match port {
            SERIAL_PORT_BASE..=SERIAL_PORT_END if data.len() == 1 => {
                lock(&self.serial).write((port - SERIAL_PORT_BASE) as u8, data[0]);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, data[0]);
            }
            SLEEP_CONTROL_PORT if data.len() == 1 => self.sleep.write_control(data[0]),
            // Writing WAK_STS back clears it; it never reads set.
            SLEEP_STATUS_PORT if data.len() == 1 => {}
            GED_EVENT_PORT if data.len() == 1 => lock(&self.power_button).acknowledge(data[0]),
            _ => {
                tracing::trace!(
                    port = format_args!("{port:#x}"),
                    ?data,
                    "unhandled port write"
                );
            }
        }
    }

    /// Handles an MMIO read; where nothing decodes, the bus floats high.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.pci.mmio_read(addr, data) {
            return;
        }
        tracing::trace!(
            addr = format_args!("{addr:#x}"),
            size = data.len(),
            "unhandled MMIO read"
        );
        data.fill(0xff);
    }

    /// Handles an MMIO write; where nothing decodes, it is dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.pci.mmio_write(addr, data) {
            return;
        }
        tracing::trace!(
            addr = format_args!("{addr:#x}"),
            ?data,
            "unhandled MMIO write"
        );
    }
}

impl Devices {
    /// The migration's drain, once the vCPUs are paused: every disk stops taking requests and
    /// completes and flushes what it took.
    pub fn quiesce_disks(&self) -> Result<(), DiskError> {
        let _transition = lock(&self.disk_transition);
        self.disks.iter().try_for_each(Disk::quiesce)
    }

    /// Makes what the disks completed so far durable, without stopping them.
    pub fn flush_disks(&self) -> Result<(), DiskError> {
        self.disks.iter().try_for_each(Disk::flush)
    }

    /// Hands the disks' image locks over, once the destination has every page and the state.
    pub fn release_images(&self) -> Result<(), DiskError> {
        let _transition = lock(&self.disk_transition);
        self.disks.iter().try_for_each(Disk::release_image)
    }

    /// Takes the images' locks and lets the disks take requests: on the destination at the
    /// commit, on the source when a migration did not happen after all. All or nothing: no disk
    /// runs a request unless every image is locked, and a failure leaves no image locked for
    /// writing (the other side may then take them all). A drain still running (a cancel
    /// arrived during it) finishes first.
    pub fn activate_disks(&self) -> Result<(), DiskError> {
        let _transition = lock(&self.disk_transition);
        for (taken, disk) in self.disks.iter().enumerate() {
            if let Err(error) = disk.take_image() {
                for disk in &self.disks[..taken] {
                    if let Err(release) = disk.release_image() {
                        tracing::error!(id = %disk.config.id, %release, "cannot let go of an image");
                    }
                }
                return Err(error);
            }
        }
        self.disks.iter().for_each(Disk::resume);
        Ok(())
    }

    /// Undoes `activate_disks` on a destination that failed after it: the source gets the
    /// images back.
    pub fn deactivate_disks(&self) {
        let _transition = lock(&self.disk_transition);
        let released = self
            .disks
            .iter()
            .try_for_each(Disk::quiesce)
            .and_then(|()| self.disks.iter().try_for_each(Disk::release_image));
        if let Err(error) = released {
            tracing::error!(%error, "cannot hand the disks back");
        }
    }
}

/// Locks a device; a vCPU thread that panicked while holding it leaves the device usable, since
/// every device operation leaves the registers consistent between statements.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
