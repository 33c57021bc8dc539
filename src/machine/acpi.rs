//! The ACPI tables of the q35 machine, built with rust-vmm's `acpi_tables`: how a guest finds
//! the vCPUs and the IOAPIC (MADT), the PCIe root bridge and its ECAM (DSDT, MCFG) and the UART.
//!
//! The FADT declares a hardware-reduced platform, as Cloud Hypervisor and Firecracker do: ferry
//! emulates no PM1 event/control blocks, PM timer or GPEs, so there is no SCI, no FACS, and
//! nothing for the guest to find missing. The guest powers off through the FADT's sleep control
//! register and the DSDT's `\_S5`; `system_powerdown` presses a control-method power button
//! through a Generic Event Device (`devices/power.rs`). Resets keep going through the i8042
//! (the FADT has no reset register, so Linux falls back to the keyboard controller).
//!
//! Everything lives in `layout::ACPI_TABLES_START..ACPI_TABLES_END`, RSDP first (16-byte aligned,
//! inside the 0xE0000..0x100000 range a guest scans when no one hands it the address):
//!
//! ```text
//! RSDP -> XSDT -> FACP -> DSDT
//!              -> APIC (MADT)
//!              -> MCFG
//! ```

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Device, EISAName, Equal, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name,
    Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Scope, Store, IO, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

use super::devices::power::{
    GED_EVENT_PORT, POWER_BUTTON_EVENT, POWER_BUTTON_GSI, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
    SOFT_OFF_SLEEP_TYPE,
};
use super::layout::{
    mmio64_window, ACPI_TABLES_END, ACPI_TABLES_START, IOAPIC_START, LAPIC_START, MMIO32_END,
    MMIO32_START, PCIE_ECAM_SIZE, PCIE_ECAM_START, PCIE_LAST_BUS,
};
use super::memory::{GuestMemory, RamRange};
use super::mptable::MAX_VCPUS;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE_ID: [u8; 8] = *b"FERRYQ35";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2 and up make AML integers 64 bits wide, which the 64-bit window needs.
const DSDT_REVISION: u8 = 2;
/// FADT IA-PC boot architecture flag: an 8042 (or compatible) keyboard controller exists.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// MADT flag: the platform also has dual 8259 PICs (KVM's irqchip emulates them).
const MADT_PCAT_COMPAT: u8 = 1;
/// Offset of the MADT flags in the table, after the header and the LAPIC address.
const MADT_FLAGS_OFFSET: usize = 40;
const TABLE_ALIGN: u64 = 16;

const COM1_PORT: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
const PCI_CONFIG_PORT: u16 = 0xcf8;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables describe at most {MAX_VCPUS} vCPUs, not {0}")]
    TooManyVcpus(u32),
    #[error("the ACPI tables need {needed} bytes, more than the {room} bytes reserved for them")]
    TooLarge { needed: u64, room: u64 },
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(String),
    #[error("cannot mask the legacy PICs: {0}")]
    MaskPics(#[source] kvm_ioctls::Error),
}

/// The tables laid out as they go into guest memory at [`ACPI_TABLES_START`].
#[derive(Debug, Clone)]
pub struct Tables {
    /// Guest-physical address of the RSDP, what the boot protocols pass to the kernel.
    pub rsdp: u64,
    /// The bytes of the whole area, from `ACPI_TABLES_START`.
    pub image: Vec<u8>,
}

