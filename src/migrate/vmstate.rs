//! The state of a whole paused VM, part by part, as the sections of a STATE message.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::clock::{LocalClock, PeerClock};
use super::phases::Phases;
use super::state::{Migratable, Section, Sections, StateError};
use super::transit::{self, SavedAt};
use crate::machine::devices::disk::DiskSection;
use crate::machine::devices::{lock, PowerButton, Serial, I8042};
use crate::machine::state::{migratable_msrs, received_cpuid, KvmVcpu, KvmVm};
use crate::runtime::start_gate::StartGate;
use crate::runtime::vcpus::{GateOutcome, Queued, Starting};
use crate::runtime::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Vcpu(#[from] crate::runtime::vcpu::VcpuError),
    #[error("cannot list the MSRs to migrate: {0}")]
    MsrList(#[source] kvm_ioctls::Error),
}

fn vcpu_id(index: u32) -> String {
    format!("vcpu{index}")
}

/// Saves the vCPUs of a paused VM (each on its own thread, in parallel) and then the
/// in-kernel chips, with when each was saved on the destination's clock (`peer`).
pub async fn save_cpus(vm: &Vm, peer: &PeerClock) -> Result<Vec<Section>, VmStateError> {
    let vcpus = vm
        .vcpus
        .on_each(save_vcpu(msr_list(vm)?, vm.machine.cpuids()))
        .await?;
    with_chips(vm, vcpus, peer)
}

/// Pauses the vCPUs, which save themselves in the same wake-up; returns as soon as every vCPU
/// is out of the guest, their saves still under way. [`PausedSave::finish`] collects them.
pub async fn pause_and_save(vm: &mut Vm) -> Result<PausedSave, VmStateError> {
    let msr_list = msr_list(vm)?;
    let cpuids = vm.machine.cpuids();
    Ok(PausedSave(
        vm.vcpus.pause_then(save_vcpu(msr_list, cpuids)).await?,
    ))
}

/// A vCPU's section and when it was saved.
type SavedVcpu = Result<(Section, Instant), StateError>;

/// The vCPUs' saves, running on their threads.
pub struct PausedSave(Queued<SavedVcpu>);

impl PausedSave {
    /// The vCPUs' sections, then the in-kernel chips', then when they were saved.
    pub async fn finish(self, vm: &Vm, peer: &PeerClock) -> Result<Vec<Section>, VmStateError> {
        with_chips(vm, self.0.collect().await?, peer)
    }
}

/// The vCPUs' sections and, right after them, the in-kernel chips' (an interrupt the chips
/// deliver in between would be in neither), and when each was saved.
fn with_chips(
    vm: &Vm,
    vcpus: Vec<SavedVcpu>,
    peer: &PeerClock,
) -> Result<Vec<Section>, VmStateError> {
    let mut phases = Phases::start();
    let (mut sections, vcpus_saved_at): (Vec<_>, Vec<_>) = vcpus
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    sections.push(Section::save("kvm", &KvmVm(&vm.machine.vm))?);
    let chips_saved_at = Instant::now();
    phases.mark("kvm");
    let saved_at = SavedAt::mapped(&vcpus_saved_at, chips_saved_at, peer);
    sections.push(Section::save(transit::SECTION_ID, &saved_at)?);
    tracing::debug!(%phases, "chip state saved (µs)");
    Ok(sections)
}

fn msr_list(vm: &Vm) -> Result<Arc<Vec<u32>>, VmStateError> {
    Ok(Arc::new(
        migratable_msrs(&vm.machine.kvm).map_err(VmStateError::MsrList)?,
    ))
}

fn save_vcpu(
    msr_list: Arc<Vec<u32>>,
    cpuids: Arc<[CpuId]>,
) -> impl Fn(u32, &mut kvm_ioctls::VcpuFd) -> SavedVcpu + Send + Sync + 'static {
    move |index, fd| {
        let section = Section::save(
            &vcpu_id(index),
            &KvmVcpu {
                fd,
                msr_list: &msr_list,
                cpuid: &cpuids[index as usize],
            },
        )?;
        Ok((section, Instant::now()))
    }
}

/// Saves the emulated devices (the VM is paused).
pub fn save_devices(vm: &Vm) -> Result<Vec<Section>, VmStateError> {
    let devices = &vm.machine.devices;
    let mut sections = vec![
        Section::save("serial0", &*lock(&devices.serial))?,
        Section::save("i8042", &*lock(&devices.i8042))?,
        Section::save("acpi-ged", &*lock(&devices.power_button))?,
    ];
    for disk in &devices.disks {
        sections.push(Section::save(&disk.section_id(), &DiskSection(disk))?);
    }
    Ok(sections)
}

