//! A PCI function's configuration space: the type-0 header, BARs that answer the sizing
//! handshake, and a capability list, with a per-byte mask of what the guest may change.

use serde::{Deserialize, Serialize};

/// PCIe functions have 4 KiB of configuration space; the first 256 bytes are PCI's.
pub const CONFIG_SPACE_SIZE: usize = 4096;
pub const BAR_COUNT: usize = 6;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const FIRST_CAPABILITY: usize = 0x40;
const PCI_CONFIG_END: usize = 0x100;

const STATUS_CAPABILITIES: u16 = 1 << 4;
const HEADER_MULTIFUNCTION: u8 = 0x80;
/// I/O space, memory space, bus master, SERR#, parity and INTx-disable: what a driver may set.
const COMMAND_WRITABLE: u16 = 0x0547;
pub const COMMAND_MEMORY: u16 = 1 << 1;

const BAR_MEM64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;

/// What identifies a function to the guest's drivers.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass and programming interface.
    pub class: u32,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// How a memory BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Mem32,
    /// Takes two BAR slots; prefetchable as virtio's are.
    Mem64Prefetchable,
}

/// One BAR as the function declares it; its address lives in the config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    pub index: usize,
    pub kind: BarKind,
    /// A power of two, at least 4 KiB so that a BAR never shares a page with another.
    pub size: u64,
}

/// The configuration space of one function.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: Vec<Bar>,
    last_capability: Option<usize>,
    next_capability: usize,
}

impl ConfigSpace {
    pub fn new(ids: PciIds) -> Self {
        let mut space = Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: Vec::new(),
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        space.put(VENDOR_ID, &ids.vendor.to_le_bytes());
        space.put(DEVICE_ID, &ids.device.to_le_bytes());
        space.put(REVISION, &[ids.revision]);
        space.put(CLASS_CODE, &ids.class.to_le_bytes()[..3]);
        space.put(SUBSYSTEM_VENDOR_ID, &ids.subsystem_vendor.to_le_bytes());
        space.put(SUBSYSTEM_ID, &ids.subsystem.to_le_bytes());
        space.allow(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        // Firmware and drivers keep their IRQ bookkeeping in the interrupt line register.
        space.allow(INTERRUPT_LINE, &[0xff]);
        space
    }

    /// Marks the function as one of several in its slot (function 0 must say so).
    pub fn set_multifunction(&mut self, multifunction: bool) {
        let header = if multifunction {
            HEADER_MULTIFUNCTION
        } else {
            0
        };
        self.put(HEADER_TYPE, &[header]);
    }

    /// Declares a BAR at `address`, which the caller allocated.
    pub fn add_bar(&mut self, bar: Bar, address: u64) {
        assert!(bar.size.is_power_of_two() && bar.size >= 4096, "{bar:?}");
        assert_eq!(address % bar.size, 0, "{bar:?} at {address:#x}");
        let offset = BAR0 + bar.index * 4;
        let mask = !(bar.size - 1);
        match bar.kind {
            BarKind::Mem32 => {
                self.put(offset, &(address as u32).to_le_bytes());
                self.allow(offset, &(mask as u32).to_le_bytes());
            }
            BarKind::Mem64Prefetchable => {
                let low = (address as u32) | BAR_MEM64 | BAR_PREFETCHABLE;
                self.put(offset, &low.to_le_bytes());
                self.put(offset + 4, &((address >> 32) as u32).to_le_bytes());
                self.allow(offset, &((mask as u32) & !0xf).to_le_bytes());
                self.allow(offset + 4, &((mask >> 32) as u32).to_le_bytes());
            }
        }
        self.bars.push(bar);
    }

    /// Appends a capability (its body starts after the id and next-pointer bytes) and returns
    /// its offset. `writable` is the guest-writable mask for the body.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let offset = self.next_capability;
        let length = 2 + body.len();
        assert!(offset + length <= PCI_CONFIG_END, "capabilities overflow");
        self.put(offset, &[id, 0]);
        self.put(offset + 2, body);
        self.allow(offset + 2, writable);
        match self.last_capability {
            Some(last) => self.put(last + 1, &[offset as u8]),
            None => {
                self.put(CAPABILITIES_POINTER, &[offset as u8]);
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
                self.put(STATUS, &status.to_le_bytes());
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + length).next_multiple_of(4);
        offset
    }

    /// A guest read; beyond the space reads as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A guest write: only bits the mask allows change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let at = offset + i;
            if at < CONFIG_SPACE_SIZE {
                let mask = self.writable[at];
                self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
            }
        }
    }

    /// Sets bytes regardless of the mask (the device model's own registers).
    pub fn put(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    fn allow(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut word = [0; 4];
        word.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(word)
    }

    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// Where a BAR decodes now, if memory decoding is on; a BAR being sized (all ones written)
    /// decodes nowhere.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        if self.read_u16(COMMAND) & COMMAND_MEMORY == 0 {
            return None;
        }
        let bar = self.bars.iter().find(|bar| bar.index == index)?;
        let offset = BAR0 + index * 4;
        let low = u64::from(self.read_u32(offset) & !0xf);
        let address = match bar.kind {
            BarKind::Mem32 => low,
            BarKind::Mem64Prefetchable => low | (u64::from(self.read_u32(offset + 4)) << 32),
        };
        let all_ones = !(bar.size - 1)
            & match bar.kind {
                BarKind::Mem32 => 0xffff_ffff,
                BarKind::Mem64Prefetchable => u64::MAX,
            };
        (address != 0 && address != all_ones).then_some(address)
    }

    /// The guest-visible bytes, for migration.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Whether a snapshot fits this function: it has the config space's size, and its read-only
    /// bytes are this function's. A snapshot whose read-only bytes differ comes from another
    /// device (the two ends were built from different configurations).
    pub fn check(&self, bytes: &[u8]) -> Result<(), ConfigSpaceError> {
        if bytes.len() != CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::Size(bytes.len()));
        }
        for (at, (&saved, &mine)) in bytes.iter().zip(self.bytes.iter()).enumerate() {
            let fixed = !self.writable[at];
            if saved & fixed != mine & fixed && !self.is_device_register(at) {
                return Err(ConfigSpaceError::ReadOnlyByte { at, saved, mine });
            }
        }
        Ok(())
    }

    /// Puts back a snapshot that passes [`ConfigSpace::check`].
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), ConfigSpaceError> {
        self.check(bytes)?;
        self.bytes.copy_from_slice(bytes);
        Ok(())
    }

    /// Registers the device model itself updates (inside capabilities), which may differ.
    fn is_device_register(&self, at: usize) -> bool {
        (FIRST_CAPABILITY..PCI_CONFIG_END).contains(&at)
    }
}