/// Builds the tables for `vcpus` vCPUs on a machine with this RAM layout.
pub fn build(vcpus: u32, layout: &[RamRange]) -> Result<Tables, AcpiError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(AcpiError::TooManyVcpus(vcpus));
    }
    let dsdt = dsdt(layout);
    let madt = madt(vcpus);
    let mcfg = to_bytes(&mcfg());

    // The XSDT's size depends only on how many tables it lists, so every address is known
    // before any table that holds one is built.
    let listed = 3;
    let mut placer = Placer::new(ACPI_TABLES_START);
    let rsdp_addr = placer.place(Rsdp::len());
    let xsdt_addr = placer.place(36 + 8 * listed);
    let fadt_addr = placer.place(acpi_tables::fadt::FADT::len());
    let dsdt_addr = placer.place(dsdt.len());
    let madt_addr = placer.place(madt.len());
    let mcfg_addr = placer.place(mcfg.len());
    let end = placer.next;
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_TABLES_START,
            room: ACPI_TABLES_END - ACPI_TABLES_START,
        });
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature buttons: the power button is a control-method device, and there
        // is no sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    let byte_port = |port: u16| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    fadt.sleep_control_reg = byte_port(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = byte_port(SLEEP_STATUS_PORT);
    let fadt = fadt.finalize();
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let mut image = vec![0u8; (end - ACPI_TABLES_START) as usize];
    for (addr, bytes) in [
        (rsdp_addr, to_bytes(&rsdp)),
        (xsdt_addr, to_bytes(&xsdt)),
        (fadt_addr, to_bytes(&fadt)),
        (dsdt_addr, dsdt),
        (madt_addr, madt),
        (mcfg_addr, mcfg),
    ] {
        let at = (addr - ACPI_TABLES_START) as usize;
        image[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(Tables {
        rsdp: rsdp_addr,
        image,
    })
}

/// Writes the tables into guest memory and returns the RSDP's address.
pub fn write(memory: &GuestMemory, vcpus: u32, layout: &[RamRange]) -> Result<u64, AcpiError> {
    let tables = build(vcpus, layout)?;
    memory
        .write_slice(&tables.image, GuestAddress(ACPI_TABLES_START))
        .map_err(|e| AcpiError::Write(e.to_string()))?;
    tracing::debug!(
        rsdp = format_args!("{:#x}", tables.rsdp),
        bytes = tables.image.len(),
        "ACPI tables written"
    );
    Ok(tables.rsdp)
}

/// Masks every line of KVM's two 8259 PICs, as firmware leaves them before it hands over.
///
/// The hardware-reduced FADT tells Linux there are no legacy PICs, so it never programs or masks
/// them, and it keeps LINT0 of the boot vCPU in ExtINT mode as it finds it. KVM's PICs start
/// unmasked with vector base 0 and, through the default GSI routing, see GSIs 0..16 too: the
/// serial port's first interrupt would reach the guest as exception vector 4. Guests that do
/// program the PICs (the MP-table path) unmask what they use.
pub fn mask_legacy_pics(vm: &VmFd) -> Result<(), AcpiError> {
    for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(AcpiError::MaskPics)?;
        chip.chip.pic.imr = 0xff;
        vm.set_irqchip(&chip).map_err(AcpiError::MaskPics)?;
    }
    Ok(())
}

/// Hands out aligned addresses one after the other.
struct Placer {
    next: u64,
}

impl Placer {
    fn new(start: u64) -> Self {
        Self { next: start }
    }

    fn place(&mut self, len: usize) -> u64 {
        let at = self.next.next_multiple_of(TABLE_ALIGN);
        self.next = at + len as u64;
        at
    }
}

