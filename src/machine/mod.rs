//! Everything that touches KVM: the VM, its memory, its vCPUs' configuration, the devices, and
//! the boot of a kernel.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod pci;
pub mod prealloc;
pub mod state;
pub mod write_log;

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::CpuId;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use self::boot::KernelImage;
use self::cpu::HostQuirks;
use self::devices::power::{
    GED_EVENT_PORT, POWER_BUTTON_GSI, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
use self::devices::{
    Devices, Disk, PowerButton, ResetTrigger, Serial, SerialOutput, SleepControl, I8042,
};
use self::interrupts::GsiRouter;
use self::memory::{GuestMemory, RamRange};
use self::pci::{BarAllocator, PciRoot};
use crate::cli::{Config, SerialTarget};
use crate::migrate::state::{DeviceDescription, VmDescription};
use crate::runtime::GuestEvents;

/// Where KVM keeps its real-mode TSS and identity map: three pages just below the BIOS ROM.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The machine types ferry emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MachineType {
    Q35,
}

impl MachineType {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "q35" | "pc-q35" => Some(Self::Q35),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q35 => "q35",
        }
    }

    pub fn supported_names() -> &'static str {
        "q35"
    }
}

/// Why the machine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("-smp: {requested} vCPUs requested, but at most {max} are possible on this host")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Prealloc(#[from] prealloc::PreallocError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("-serial: cannot open {path}: {source}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] devices::disk::DiskError),
}

impl MachineError {
    /// Whether the command line itself is wrong (exit status 2), rather than the host or a
    /// file it names (exit status 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::TooManyVcpus { .. })
    }
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { what, source }
}

/// A built VM: everything KVM holds for it, its memory and devices, and its vCPUs ready to run.
pub struct Machine {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    /// KVM's GSI routes: devices' MSI-X vectors are added to it.
    pub router: Arc<GsiRouter>,
    pub memory: GuestMemory,
    /// `-mem-prealloc`: every page of `memory` was backed before anything wrote to it.
    pub preallocated: bool,
    pub layout: Vec<RamRange>,
    pub devices: Arc<Devices>,
    /// Taken by the vCPU threads when they start.
    pub vcpus: Vec<VcpuFd>,
    pub vcpu_count: u32,
    pub machine_type: MachineType,
    pub quirks: HostQuirks,
    /// The CPUID each vCPU runs with: what a migration sends and compares, without asking KVM
    /// inside the downtime (KVM keeps a vCPU's CPUID fixed once it has run). An incoming
    /// migration that set the source's CPUID replaces it, so a later migration sends that one.
    cpuids: Mutex<Arc<[CpuId]>>,
    /// What the devices tell the owner; a switchover asks it whether the guest ended the VM.
    pub guest_events: GuestEvents,
}

