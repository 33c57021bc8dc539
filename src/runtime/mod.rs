//! The tokio control plane and the vCPU threads.
//!
//! One task owns the VM ([`vmm::Vmm`]); QMP sessions reach it through [`control::VmHandle`],
//! vCPU threads report guest events through an unbounded channel, and a
//! `CancellationToken` ends everything at shutdown.

pub mod console;
pub mod control;
pub mod launch;
pub mod run_delay;
pub mod throttle;
pub mod vcpu;
pub mod vcpus;
pub mod vmm;

/// Something the guest did that the VM owner must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// A reset through the i8042 or KVM's system event: ferry ends the VM, as QEMU -no-reboot.
    Reset,
    /// A triple fault, which on a PC resets the machine.
    TripleFault,
    /// A power-off request.
    Poweroff,
    /// A vCPU stopped on something it cannot go on from.
    Crashed(String),
}

/// The VM as one value that can move between the owner and a migration task.
pub struct Vm {
    pub machine: crate::machine::Machine,
    pub vcpus: vcpus::Vcpus,
    /// KVM's dirty logging being turned off after an outgoing migration.
    pub dirty_log: crate::migrate::logging::PendingSwitch,
}