/// The notification a power button device gets when pressed (ACPI 6.5, 4.8.3.1.1.2).
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The namespace: the PCIe root bridge, COM1, the motherboard resources that reserve the ECAM
/// (Linux accepts an MCFG region only if firmware reserves it) and the sleep and event registers, the
/// power button and the event device that presses it, and the sleep type of soft-off.
fn dsdt(layout: &[RamRange]) -> Vec<u8> {
    let window64 = mmio64_window(layout);
    let bus_range = AddressSpace::<u16>::new_bus_number(0, u16::from(PCIE_LAST_BUS));
    let config_ports = IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8);
    let io_below = AddressSpace::<u16>::new_io(0, PCI_CONFIG_PORT - 1, None);
    let io_above = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        MMIO32_START as u32,
        (MMIO32_END - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        window64.start,
        window64.end() - 1,
        None,
    );
    let pci_resources = ResourceTemplate::new(vec![
        &bus_range,
        &config_ports,
        &io_below,
        &io_above,
        &mmio32,
        &mmio64,
    ]);
    let pci_hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let pci_cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let pci_seg = Name::new("_SEG".into(), &0u32);
    let pci_bbn = Name::new("_BBN".into(), &0u32);
    let pci_uid = Name::new("_UID".into(), &0u32);
    let pci_crs = Name::new("_CRS".into(), &pci_resources);
    let pci0 = Device::new(
        "PCI0".into(),
        vec![&pci_hid, &pci_cid, &pci_seg, &pci_bbn, &pci_uid, &pci_crs],
    );

    let com1_ports = IO::new(COM1_PORT, COM1_PORT, 0, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_resources = ResourceTemplate::new(vec![&com1_ports, &com1_irq]);
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &1u32);
    let com1_crs = Name::new("_CRS".into(), &com1_resources);
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let ecam = Memory32Fixed::new(true, PCIE_ECAM_START as u32, PCIE_ECAM_SIZE as u32);
    let power_ports = IO::new(SLEEP_CONTROL_PORT, SLEEP_CONTROL_PORT, 1, 3);
    let mres_resources = ResourceTemplate::new(vec![&ecam, &power_ports]);
    let mres_hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let mres_uid = Name::new("_UID".into(), &0u32);
    let mres_crs = Name::new("_CRS".into(), &mres_resources);
    let mres = Device::new("MRES".into(), vec![&mres_hid, &mres_uid, &mres_crs]);

    let pwrb_hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let pwrb_uid = Name::new("_UID".into(), &0u32);
    let pwrb = Device::new("PWRB".into(), vec![&pwrb_hid, &pwrb_uid]);

    // The Generic Event Device: a level interrupt held while a press waits, and _EVT, which
    // reads the event register, acknowledges the press (the line drops) and notifies the button.
    let ged_hid = Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = Name::new("_UID".into(), &0u32);
    let ged_irq = Interrupt::new(true, false, false, false, POWER_BUTTON_GSI);
    let ged_resources = ResourceTemplate::new(vec![&ged_irq]);
    let ged_crs = Name::new("_CRS".into(), &ged_resources);
    let event_port = u32::from(GED_EVENT_PORT);
    let ged_region = OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &event_port, &1u8);
    let ged_field = Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    );
    let events = Path::new("GDAT");
    let read_events = Store::new(&Local(0), &events);
    let pressed_bit = And::new(&ZERO, &Local(0), &POWER_BUTTON_EVENT);
    let pressed = Equal::new(&pressed_bit, &POWER_BUTTON_EVENT);
    let acknowledge = Store::new(&events, &POWER_BUTTON_EVENT);
    let pwrb_path = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&pwrb_path, &NOTIFY_BUTTON_PRESSED);
    let on_press = If::new(&pressed, vec![&acknowledge, &notify]);
    let ged_evt = Method::new("_EVT".into(), 1, true, vec![&read_events, &on_press]);
    let ged = Device::new(
        "GED0".into(),
        vec![
            &ged_hid,
            &ged_uid,
            &ged_crs,
            &ged_region,
            &ged_field,
            &ged_evt,
        ],
    );

    let system_bus = Scope::new("\\_SB_".into(), vec![&pci0, &com1, &mres, &pwrb, &ged]);
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&to_bytes(&system_bus));
    // SLP_TYPa and SLP_TYPb; a hardware-reduced platform uses the first.
    let soft_off = Package::new(vec![&SOFT_OFF_SLEEP_TYPE, &SOFT_OFF_SLEEP_TYPE]);
    dsdt.append_slice(&to_bytes(&Name::new("_S5_".into(), &soft_off)));
    dsdt.as_slice().to_vec()
}

