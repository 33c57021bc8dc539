//! Per-vCPU configuration at boot: CPUID with the `-smp` topology, MSRs, FPU, LAPIC LINT pins,
//! and the registers the boot protocol enters the kernel with.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::boot::{self, Entry};
use super::memory::GuestMemory;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub(crate) const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// AMD's hardware configuration register.
pub(crate) const MSR_K7_HWCR: u32 = 0xc001_0015;
/// HWCR.TscFreqSel: the TSC counts at the P0 frequency. Firmware sets it; Linux expects it on
/// family 10h and later with a constant TSC, and logs "[Firmware Bug]: TSC doesn't count with P0
/// frequency!" otherwise.
const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;
const CPUID_CX16_BIT: u32 = 1 << 13;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Quirks of the host's KVM that the guest must be shielded from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostQuirks {
    /// PVM emulates guest ring 0, and its emulator has no `cmpxchg16b`: hide CX16 so Linux does
    /// not use it (see shared/notes/kvm-host.md §5).
    pub hide_cx16: bool,
}

impl HostQuirks {
    pub fn detect() -> Self {
        Self {
            hide_cx16: std::path::Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot set {what} of vCPU {index}: {source}")]
    Kvm {
        what: &'static str,
        index: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the GDT: {0}")]
    Gdt(String),
}

/// The CPUID of one vCPU: the host's supported set with the topology of `-smp` and this vCPU's
/// APIC ID.
pub fn vcpu_cpuid(supported: &CpuId, index: u32, count: u32, quirks: HostQuirks) -> CpuId {
    let mut cpuid = supported.clone();
    let threads_per_core = 1u32;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (index << 24) | (count.min(255) << 16);
                entry.ecx |= CPUID_HYPERVISOR_BIT;
                // HTT: more than one logical processor per package.
                if count > 1 {
                    entry.edx |= 1 << 28;
                }
                if quirks.hide_cx16 {
                    entry.ecx &= !CPUID_CX16_BIT;
                }
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; every cache shared by one thread.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count.min(64) - 1) << 26);
                entry.eax &= !(0xfff << 14);
            }
            0xb | 0x1f => {
                // x2APIC topology: level 0 = SMT (1 thread), level 1 = core (all vCPUs).
                let level = entry.index;
                entry.edx = index;
                match level {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = threads_per_core;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = 32 - (count - 1).leading_zeros().min(32);
                        entry.ebx = count;
                        entry.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = level;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 in ECX[7:0].
                entry.ecx = (entry.ecx & !0xff) | (count.min(256) - 1);
            }
            _ => {}
        }
    }
    cpuid
}

/// Whether the CPUID says AMD (or Hygon, AMD's licensee): the vendor of leaf 0.
fn is_amd(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .find(|entry| entry.function == 0)
        .is_some_and(|leaf| {
            let vendor = [leaf.ebx, leaf.edx, leaf.ecx]
                .map(u32::to_le_bytes)
                .concat();
            vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
        })
}

/// The first MSR a [`set_msrs`] could not write; KVM wrote none of those after it either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedMsr {
    pub index: u32,
    /// How many of the entries went in.
    pub written: usize,
}

/// Writes `entries` in order. HWCR.TscFreqSel is ferry's to set, not the guest's (the guest
/// reads it once, at boot), and a KVM before Linux 6.7 refuses it: HWCR then goes in without
/// it, and the rest after it. Any other MSR KVM refuses ends the writing, and is returned.
pub fn set_msrs(
    vcpu: &VcpuFd,
    entries: &[kvm_msr_entry],
) -> Result<Option<RefusedMsr>, kvm_ioctls::Error> {
    let mut rest = entries.to_vec();
    while !rest.is_empty() {
        // Fails only on more entries than one KVM_SET_MSRS takes.
        let msrs = Msrs::from_entries(&rest).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let written = vcpu.set_msrs(&msrs)?;
        let done = entries.len() - rest.len() + written;
        let Some(refused) = rest.get_mut(written) else {
            return Ok(None);
        };
        if refused.index != MSR_K7_HWCR || refused.data & HWCR_TSC_FREQ_SEL == 0 {
            return Ok(Some(RefusedMsr {
                index: refused.index,
                written: done,
            }));
        }
        // Once per process: every vCPU, at boot and at each restore, meets the same refusal.
        static TOLD: std::sync::Once = std::sync::Once::new();
        TOLD.call_once(|| {
            tracing::info!(
                "this KVM refuses HWCR.TscFreqSel (it takes it from Linux 6.7 on): written \
                 without; a Linux guest booted here logs a firmware bug about its TSC, which is \
                 harmless"
            )
        });
        refused.data &= !HWCR_TSC_FREQ_SEL;
        rest.drain(..written);
    }
    Ok(None)
}