/// Why a migrated configuration space does not fit the function it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum ConfigSpaceError {
    #[error("config space of {0} bytes, expected {CONFIG_SPACE_SIZE}")]
    Size(usize),
    #[error(
        "read-only config byte {at:#x} is {saved:#04x} on the source and {mine:#04x} here; \
         the two ends emulate different devices (compare their ferry versions and -device options)"
    )]
    ReadOnlyByte { at: usize, saved: u8, mine: u8 },
}

/// A virtio-blk function's identity, for tests.
#[cfg(test)]
pub(crate) const VIRTIO_BLK_IDS: PciIds = PciIds {
    vendor: 0x1af4,
    device: 0x1042,
    class: 0x01_0000,
    revision: 1,
    subsystem_vendor: 0x1af4,
    subsystem: 2,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_answer_sizing_and_move() {
        let mut space = ConfigSpace::new(VIRTIO_BLK_IDS);
        space.add_bar(
            Bar {
                index: 1,
                kind: BarKind::Mem32,
                size: 0x1000,
            },
            0xc000_0000,
        );
        space.add_bar(
            Bar {
                index: 4,
                kind: BarKind::Mem64Prefetchable,
                size: 0x4000,
            },
            0x1_0000_0000,
        );
        assert_eq!(space.bar_address(1), None, "decoding is off until enabled");
        space.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(space.bar_address(1), Some(0xc000_0000));
        assert_eq!(space.bar_address(4), Some(0x1_0000_0000));

        space.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(space.read_u32(BAR0 + 4), 0xffff_f000);
        assert_eq!(space.bar_address(1), None);
        space.write(BAR0 + 16, &[0xff; 4]);
        space.write(BAR0 + 20, &[0xff; 4]);
        assert_eq!(space.read_u32(BAR0 + 16), 0xffff_c00c);
        assert_eq!(space.read_u32(BAR0 + 20), 0xffff_ffff);

        space.write(BAR0 + 4, &0xd000_0000u32.to_le_bytes());
        space.write(BAR0 + 16, &0x2000_0000u32.to_le_bytes());
        space.write(BAR0 + 20, &2u32.to_le_bytes());
        assert_eq!(space.bar_address(1), Some(0xd000_0000));
        assert_eq!(space.bar_address(4), Some(0x2_2000_0000));
    }

    #[test]
    fn identity_is_read_only_and_capabilities_chain() {
        let mut space = ConfigSpace::new(VIRTIO_BLK_IDS);
        space.write(VENDOR_ID, &[0; 4]);
        assert_eq!(space.read_u16(VENDOR_ID), 0x1af4);
        let first = space.add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0; 10]);
        let second = space.add_capability(0x09, &[0; 14], &[0; 14]);
        assert_eq!(first, FIRST_CAPABILITY);
        assert_eq!(usize::from(space.bytes[CAPABILITIES_POINTER]), first);
        assert_eq!(usize::from(space.bytes[first + 1]), second);
        assert_eq!(space.bytes[second + 1], 0);
        assert_ne!(space.read_u16(STATUS) & STATUS_CAPABILITIES, 0);
    }

    #[test]
    fn restore_refuses_a_different_device() {
        let mut source = ConfigSpace::new(VIRTIO_BLK_IDS);
        source.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        let mut same = ConfigSpace::new(VIRTIO_BLK_IDS);
        same.restore(&source.snapshot()).unwrap();
        assert_eq!(same.read_u16(COMMAND), COMMAND_MEMORY);
        let mut other = ConfigSpace::new(PciIds {
            device: 0x1041,
            ..VIRTIO_BLK_IDS
        });
        let error = other.restore(&source.snapshot()).unwrap_err();
        assert!(
            matches!(error, ConfigSpaceError::ReadOnlyByte { at: DEVICE_ID, .. }),
            "{error}"
        );
    }
}