/// One enabled local APIC per vCPU (APIC ID = vCPU index, as `cpu` sets them), the IOAPIC with
/// the ID the MP table gives it, and LINT1 of every CPU wired to NMI.
///
/// ISA IRQs reach the IOAPIC pin of the same number, as KVM's default GSI routing wires them
/// (the in-kernel PIT raises GSI 0, which that routing sends to pin 0), so unlike QEMU, which
/// installs its own routing with the PIT on pin 2, there is no IRQ0 -> GSI2 override; and a
/// hardware-reduced FADT has no SCI to override.
fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            cpu as u8,
            cpu as u8,
            EnabledStatus::Enabled,
        ));
    }
    // The same IOAPIC ID as the MP table: the one after the last vCPU.
    madt.add_structure(IoApic::new(vcpus as u8, IOAPIC_START as u32, 0));
    madt.add_structure(LocalApicNmi::lint1_of_all_cpus());
    let mut bytes = to_bytes(&madt);
    // `acpi_tables` leaves the MADT flags at zero; set PCAT_COMPAT and fix the checksum.
    bytes[MADT_FLAGS_OFFSET] |= MADT_PCAT_COMPAT;
    bytes[9] = bytes[9].wrapping_sub(MADT_PCAT_COMPAT);
    bytes
}

/// MADT Local APIC NMI structure (ACPI 6.5, 5.2.12.7), which `acpi_tables` lacks.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: [u8; 2],
    lint: u8,
}

