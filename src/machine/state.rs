//! The state KVM holds for the VM and its vCPUs, saved and restored through
//! [`Migratable`].
//!
//! Orders follow what was measured on this host (shared/notes/kvm-host.md §4): a vCPU is saved
//! with its events last, and restored CPUID first, LAPIC after the special registers (APIC base)
//! and MSRs after the LAPIC (TSC deadline), events last; VM-wide state is restored before the
//! vCPUs.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::machine::cpu::{set_msrs, MSR_K7_HWCR};
use crate::machine::devices::{Serial, SerialError, SerialState, I8042};
use crate::migrate::phases::Phases;
use crate::migrate::state::{FeatureWord, Migratable, StateError};

mod timers;

/// MSRs that KVM saves and restores but leaves out of its index list (measured on this host):
/// the MTRRs, TSC_AUX, SPEC_CTRL, and AMD's HWCR (whose TscFreqSel ferry sets; KVM emulates HWCR
/// in its common x86 code, so an Intel host reads it as 0).
const MSRS_MISSING_FROM_INDEX_LIST: &[u32] = &[
    0x48, // SPEC_CTRL
    0x250,
    0x258,
    0x259, // fixed-range MTRRs
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
    0x277,       // more fixed MTRRs, PAT
    0x2ff,       // MTRR default type
    0xc000_0103, // TSC_AUX
    MSR_K7_HWCR,
];
/// The variable-range MTRR pairs (base, mask) at 0x200..0x210.
const VARIABLE_MTRR_MSRS: std::ops::Range<u32> = 0x200..0x210;

/// The MSRs to migrate: KVM's index list plus those it leaves out.
pub fn migratable_msrs(kvm: &Kvm) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let mut list: Vec<u32> = kvm.get_msr_index_list()?.as_slice().to_vec();
    list.extend(MSRS_MISSING_FROM_INDEX_LIST);
    list.extend(VARIABLE_MTRR_MSRS);
    list.sort_unstable();
    list.dedup();
    Ok(list)
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Box<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// A paused vCPU, seen from its own thread.
pub struct KvmVcpu<'a> {
    pub fd: &'a VcpuFd,
    pub msr_list: &'a [u32],
    /// The CPUID this side configured the vCPU with (`Machine::cpuids`).
    pub cpuid: &'a CpuId,
}

/// A CPUID received in a vCPU's state, as KVM takes it.
pub fn received_cpuid(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, StateError> {
    CpuId::from_entries(entries).map_err(|e| StateError::Restore {
        what: "vCPU CPUID".into(),
        reason: format!("{e:?}"),
    })
}

fn save_error(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Save {
        what: what.into(),
        reason: e.to_string(),
    }
}

fn restore_error(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Restore {
        what: what.into(),
        reason: e.to_string(),
    }
}

impl KvmVcpu<'_> {
    /// Reads every MSR of the list that this KVM can read; one it can't is skipped (and logged),
    /// since `KVM_GET_MSRS` stops at the first failure.
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, StateError> {
        let mut saved = Vec::with_capacity(self.msr_list.len());
        let mut rest = self.msr_list;
        while !rest.is_empty() {
            let chunk: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|index| kvm_msr_entry {
                    index: *index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&chunk).map_err(|e| StateError::Save {
                what: "vCPU MSRs".into(),
                reason: format!("{e:?}"),
            })?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(save_error("vCPU MSRs"))?;
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            if read < rest.len() {
                tracing::debug!(
                    msr = format_args!("{:#x}", rest[read]),
                    "MSR not readable; skipped"
                );
                rest = &rest[read + 1..];
            } else {
                rest = &[];
            }
        }
        Ok(saved)
    }
}

