//! The Intel MultiProcessor table (spec 1.4), which tells a guest how many vCPUs there are,
//! where the IOAPIC is, and how ISA interrupts reach it. Linux and the built-in guest both scan
//! the BIOS area (0xf0000..0x100000) for its floating pointer.

use vm_memory::{Bytes, GuestAddress};

use super::memory::GuestMemory;

pub const IOAPIC_ADDR: u32 = super::layout::IOAPIC_START as u32;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// APIC IDs are eight bits and the IOAPIC takes the one after the last vCPU.
pub const MAX_VCPUS: u32 = 254;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("the MP table describes at most {MAX_VCPUS} vCPUs, not {0}")]
    TooManyVcpus(u32),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(String),
}

/// The bytes of the floating pointer and the configuration table, for a table placed at `addr`.
pub fn build(vcpus: u32, addr: u32) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus as u8;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC) as firmware reports them.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // ISA IRQ n on IOAPIC pin n, as KVM's default GSI routing wires them.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let floating_len = 16u32;
    let header_len = 44usize;
    let mut table = Vec::with_capacity(16 + header_len + entries.len());
    // Floating pointer: signature, table address, length in 16-byte units, spec 1.4.
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(addr + floating_len).to_le_bytes());
    table.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table[..16]);
    // Configuration table header.
    let config_start = table.len();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((header_len + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[4, 0]);
    table.extend_from_slice(b"FERRY   ");
    table.extend_from_slice(b"Q35 VM      ");
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]);
    table.extend_from_slice(&entries);
    table[config_start + 7] = checksum(&table[config_start..]);
    Ok(table)
}

/// Writes the MP table for `vcpus` vCPUs at `addr`.
pub fn write(memory: &GuestMemory, vcpus: u32, addr: u64) -> Result<(), MpTableError> {
    let table = build(vcpus, addr as u32)?;
    memory
        .write_slice(&table, GuestAddress(addr))
        .map_err(|e| MpTableError::Write(e.to_string()))
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn table_lists_every_vcpu_with_valid_checksums() {
        let table = build(3, 0xf0000).unwrap();
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0);
        let config = &table[16..];
        assert_eq!(&config[..4], b"PCMP");
        let length = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(length, config.len());
        assert_eq!(sum(config), 0);
        let pointer = u32::from_le_bytes(table[4..8].try_into().unwrap());
        assert_eq!(pointer, 0xf0010);
        // Walk the entries: processors first, BSP flagged.
        let mut at = 44;
        let mut cpus = Vec::new();
        let mut ioapic = None;
        while at < config.len() {
            match config[at] {
                ENTRY_PROCESSOR => {
                    cpus.push((config[at + 1], config[at + 3]));
                    at += 20;
                }
                ENTRY_IOAPIC => {
                    ioapic = Some(config[at + 1]);
                    at += 8;
                }
                _ => at += 8,
            }
        }
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
        assert_eq!(ioapic, Some(3));
        let count = u16::from_le_bytes([config[34], config[35]]);
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
    }

    #[test]
    fn vcpu_limit() {
        assert!(build(MAX_VCPUS, 0xf0000).is_ok());
        assert!(matches!(
            build(MAX_VCPUS + 1, 0xf0000),
            Err(MpTableError::TooManyVcpus(255))
        ));
    }
}
