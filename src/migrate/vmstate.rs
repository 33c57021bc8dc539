//! The state of a whole paused VM, part by part, as the sections of a STATE message.

use std::sync::Arc;

use super::state::{Section, Sections, StateError};
use crate::machine::devices::disk::DiskSection;
use crate::machine::devices::lock;
use crate::machine::state::{migratable_msrs, KvmVcpu, KvmVm};
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

/// Saves every part of the (paused) VM.
pub async fn save(vm: &Vm) -> Result<Vec<Section>, VmStateError> {
    let msr_list = Arc::new(migratable_msrs(&vm.machine.kvm).map_err(VmStateError::MsrList)?);
    let vcpus = vm
        .vcpus
        .on_each(move |index, fd| {
            Section::save(
                &vcpu_id(index),
                &KvmVcpu {
                    fd,
                    msr_list: &msr_list,
                },
            )
        })
        .await?;
    let mut sections = vcpus.into_iter().collect::<Result<Vec<_>, _>>()?;
    sections.push(Section::save("kvm", &KvmVm(&vm.machine.vm))?);
    let devices = &vm.machine.devices;
    sections.push(Section::save("serial0", &*lock(&devices.serial))?);
    sections.push(Section::save("i8042", &*lock(&devices.i8042))?);
    for disk in &devices.disks {
        sections.push(Section::save(&disk.section_id(), &DiskSection(disk))?);
    }
    Ok(sections)
}

/// Restores every part of the (paused) VM from `sections`, which must hold exactly its parts.
pub async fn restore(vm: &Vm, sections: Vec<Section>) -> Result<(), VmStateError> {
    let mut sections = Sections::new(sections)?;
    // VM-wide chips first: the vCPUs' LAPICs and timers are restored against them.
    sections.take("kvm")?.restore(&mut KvmVm(&vm.machine.vm))?;
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
    Ok(())
}