/// A whole VM's state, decoded and checked but not yet applied: a part missing or left over, one
/// of a kind or version this ferry cannot read, interrupt controllers out of place, a UART
/// FIFO overfull, or a disk whose config space, MSI-X table, queues or features do not fit this
/// one, shows here, before the destination tells the source it has the state. Only what KVM
/// judges (a register value) shows when the state is applied.
pub struct DecodedState {
    saved_at: SavedAt,
    chips: <KvmVm<'static> as Migratable>::State,
    /// Each taken by its vCPU's thread.
    vcpus: Vec<Mutex<Option<<KvmVcpu<'static> as Migratable>::State>>>,
    /// The source's CPUIDs, where they differ from this side's: the vCPUs run with them once
    /// restored.
    adopted_cpuids: Option<Arc<[CpuId]>>,
    serial: <Serial as Migratable>::State,
    power_button: <PowerButton as Migratable>::State,
    disks: Vec<<DiskSection<'static> as Migratable>::State>,
}

/// Decodes `sections`, which must hold exactly the parts of `vm`.
pub fn decode(vm: &Vm, sections: Vec<Section>) -> Result<DecodedState, VmStateError> {
    let mut sections = Sections::new(sections)?;
    let saved_at = sections.take(transit::SECTION_ID)?.decode::<SavedAt>()?;
    saved_at.check(vm.machine.vcpu_count)?;
    let chips = sections.take("kvm")?.decode::<KvmVm>()?;
    chips.check()?;
    let vcpus = (0..vm.machine.vcpu_count)
        .map(|i| sections.take(&vcpu_id(i))?.decode::<KvmVcpu>())
        .collect::<Result<Vec<_>, StateError>>()?;
    let adopted_cpuids = adopted_cpuids(
        &vm.machine.cpuids(),
        vcpus.iter().map(|state| state.cpuid.as_slice()),
    )?;
    let vcpus = vcpus
        .into_iter()
        .map(|state| Mutex::new(Some(state)))
        .collect();
    let serial = sections.take("serial0")?.decode::<Serial>()?;
    lock(&vm.machine.devices.serial).check_state(&serial)?;
    // The i8042's state is empty: its section only proves the source has one too.
    sections.take("i8042")?.decode::<I8042>()?;
    let power_button = sections.take("acpi-ged")?.decode::<PowerButton>()?;
    let disks = vm
        .machine
        .devices
        .disks
        .iter()
        .map(|disk| {
            let state = sections.take(&disk.section_id())?.decode::<DiskSection>()?;
            DiskSection(disk).check(&state)?;
            Ok(state)
        })
        .collect::<Result<_, StateError>>()?;
    sections.finish()?;
    Ok(DecodedState {
        saved_at,
        chips,
        vcpus,
        adopted_cpuids,
        serial,
        power_button,
        disks,
    })
}