/// Sets everything every vCPU needs, whether it boots the kernel or waits for a SIPI.
pub fn configure_vcpu(vcpu: &VcpuFd, index: u32, cpuid: &CpuId) -> Result<(), CpuError> {
    let kvm = |what| {
        move |source| CpuError::Kvm {
            what,
            index,
            source,
        }
    };
    vcpu.set_cpuid2(cpuid).map_err(kvm("CPUID"))?;
    // AMD firmware sets HWCR.TscFreqSel.
    let tsc_freq_sel = is_amd(cpuid).then_some((MSR_K7_HWCR, HWCR_TSC_FREQ_SEL));
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
    .into_iter()
    .chain(tsc_freq_sel)
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    if let Some(refused) = set_msrs(vcpu, &entries).map_err(kvm("boot MSRs"))? {
        // The guest finds the rest as KVM left them.
        tracing::warn!(
            vcpu = index,
            msr = format_args!("{:#x}", refused.index),
            "KVM refused a boot MSR and those after it"
        );
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU"))?;
    // LINT0 takes the legacy PIC's interrupts, LINT1 NMIs: what firmware leaves for an OS.
    let mut lapic = vcpu.get_lapic().map_err(kvm("LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("LAPIC"))?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let value = (lapic_reg(regs, offset) & !0x700) | (mode << 8);
    set_lapic_reg(regs, offset, value);
}

/// The 32-bit LAPIC register at `offset` of KVM's register page.
pub(crate) fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| regs[offset + i] as u8))
}

pub(crate) fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (reg, byte) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *reg = byte as std::os::raw::c_char;
    }
}

/// A GDT entry from its flags, base and limit (in the packed descriptor format).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The `kvm_segment` a descriptor loads into a segment register.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Puts the boot vCPU at the kernel's entry in the mode its boot protocol requires.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, memory: &GuestMemory, entry: Entry) -> Result<(), CpuError> {
    let kvm = |what| {
        move |source| CpuError::Kvm {
            what,
            index: 0,
            source,
        }
    };
    let gdt: [u64; 4] = match entry {
        Entry::Linux64 { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        Entry::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x008b, 0, 0x67),    // TSS
        ],
    };
    for (index, descriptor) in gdt.iter().enumerate() {
        memory
            .write_obj(
                *descriptor,
                GuestAddress(boot::GDT_START + index as u64 * 8),
            )
            .map_err(|e| CpuError::Gdt(e.to_string()))?;
    }
    memory
        .write_obj(0u64, GuestAddress(boot::IDT_START))
        .map_err(|e| CpuError::Gdt(e.to_string()))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = boot::GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = boot::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Linux64 { entry } => {
            boot::write_identity_page_tables(memory).map_err(|e| CpuError::Gdt(e.to_string()))?;
            sregs.cr3 = boot::PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = boot::BOOT_STACK_TOP;
            regs.rbp = boot::BOOT_STACK_TOP;
            regs.rsi = boot::ZERO_PAGE;
        }
        Entry::Pvh { entry } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = boot::PVH_START_INFO;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;
    vcpu.set_regs(&regs).map_err(kvm("registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vendor_leaf(vendor: &[u8; 12]) -> CpuId {
        let word = |at: usize| u32::from_le_bytes(vendor[at..at + 4].try_into().unwrap());
        let leaf = kvm_bindings::kvm_cpuid_entry2 {
            function: 0,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..Default::default()
        };
        CpuId::from_entries(&[leaf]).unwrap()
    }

    #[test]
    fn amd_and_hygon_are_amd_intel_is_not() {
        assert!(is_amd(&vendor_leaf(b"AuthenticAMD")));
        assert!(is_amd(&vendor_leaf(b"HygonGenuine")));
        assert!(!is_amd(&vendor_leaf(b"GenuineIntel")));
        assert!(!is_amd(&CpuId::new(0).unwrap()));
    }

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.g),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(
            (code.present, code.s, code.dpl, code.limit),
            (1, 1, 0, 0xffff_ffff)
        );
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.type_, data.db, data.l), (16, 3, 1, 0));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0x1000, 0x67), 3);
        assert_eq!((tss.base, tss.limit, tss.g, tss.s), (0x1000, 0x67, 0, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    fn entry(function: u32, index: u32) -> kvm_bindings::kvm_cpuid_entry2 {
        kvm_bindings::kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_carries_the_smp_topology_and_apic_id() {
        let supported = CpuId::from_entries(&[
            kvm_bindings::kvm_cpuid_entry2 {
                ecx: CPUID_CX16_BIT,
                ebx: 0x0000_0800,
                ..entry(1, 0)
            },
            entry(4, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        let cpuid = vcpu_cpuid(&supported, 2, 4, HostQuirks { hide_cx16: true });
        let find = |f, i| {
            *cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        let leaf1 = find(1, 0);
        assert_eq!(leaf1.ebx >> 24, 2, "initial APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "other EBX fields kept");
        assert_ne!(leaf1.ecx & CPUID_HYPERVISOR_BIT, 0);
        assert_eq!(leaf1.ecx & CPUID_CX16_BIT, 0, "CX16 hidden on PVM");
        assert_ne!(leaf1.edx & (1 << 28), 0, "HTT with more than one vCPU");
        assert_eq!(find(4, 0).eax >> 26, 3, "cores per package - 1");
        let smt = find(0xb, 0);
        assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, 1, 2));
        let core = find(0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 2));
        assert_eq!(find(0x8000_0008, 0).ecx & 0xff, 3);
        let kept = vcpu_cpuid(&supported, 0, 1, HostQuirks::default());
        let leaf1 = *kept.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_ne!(leaf1.ecx & CPUID_CX16_BIT, 0, "CX16 kept elsewhere");
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 0x400];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01; // masked
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