impl Migratable for KvmVcpu<'_> {
    const KIND: &'static str = "kvm-vcpu";
    const VERSION: u32 = 1;
    type State = VcpuState;

    fn save_state(&self) -> Result<VcpuState, StateError> {
        let fd = self.fd;
        let mut phases = Phases::start();
        let mp_state = fd.get_mp_state().map_err(save_error("vCPU MP state"))?;
        phases.mark("mp_state");
        let regs = fd.get_regs().map_err(save_error("vCPU registers"))?;
        phases.mark("regs");
        let sregs = fd
            .get_sregs()
            .map_err(save_error("vCPU special registers"))?;
        phases.mark("sregs");
        let xsave = Box::new(fd.get_xsave().map_err(save_error("vCPU XSAVE area"))?);
        phases.mark("xsave");
        let xcrs = fd.get_xcrs().map_err(save_error("vCPU XCRs"))?;
        phases.mark("xcrs");
        let debugregs = fd
            .get_debug_regs()
            .map_err(save_error("vCPU debug registers"))?;
        phases.mark("debugregs");
        let lapic = fd.get_lapic().map_err(save_error("vCPU LAPIC"))?;
        phases.mark("lapic");
        let msrs = self.read_msrs()?;
        phases.mark("msrs");
        let events = fd.get_vcpu_events().map_err(save_error("vCPU events"))?;
        phases.mark("events");
        tracing::debug!(%phases, "vCPU state saved (µs)");
        Ok(VcpuState {
            cpuid: self.cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
        })
    }

    fn restore_state(&mut self, state: VcpuState) -> Result<(), StateError> {
        let fd = self.fd;
        let mut phases = Phases::start();
        // This side built its vCPUs from the same configuration on a host the configuration
        // check found to offer the source's CPU features, so their CPUID is usually the source's
        // already; setting it again costs about 65 µs per vCPU here, inside the downtime.
        if self.cpuid.as_slice() != state.cpuid.as_slice() {
            let cpuid = received_cpuid(&state.cpuid)?;
            fd.set_cpuid2(&cpuid).map_err(restore_error("vCPU CPUID"))?;
        }
        phases.mark("cpuid");
        fd.set_mp_state(state.mp_state)
            .map_err(restore_error("vCPU MP state"))?;
        phases.mark("mp_state");
        fd.set_regs(&state.regs)
            .map_err(restore_error("vCPU registers"))?;
        phases.mark("regs");
        fd.set_sregs(&state.sregs)
            .map_err(restore_error("vCPU special registers"))?;
        phases.mark("sregs");
        // SAFETY: the XSAVE area is a full 4 KiB `kvm_xsave`, the size KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(restore_error("vCPU XSAVE area"))?;
        phases.mark("xsave");
        fd.set_xcrs(&state.xcrs)
            .map_err(restore_error("vCPU XCRs"))?;
        phases.mark("xcrs");
        fd.set_debug_regs(&state.debugregs)
            .map_err(restore_error("vCPU debug registers"))?;
        phases.mark("debugregs");
        fd.set_lapic(&state.lapic)
            .map_err(restore_error("vCPU LAPIC"))?;
        phases.mark("lapic");
        let refused = set_msrs(fd, &state.msrs).map_err(restore_error("vCPU MSRs"))?;
        if let Some(refused) = refused {
            return Err(StateError::Restore {
                what: "vCPU MSRs".into(),
                reason: format!(
                    "KVM refused MSR {:#x} ({} of {} written)",
                    refused.index,
                    refused.written,
                    state.msrs.len()
                ),
            });
        }
        phases.mark("msrs");
        fd.set_vcpu_events(&state.events)
            .map_err(restore_error("vCPU events"))?;
        phases.mark("events");
        tracing::debug!(%phases, "vCPU state restored (µs)");
        Ok(())
    }
}

/// The VM-wide state in KVM: both PICs, the IOAPIC, the PIT and the clock.
#[derive(Serialize, Deserialize)]
pub struct VmChipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmChipState {
    /// Whether each interrupt controller sits where KVM expects it, touching nothing.
    pub fn check(&self) -> Result<(), StateError> {
        for (chip, id) in self.irqchips() {
            if chip.chip_id != id {
                return Err(StateError::Restore {
                    what: "irqchip".into(),
                    reason: format!("chip {} where chip {id} was expected", chip.chip_id),
                });
            }
        }
        Ok(())
    }

