//! The q35 guest-physical address map outside RAM (RAM itself is laid out in `memory`).
//!
//! | range                          | what                                           |
//! |--------------------------------|------------------------------------------------|
//! | 0xE0000..0xF0000               | ACPI tables (RSDP first, where the BIOS search finds it) |
//! | 0xF0000..0x100000              | MP table                                       |
//! | 0xB000_0000..0xC000_0000       | PCIe ECAM (MMCONFIG), buses 0..=255            |
//! | 0xC000_0000..0xFEC0_0000       | 32-bit PCI MMIO window (BARs)                  |
//! | 0xFEC0_0000                    | IOAPIC                                         |
//! | 0xFEE0_0000                    | LAPIC                                          |
//! | above RAM, 1 GiB aligned       | 64-bit PCI MMIO window (64 GiB)                |
//!
//! As in QEMU and StratoVirt, the ECAM sits at the start of the hole of a small guest, so RAM
//! below 4 GiB ends where it starts.

use super::memory::{RamRange, HIGH_RAM_START};

/// Where the ACPI tables go; the RSDP is first, inside the range Linux scans for it.
pub const ACPI_TABLES_START: u64 = 0xE_0000;
pub const ACPI_TABLES_END: u64 = 0xF_0000;

/// The PCIe enhanced configuration access mechanism: 1 MiB per bus, 32 devices of 8 functions
/// of 4 KiB each.
pub const PCIE_ECAM_START: u64 = 0xB000_0000;
pub const PCIE_ECAM_SIZE: u64 = 0x1000_0000;
/// The last bus number the ECAM (and the root bridge) covers.
pub const PCIE_LAST_BUS: u8 = 0xff;

/// BARs that must stay below 4 GiB (32-bit memory BARs, such as an MSI-X table).
pub const MMIO32_START: u64 = 0xC000_0000;
pub const MMIO32_END: u64 = IOAPIC_START;

pub const IOAPIC_START: u64 = 0xFEC0_0000;
pub const LAPIC_START: u64 = 0xFEE0_0000;

const MMIO64_ALIGN: u64 = 1 << 30;
const MMIO64_SIZE: u64 = 64 << 30;

/// The 64-bit PCI MMIO window: from the first 1 GiB boundary above RAM (and above 4 GiB), for
/// 64 GiB. Returned as a RAM-like range.
pub fn mmio64_window(layout: &[RamRange]) -> RamRange {
    let ram_end = layout.iter().map(RamRange::end).max().unwrap_or(0);
    let start = ram_end.max(HIGH_RAM_START).next_multiple_of(MMIO64_ALIGN);
    RamRange {
        start,
        size: MMIO64_SIZE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::memory::ram_layout;

    #[test]
    fn windows_do_not_overlap_ram() {
        for mem in [256 << 20, 0xB000_0000, 4 << 30, (5 << 30) + 4096] {
            let layout = ram_layout(mem);
            let window = mmio64_window(&layout);
            for ram in &layout {
                assert!(ram.end() <= PCIE_ECAM_START || ram.start >= HIGH_RAM_START);
                assert!(ram.end() <= window.start, "{mem:#x}");
            }
            assert_eq!(window.start % MMIO64_ALIGN, 0);
        }
        assert_eq!(PCIE_ECAM_START + PCIE_ECAM_SIZE, MMIO32_START);
    }
}