impl Machine {
    /// Creates the VM, maps its RAM, creates its vCPUs and devices and, unless `boot` is false
    /// (an incoming migration brings all of that), loads the kernel.
    pub fn new(
        config: &Config,
        guest_events: GuestEvents,
        boot: bool,
    ) -> Result<Self, MachineError> {
        let kvm = Kvm::new().map_err(MachineError::OpenKvm)?;
        let max = (kvm.get_max_vcpus() as u32).min(mptable::MAX_VCPUS);
        if config.vcpus > max {
            return Err(MachineError::TooManyVcpus {
                requested: config.vcpus,
                max,
            });
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_error("create a VM"))?);
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_error("set the TSS address"))?;
        vm.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(kvm_error("set the identity map address"))?;
        // The irqchip must exist before any vCPU, or KVM gives the vCPUs no LAPIC.
        vm.create_irq_chip()
            .map_err(kvm_error("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(kvm_error("create the in-kernel PIT"))?;

        let layout = memory::ram_layout(config.mem_bytes);
        let memory = memory::create_guest_memory(&layout)?;
        if config.mem_prealloc {
            prealloc::preallocate(&memory)?;
        }
        let machine_memory = Self::register_memory(&vm, &memory, false)?;
        tracing::debug!(slots = machine_memory, "guest RAM registered");

        let router = Arc::new(GsiRouter::new(vm.clone()));
        let devices = Arc::new(create_devices(
            &vm,
            config,
            guest_events.clone(),
            &router,
            &memory,
            &layout,
        )?);
        let quirks = HostQuirks::detect();
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("read CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        let mut cpuids = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_error("create a vCPU"))?;
            let cpuid = cpu::vcpu_cpuid(&supported, index, config.vcpus, quirks);
            cpu::configure_vcpu(&vcpu, index, &cpuid)?;
            vcpus.push(vcpu);
            cpuids.push(cpuid);
        }
        let machine = Self {
            kvm,
            vm,
            router,
            memory,
            preallocated: config.mem_prealloc,
            layout,
            devices,
            vcpus,
            vcpu_count: config.vcpus,
            machine_type: config.machine,
            quirks,
            cpuids: Mutex::new(cpuids.into()),
            guest_events,
        };
        if boot {
            machine.load_kernel(config)?;
        }
        Ok(machine)
    }

    /// The CPUID each vCPU runs with, one per vCPU.
    pub fn cpuids(&self) -> Arc<[CpuId]> {
        devices::lock(&self.cpuids).clone()
    }

    /// Records the CPUIDs an incoming migration set on the vCPUs.
    pub fn adopt_cpuids(&self, cpuids: Arc<[CpuId]>) {
        *devices::lock(&self.cpuids) = cpuids;
    }

    fn load_kernel(&self, config: &Config) -> Result<(), MachineError> {
        let image = match &config.kernel {
            Some(path) => KernelImage::File(path.clone()),
            None => KernelImage::Builtin(crate::guest::BUILTIN_GUEST),
        };
        let rsdp = acpi::write(&self.memory, self.vcpu_count, &self.layout)?;
        acpi::mask_legacy_pics(&self.vm)?;
        let entry = boot::load(
            &self.memory,
            &self.layout,
            &image,
            config.initrd.as_deref(),
            &config.append,
            rsdp,
        )?;
        // Kept beside the ACPI tables for guests that read only the MP table.
        mptable::write(&self.memory, self.vcpu_count, boot::BIOS_AREA_START)?;
        cpu::setup_boot_vcpu(&self.vcpus[0], &self.memory, entry)?;
        Ok(())
    }

    /// Registers every RAM region with KVM as one memory slot, with or without dirty logging.
    /// Returns the number of slots.
    pub fn register_memory(
        vm: &VmFd,
        memory: &GuestMemory,
        log_dirty: bool,
    ) -> Result<u32, MachineError> {
        let mut slots = 0;
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|_| kvm_error("map guest RAM")(kvm_ioctls::Error::new(libc::EFAULT)))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the host range belongs to `memory`, which the `Machine` keeps mapped for as
            // long as the VM exists (the VM is dropped before or with it).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_error("register guest RAM with KVM"))?;
            slots += 1;
        }
        Ok(slots)
    }

    /// What a migration destination compares with its own configuration.
    pub fn description(&self) -> VmDescription {
        let attributes = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        VmDescription {
            machine: self.machine_type.name().to_owned(),
            mem_bytes: self.layout.iter().map(|r| r.size).sum(),
            ram: self.layout.clone(),
            vcpus: self.vcpu_count,
            cpu_features: state::feature_words(self.cpuids()[0].as_slice()),
            devices: [
                DeviceDescription {
                    kind: "serial-8250".into(),
                    id: "serial0".into(),
                    attributes: attributes(&[("port", "0x3f8"), ("irq", "4")]),
                },
                DeviceDescription {
                    kind: "i8042".into(),
                    id: "i8042".into(),
                    attributes: attributes(&[("ports", "0x60,0x64")]),
                },
                // A guest's power-off goes where its FADT says; a destination without these
                // would leave it spinning on a port nothing answers.
                DeviceDescription {
                    kind: "acpi-power".into(),
                    id: "acpi-power".into(),
                    attributes: attributes(&[
                        (
                            "sleep-ports",
                            &format!("{SLEEP_CONTROL_PORT:#x},{SLEEP_STATUS_PORT:#x}"),
                        ),
                        ("event-port", &format!("{GED_EVENT_PORT:#x}")),
                        ("button-gsi", &POWER_BUTTON_GSI.to_string()),
                    ]),
                },
            ]
            .into_iter()
            .chain(self.devices.disks.iter().map(Disk::description))
            .collect(),
        }
    }
}

fn create_devices(
    vm: &Arc<VmFd>,
    config: &Config,
    guest_events: GuestEvents,
    router: &Arc<GsiRouter>,
    memory: &GuestMemory,
    layout: &[RamRange],
) -> Result<Devices, MachineError> {
    let output = match &config.serial {
        SerialTarget::Stdio => SerialOutput::Stdout,
        SerialTarget::None => SerialOutput::Sink,
        SerialTarget::File(path) => SerialOutput::File(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|source| MachineError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::EventFd)?;
    vm.register_irqfd(&interrupt, devices::serial::SERIAL_GSI)
        .map_err(kvm_error("connect the serial port's interrupt"))?;
    let mut pci = PciRoot::new();
    let window64 = layout::mmio64_window(layout);
    let mut bars = BarAllocator::new(
        (layout::MMIO32_START, layout::MMIO32_END),
        (window64.start, window64.end()),
    );
    let mut disks = Vec::with_capacity(config.block_devices.len());
    for device in &config.block_devices {
        let drive = config
            .drives
            .iter()
            .find(|drive| drive.id == device.drive)
            .expect("the command line checks that every device's drive exists");
        // Function 0 of a slot with several functions must say so, or the guest looks no further.
        let multifunction = config
            .block_devices
            .iter()
            .any(|other| other.addr.slot == device.addr.slot && other.addr != device.addr);
        let disk = Disk::create(
            device,
            drive,
            multifunction,
            config.incoming.is_some(),
            &mut bars,
            router.clone(),
            memory.clone(),
        )?;
        pci.add(device.addr, disk.function());
        disks.push(disk);
    }
    Ok(Devices {
        serial: Mutex::new(Serial::new(interrupt, output)),
        i8042: Mutex::new(I8042::new(ResetTrigger(guest_events.clone()))),
        sleep: SleepControl::new(guest_events),
        power_button: Mutex::new(PowerButton::new(Arc::clone(vm))),
        pci,
        disks,
        disk_transition: Mutex::new(()),
    })
}