    fn irqchips(&self) -> [(&kvm_irqchip, u32); 3] {
        [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ]
    }
}

/// The VM's in-kernel chips.
pub struct KvmVm<'a>(pub &'a VmFd);

impl Migratable for KvmVm<'_> {
    const KIND: &'static str = "kvm-vm";
    const VERSION: u32 = 1;
    type State = VmChipState;

    fn save_state(&self) -> Result<VmChipState, StateError> {
        let chip = |id| {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.0
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(save_error("irqchip"))
        };
        let mut clock = self.0.get_clock().map_err(save_error("KVM clock"))?;
        // The flags describe this host's clock; the destination must not be told them.
        clock.flags = 0;
        Ok(VmChipState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.0.get_pit2().map_err(save_error("PIT"))?,
            clock,
        })
    }

    fn restore_state(&mut self, state: VmChipState) -> Result<(), StateError> {
        state.check()?;
        let vm = self.0;
        vm.set_pit2(&state.pit).map_err(restore_error("PIT"))?;
        vm.set_clock(&state.clock)
            .map_err(restore_error("KVM clock"))?;
        for (chip, _) in state.irqchips() {
            vm.set_irqchip(chip).map_err(restore_error("irqchip"))?;
        }
        Ok(())
    }
}

impl Migratable for Serial {
    const KIND: &'static str = "serial-8250";
    const VERSION: u32 = 1;
    type State = SerialState;

    fn save_state(&self) -> Result<SerialState, StateError> {
        Ok(self.state())
    }

    fn restore_state(&mut self, state: SerialState) -> Result<(), StateError> {
        self.restore(&state).map_err(serial_error)
    }
}

impl Serial {
    /// Whether `state` fits this UART, touching nothing ([`Serial::check`]).
    pub fn check_state(&self, state: &SerialState) -> Result<(), StateError> {
        self.check(state).map_err(serial_error)
    }
}

fn serial_error(error: SerialError) -> StateError {
    StateError::Restore {
        what: "serial0".into(),
        reason: error.to_string(),
    }
}

/// The i8042 holds no state beyond its reset line; its section only proves both sides have one.
impl Migratable for I8042 {
    const KIND: &'static str = "i8042";
    const VERSION: u32 = 1;
    type State = ();

    fn save_state(&self) -> Result<(), StateError> {
        Ok(())
    }

    fn restore_state(&mut self, (): ()) -> Result<(), StateError> {
        Ok(())
    }
}

/// The CPUID registers that carry feature flags, as the configuration check compares them.
pub fn feature_words(cpuid: &[kvm_cpuid_entry2]) -> Vec<FeatureWord> {
    const FEATURE_REGISTERS: &[(u32, u32, char)] = &[
        (0x1, 0, 'c'),
        (0x1, 0, 'd'),
        (0x7, 0, 'b'),
        (0x7, 0, 'c'),
        (0x7, 0, 'd'),
        (0x7, 1, 'a'),
        (0xd, 0, 'a'), // XSAVE state components (XCR0)
        (0xd, 1, 'a'),
        (0x4000_0001, 0, 'a'), // KVM paravirtual features
        (0x8000_0001, 0, 'c'),
        (0x8000_0001, 0, 'd'),
        (0x8000_0007, 0, 'd'), // invariant TSC
        (0x8000_0008, 0, 'b'),
    ];
    FEATURE_REGISTERS
        .iter()
        .filter_map(|&(leaf, subleaf, register)| {
            let entry = cpuid.iter().find(|e| {
                e.function == leaf
                    && (e.index == subleaf
                        || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
            })?;
            let bits = match register {
                'a' => entry.eax,
                'b' => entry.ebx,
                'c' => entry.ecx,
                _ => entry.edx,
            };
            Some(FeatureWord {
                leaf,
                subleaf,
                register,
                bits,
            })
        })
        .collect()
}
