//! The state of a whole paused VM, part by part, as the sections of a STATE message.

use std::sync::Arc;

use super::phases::Phases;
use super::state::{Section, Sections, StateError};
use crate::machine::devices::disk::DiskSection;
use crate::machine::devices::lock;
use crate::machine::state::{migratable_msrs, KvmVcpu, KvmVm};
use crate::runtime::vcpus::Queued;
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
/// in-kernel chips.
pub async fn save_cpus(vm: &Vm) -> Result<Vec<Section>, VmStateError> {
    let vcpus = vm.vcpus.on_each(save_vcpu(msr_list(vm)?)).await?;
    with_chips(vm, vcpus)
}

/// Pauses the vCPUs, which save themselves in the same wake-up; returns as soon as every vCPU
/// is out of the guest, their saves still under way. [`PausedSave::finish`] collects them.
pub async fn pause_and_save(vm: &mut Vm) -> Result<PausedSave, VmStateError> {
    let msr_list = msr_list(vm)?;
    Ok(PausedSave(vm.vcpus.pause_then(save_vcpu(msr_list)).await?))
}

/// The vCPUs' saves, running on their threads.
pub struct PausedSave(Queued<Result<Section, StateError>>);

impl PausedSave {
    /// The vCPUs' sections, then the in-kernel chips'.
    pub async fn finish(self, vm: &Vm) -> Result<Vec<Section>, VmStateError> {
        with_chips(vm, self.0.collect().await?)
    }
}

/// The vCPUs' sections and, right after them, the in-kernel chips': an interrupt the chips
/// deliver in between would be in neither.
fn with_chips(
    vm: &Vm,
    vcpus: Vec<Result<Section, StateError>>,
) -> Result<Vec<Section>, VmStateError> {
    let mut phases = Phases::start();
    let mut sections = vcpus.into_iter().collect::<Result<Vec<_>, _>>()?;
    sections.push(Section::save("kvm", &KvmVm(&vm.machine.vm))?);
    phases.mark("kvm");
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
) -> impl Fn(u32, &mut kvm_ioctls::VcpuFd) -> Result<Section, StateError> + Send + Sync + 'static {
    move |index, fd| {
        Section::save(
            &vcpu_id(index),
            &KvmVcpu {
                fd,
                msr_list: &msr_list,
            },
        )
    }
}

/// Saves the emulated devices (the VM is paused).
pub fn save_devices(vm: &Vm) -> Result<Vec<Section>, VmStateError> {
    let devices = &vm.machine.devices;
    let mut sections = vec![
        Section::save("serial0", &*lock(&devices.serial))?,
        Section::save("i8042", &*lock(&devices.i8042))?,
    ];
    for disk in &devices.disks {
        sections.push(Section::save(&disk.section_id(), &DiskSection(disk))?);
    }
    Ok(sections)
}

/// Restores every part of the (paused) VM from `sections`, which must hold exactly its parts.
pub async fn restore(vm: &Vm, sections: Vec<Section>) -> Result<(), VmStateError> {
    let mut phases = Phases::start();
    let mut sections = Sections::new(sections)?;
    // VM-wide chips first: the vCPUs' LAPICs and timers are restored against them.
    sections.take("kvm")?.restore(&mut KvmVm(&vm.machine.vm))?;
    phases.mark("kvm");
    let vcpu_sections: Vec<Section> = (0..vm.machine.vcpu_count)
        .map(|i| sections.take(&vcpu_id(i)))
        .collect::<Result<_, _>>()?;
    let vcpu_sections = Arc::new(vcpu_sections);
    let msr_list: Arc<[u32]> = Arc::from([]);
    let results = vm
        .vcpus
        .on_each(move |index, fd| {
            vcpu_sections[index as usize].restore(&mut KvmVcpu {
                fd,
                msr_list: &msr_list,
            })
        })
        .await?;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    phases.mark("vcpus");
    let devices = &vm.machine.devices;
    sections
        .take("serial0")?
        .restore(&mut *lock(&devices.serial))?;
    sections
        .take("i8042")?
        .restore(&mut *lock(&devices.i8042))?;
    for disk in &devices.disks {
        sections
            .take(&disk.section_id())?
            .restore(&mut DiskSection(disk))?;
    }
    // Restored BARs may sit elsewhere than where this side allocated them.
    devices.pci.update_windows();
    sections.finish()?;
    phases.mark("devices");
    tracing::debug!(%phases, "VM state restored (µs)");
    Ok(())
}