impl LocalApicNmi {
    fn lint1_of_all_cpus() -> Self {
        Self {
            kind: 4,
            length: 6,
            processor_uid: 0xff,
            // Polarity and trigger mode conform to the bus (edge, active high for NMI).
            flags: [0, 0],
            lint: 1,
        }
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// One ECAM allocation: segment 0, every bus the root bridge decodes.
fn mcfg() -> MCFG {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCIE_ECAM_START, 0, 0, PCIE_LAST_BUS);
    mcfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::memory::ram_layout;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`, its length taken from its header.
    fn table(tables: &Tables, addr: u64) -> &[u8] {
        let at = (addr - ACPI_TABLES_START) as usize;
        let len = u32_at(&tables.image, at + 4) as usize;
        &tables.image[at..at + len]
    }

    /// Every table reachable from the RSDP, by signature, each with a valid checksum.
    fn walk(tables: &Tables) -> Vec<([u8; 4], &[u8])> {
        let at = (tables.rsdp - ACPI_TABLES_START) as usize;
        let rsdp = &tables.image[at..at + 36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        let xsdt = table(tables, u64_at(rsdp, 24));
        let mut found = vec![(*b"XSDT", xsdt)];
        for entry in xsdt[36..].chunks(8) {
            let t = table(tables, u64::from_le_bytes(entry.try_into().unwrap()));
            found.push((t[..4].try_into().unwrap(), t));
            if &t[..4] == b"FACP" {
                let dsdt = table(tables, u64_at(t, 140));
                found.push((*b"DSDT", dsdt));
            }
        }
        for (signature, t) in &found {
            assert_eq!(&t[..4], signature);
            assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(signature));
        }
        found
    }

    fn find<'a>(found: &[([u8; 4], &'a [u8])], signature: &[u8; 4]) -> &'a [u8] {
        found
            .iter()
            .find(|(s, _)| s == signature)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(signature)))
    }

    #[test]
    fn every_table_is_reachable_from_the_rsdp_with_valid_checksums() {
        let tables = build(2, &ram_layout(512 << 20)).unwrap();
        assert_eq!(tables.rsdp, ACPI_TABLES_START);
        assert_eq!(tables.rsdp % 16, 0);
        let found = walk(&tables);
        let signatures: Vec<&[u8; 4]> = found.iter().map(|(s, _)| s).collect();
        assert_eq!(
            signatures,
            [b"XSDT", b"FACP", b"DSDT", b"APIC", b"MCFG"],
            "no table twice, none missing"
        );
        let fadt = find(&found, b"FACP");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        assert_eq!(
            flags & Flags::ResetRegSup as u32,
            0,
            "resets go to the i8042"
        );
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            IAPC_BOOT_ARCH_8042
        );
    }

    /// (local APICs as (uid, APIC ID, flags), IOAPICs as (id, address, GSI base), NMI entries,
    /// other entries)
    type MadtEntries = (Vec<(u8, u8, u32)>, Vec<(u8, u32, u32)>, usize, usize);

    fn madt_entries(madt: &[u8]) -> MadtEntries {
        let (mut lapics, mut ioapics, mut nmis, mut other) = (vec![], vec![], 0, 0);
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            assert!(len >= 2 && at + len <= madt.len(), "entry at {at}");
            match kind {
                0 => lapics.push((madt[at + 2], madt[at + 3], u32_at(madt, at + 4))),
                1 => ioapics.push((madt[at + 2], u32_at(madt, at + 4), u32_at(madt, at + 8))),
                4 => {
                    assert_eq!(&madt[at + 2..at + 6], [0xff, 0, 0, 1], "LINT1 of all CPUs");
                    nmis += 1;
                }
                _ => other += 1,
            }
            at += len;
        }
        (lapics, ioapics, nmis, other)
    }

    /// The IOAPIC ID in the MP table's entries (processor entries are 20 bytes, others 8).
    fn mp_table_ioapic_id(vcpus: u32) -> u8 {
        let mp = crate::machine::mptable::build(vcpus, 0xf0000).unwrap();
        let mut at = 16 + 44;
        while at < mp.len() {
            match mp[at] {
                0 => at += 20,
                2 => return mp[at + 1],
                _ => at += 8,
            }
        }
        panic!("no IOAPIC in the MP table");
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic_the_mp_table_names() {
        for vcpus in [1u32, 4] {
            let tables = build(vcpus, &ram_layout(256 << 20)).unwrap();
            let madt = find(&walk(&tables), b"APIC");
            assert_eq!(u32_at(madt, 36), LAPIC_START as u32);
            assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
            let (lapics, ioapics, nmis, other) = madt_entries(madt);
            let expected: Vec<(u8, u8, u32)> = (0..vcpus as u8).map(|cpu| (cpu, cpu, 1)).collect();
            assert_eq!(lapics, expected, "-smp {vcpus}");
            assert_eq!(ioapics, [(vcpus as u8, IOAPIC_START as u32, 0)]);
            assert_eq!((nmis, other), (1, 0));
            assert_eq!(mp_table_ioapic_id(vcpus), vcpus as u8);
        }
    }

    #[test]
    fn tables_fit_their_area_for_every_vcpu_count() {
        let layout = ram_layout(8 << 30);
        let tables = build(MAX_VCPUS, &layout).unwrap();
        assert!(ACPI_TABLES_START + tables.image.len() as u64 <= ACPI_TABLES_END);
        assert_eq!(walk(&tables).len(), 5);
        assert!(matches!(build(0, &layout), Err(AcpiError::TooManyVcpus(0))));
        assert!(matches!(
            build(MAX_VCPUS + 1, &layout),
            Err(AcpiError::TooManyVcpus(255))
        ));
    }

    #[test]
    fn mcfg_has_one_allocation_for_the_whole_ecam() {
        let tables = build(1, &ram_layout(256 << 20)).unwrap();
        let mcfg = find(&walk(&tables), b"MCFG");
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(mcfg, 44), PCIE_ECAM_START);
        assert_eq!(u16::from_le_bytes([mcfg[52], mcfg[53]]), 0, "segment");
        assert_eq!((mcfg[54], mcfg[55]), (0, PCIE_LAST_BUS));
        // 1 MiB of configuration space per bus.
        assert_eq!((u64::from(PCIE_LAST_BUS) + 1) << 20, PCIE_ECAM_SIZE);
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// The FADT points at the sleep registers, and the DSDT names soft-off's sleep type and
    /// the power button with the event device that presses it.
    #[test]
    fn the_guest_powers_off_through_the_sleep_registers_and_s5_and_has_a_power_button() {
        let tables = build(1, &ram_layout(256 << 20)).unwrap();
        let found = walk(&tables);
        let fadt = find(&found, b"FACP");
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG: byte-wide registers in system I/O space.
        for (offset, port) in [(244, SLEEP_CONTROL_PORT), (256, SLEEP_STATUS_PORT)] {
            let mut gas = vec![1, 8, 0, 1];
            gas.extend_from_slice(&u64::from(port).to_le_bytes());
            assert_eq!(&fadt[offset..offset + 12], gas, "GAS at {offset}");
        }
        let dsdt = find(&found, b"DSDT");
        // Name (_S5, Package (2) { 5, 5 }), at the root of the namespace.
        let s5 = [0x08, b'_', b'S', b'5', b'_', 0x12, 6, 2, 0x0a, 5, 0x0a, 5];
        assert!(contains(dsdt, &s5), "\\_S5");
        // The power button (PNP0C0C) and the event device (ACPI0013) whose interrupt, a level
        // on POWER_BUTTON_GSI, runs _EVT: acknowledge, then Notify (\\_SB.PWRB, 0x80).
        let mut button = vec![0x0c];
        button.extend_from_slice(&0x0c0c_d041u32.to_le_bytes());
        assert!(contains(dsdt, &button), "PNP0C0C");
        assert!(contains(dsdt, b"\x0dACPI0013\x00"), "ACPI0013");
        // Consumer, level, active high, exclusive.
        let irq = [0x89, 6, 0, 0x01, 1, POWER_BUTTON_GSI as u8, 0, 0, 0];
        assert!(contains(dsdt, &irq), "the event device's interrupt");
        assert!(contains(dsdt, b"_EVT"), "_EVT");
        // OperationRegion (GDST, SystemIO, the event port, 1).
        let mut region = vec![0x5b, 0x80, b'G', b'D', b'S', b'T', 1, 0x0b];
        region.extend_from_slice(&GED_EVENT_PORT.to_le_bytes());
        region.push(0x01); // One
        assert!(contains(dsdt, &region), "the event register");
        assert!(
            contains(dsdt, b"\x86\x5c\x2e_SB_PWRB\x0a\x80"),
            "Notify (\\_SB.PWRB, 0x80)"
        );
        let [low, high] = SLEEP_CONTROL_PORT.to_le_bytes();
        assert!(
            contains(dsdt, &[0x47, 1, low, high, low, high, 1, 3]),
            "the sleep and event registers reserved as a motherboard resource"
        );
    }

    /// ACPICA, the AML interpreter Linux itself uses, loads the DSDT, and the event device's
    /// handler, with a press in its register, notifies the power button; `\\_S5` evaluates
    /// (`acpiexec`, from Debian's acpica-tools; under `CI=true` a missing one fails the test).
    #[test]
    fn acpica_loads_the_dsdt_and_runs_the_power_button_handler() {
        let found = std::process::Command::new("acpiexec").arg("-v").output();
        if found.is_err() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "acpiexec is missing; CI=true requires this test to run (apt-get install \
                 acpica-tools)"
            );
            eprintln!("SKIPPED: acpiexec is missing; the DSDT was not run through ACPICA");
            return;
        }
        let tables = build(2, &ram_layout(256 << 20)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsdt.aml");
        std::fs::write(&path, find(&walk(&tables), b"DSDT")).unwrap();
        // acpiexec simulates the I/O port as memory, which its init file writes.
        let pressed = dir.path().join("pressed");
        std::fs::write(&pressed, format!("\\_SB.GED0.GDAT {POWER_BUTTON_EVENT}\n")).unwrap();
        let commands =
            format!("execute \\_SB.GED0._EVT {POWER_BUTTON_GSI}; evaluate \\_S5_; namespace");
        let output = std::process::Command::new("acpiexec")
            .arg("-fi")
            .arg(&pressed)
            .arg("-b")
            .arg(&commands)
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("Notify on [PWRB]") && l.contains("Value 0x80")),
            "_EVT did not notify the button\n{text}"
        );
        assert!(text.contains("Evaluation of \\_S5_ returned"), "{text}");
        for name in ["PCI0", "COM1", "MRES", "PWRB", "GED0", "GDAT"] {
            assert!(
                text.contains(name),
                "{name} missing from the namespace\n{text}"
            );
        }
        for error in ["ACPI Error", "ACPI Exception", "failed with status", "AE_"] {
            assert!(!text.contains(error), "{error}\n{text}");
        }
    }

    /// The DSDT carries the resource descriptors the guest needs, in their encoded form
    /// (ACPI 6.5, 6.4.3 and 6.4.2).
    #[test]
    fn dsdt_describes_root_bridge_uart_and_ecam_reservation() {
        let layout = ram_layout(6 << 30);
        let tables = build(1, &layout).unwrap();
        let dsdt = find(&walk(&tables), b"DSDT");
        assert_eq!(dsdt[8], DSDT_REVISION);
        for name in [b"PCI0", b"COM1", b"MRES", b"_SB_"] {
            assert!(contains(dsdt, name), "{}", String::from_utf8_lossy(name));
        }
        // EISA IDs PNP0A08, PNP0A03, PNP0501, PNP0C02 as DWord constants.
        for id in [0x080a_d041u32, 0x030a_d041, 0x0105_d041, 0x020c_d041] {
            let mut constant = vec![0x0c];
            constant.extend_from_slice(&id.to_le_bytes());
            assert!(contains(dsdt, &constant), "EISA id {id:#x}");
        }
        let mut bus = vec![0x88, 13, 0, 2, 0x0c, 0, 0, 0, 0, 0];
        bus.extend_from_slice(&[PCIE_LAST_BUS, 0, 0, 0, 0, 1]);
        assert!(contains(dsdt, &bus), "WordBusNumber 0..=last bus");
        assert!(contains(dsdt, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        assert!(contains(dsdt, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 0, 8]));
        for (min, max) in [(0u16, 0x0cf7u16), (0x0d00, 0xffff)] {
            let mut io = vec![0x88, 13, 0, 1, 0x0c, 3, 0, 0];
            io.extend_from_slice(&min.to_le_bytes());
            io.extend_from_slice(&max.to_le_bytes());
            assert!(contains(dsdt, &io), "WordIO {min:#x}-{max:#x}");
        }
        let mut mmio32 = vec![0x87, 23, 0, 0, 0x0c, 1, 0, 0, 0, 0];
        mmio32.extend_from_slice(&(MMIO32_START as u32).to_le_bytes());
        mmio32.extend_from_slice(&(MMIO32_END as u32 - 1).to_le_bytes());
        assert!(contains(dsdt, &mmio32), "DWordMemory 32-bit window");
        let window = mmio64_window(&layout);
        let mut mmio64 = vec![0x8a, 43, 0, 0, 0x0c, 3];
        mmio64.extend_from_slice(&0u64.to_le_bytes());
        mmio64.extend_from_slice(&window.start.to_le_bytes());
        mmio64.extend_from_slice(&(window.end() - 1).to_le_bytes());
        assert!(contains(dsdt, &mmio64), "QWordMemory 64-bit window");
        // COM1's IRQ 4: Extended Interrupt, consumer, edge, active high, exclusive.
        assert!(contains(dsdt, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
        let mut ecam = vec![0x86, 9, 0, 1];
        ecam.extend_from_slice(&(PCIE_ECAM_START as u32).to_le_bytes());
        ecam.extend_from_slice(&(PCIE_ECAM_SIZE as u32).to_le_bytes());
        assert!(
            contains(dsdt, &ecam),
            "ECAM reserved as a motherboard resource"
        );
    }
}