/// The CPUIDs the vCPUs run with once `received` is restored, if any of them differs from the
/// `local` one it was configured with; `None` when all match.
fn adopted_cpuids<'a>(
    local: &[CpuId],
    received: impl Iterator<Item = &'a [kvm_cpuid_entry2]>,
) -> Result<Option<Arc<[CpuId]>>, StateError> {
    let mut differs = false;
    let cpuids = local
        .iter()
        .zip(received)
        .map(|(local, received)| {
            if local.as_slice() == received {
                return Ok(local.clone());
            }
            differs = true;
            received_cpuid(received)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(differs.then(|| cpuids.into()))
}

/// Restores the (paused) VM from `state` and starts its vCPUs behind `gate`: the in-kernel
/// chips and the devices here and now, each vCPU on its own thread, which goes into the guest
/// as soon as the gate opens. Returns once the vCPUs' restores are queued; [`RestoringCpus`]
/// collects them. Clocks and timers run on by the time since the source saved them (on
/// `clock`).
pub fn restore(
    vm: &Vm,
    state: DecodedState,
    clock: &LocalClock,
    gate: &Arc<StartGate>,
) -> Result<RestoringCpus, VmStateError> {
    let mut phases = Phases::start();
    let DecodedState {
        saved_at,
        mut chips,
        vcpus,
        adopted_cpuids,
        serial,
        power_button,
        disks,
    } = state;
    // VM-wide chips first: the vCPUs' LAPICs and timers are restored against them.
    chips.age(clock.since(saved_at.chips_ns));
    KvmVm(&vm.machine.vm).restore_state(chips)?;
    phases.mark("kvm");
    // The devices before the vCPUs' restores are queued, which their threads' KVM calls then
    // never overlap. The power button raises its line again, which the IOAPIC would deliver
    // (to a LAPIC whose restore comes after) only if the saved state held the line raised,
    // unmasked, neither delivered nor awaiting an EOI: a combination KVM never leaves, as it
    // delivers such a line at once.
    let devices = &vm.machine.devices;
    lock(&devices.serial).restore_state(serial)?;
    lock(&devices.i8042).restore_state(())?;
    lock(&devices.power_button).restore_state(power_button)?;
    for (disk, state) in devices.disks.iter().zip(disks) {
        DiskSection(disk).restore_state(state)?;
    }
    // Restored BARs may sit elsewhere than where this side allocated them.
    devices.pci.update_windows();
    phases.mark("devices");
    let vcpus = Arc::new(vcpus);
    let msr_list: Arc<[u32]> = Arc::from([]);
    let cpuids = vm.machine.cpuids();
    let clock = *clock;
    let starting = vm.vcpus.start_after(
        move |index, fd| {
            let mut state = lock(&vcpus[index as usize])
                .take()
                .ok_or_else(|| StateError::Missing(vcpu_id(index)))?;
            // The guest's TSC runs at the rate KVM gives this vCPU; unknown, it is left as saved.
            state.age(saved_at.vcpu_age(index, &clock), fd.get_tsc_khz().ok());
            KvmVcpu {
                fd,
                msr_list: &msr_list,
                cpuid: &cpuids[index as usize],
            }
            .restore_state(state)
        },
        gate,
    )?;
    phases.mark("queue");
    Ok(RestoringCpus {
        starting,
        adopted_cpuids,
        phases,
    })
}

/// The vCPUs' restores, under way on their threads, each vCPU then waiting at the gate.
pub struct RestoringCpus {
    starting: Starting<Result<(), StateError>>,
    adopted_cpuids: Option<Arc<[CpuId]>>,
    phases: Phases,
}

impl RestoringCpus {
    /// Waits for every vCPU's restore and for the vCPUs at the gate (the owner has arrived at it
    /// or shut it). Returns whether every restore succeeded and answered in time, and how the
    /// start went.
    pub async fn finish(self, vm: &mut Vm) -> (Result<(), VmStateError>, GateOutcome) {
        let Self {
            starting,
            adopted_cpuids,
            mut phases,
        } = self;
        let (answers, outcome) = vm.vcpus.finish_start(starting).await;
        let restored = answers
            .map_err(VmStateError::from)
            .and_then(|answers| Ok(answers.into_iter().collect::<Result<(), _>>()?));
        // The gate opens only once every restore succeeded, answered in time or not. Recorded
        // only now, the guest perhaps running already: nothing reads the record until the VM
        // migrates again, and a guest that does not stay here leaves this side's own.
        if restored.is_ok() || outcome.opened {
            if let Some(adopted) = adopted_cpuids {
                vm.machine.adopt_cpuids(adopted);
            }
        }
        phases.mark("vcpus");
        tracing::debug!(%phases, "VM state restored (µs)");
        (restored, outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid(eax_of_leaf_0: u32) -> CpuId {
        CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 0,
            eax: eax_of_leaf_0,
            ..Default::default()
        }])
        .unwrap()
    }

    #[test]
    fn matching_cpuids_are_not_adopted() {
        let local = [cpuid(0xd), cpuid(0xd)];
        let received = [cpuid(0xd), cpuid(0xd)];
        let adopted = adopted_cpuids(&local, received.iter().map(CpuId::as_slice)).unwrap();
        assert!(adopted.is_none());
    }

    #[test]
    fn a_differing_cpuid_is_adopted_for_the_vcpu_it_came_with() {
        let local = [cpuid(0xd), cpuid(0xd)];
        let received = [cpuid(0xd), cpuid(0x16)];
        let adopted = adopted_cpuids(&local, received.iter().map(CpuId::as_slice))
            .unwrap()
            .expect("vCPU 1's CPUID differs");
        assert_eq!(adopted.len(), 2);
        assert_eq!(adopted[0].as_slice(), local[0].as_slice());
        assert_eq!(adopted[1].as_slice(), received[1].as_slice());
    }
}
