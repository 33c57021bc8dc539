//! The tokio control plane and the vCPU threads.
//!
//! One task owns the VM ([`vmm::Vmm`]); QMP sessions reach it through [`control::VmHandle`],
//! vCPU threads report guest events through an unbounded channel, and a
//! `CancellationToken` ends everything at shutdown.

pub mod affinity;
pub mod console;
pub mod control;
pub mod launch;
pub mod priority;
pub mod run_delay;
pub mod start_gate;
pub mod throttle;
pub mod vcpu;
pub mod vcpus;
pub mod vmm;
pub mod wake_latency;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

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

/// Where the guest's events go: to the VM owner, and into a mark that they were sent. Every
/// guest event ends the VM, and a switchover reads the mark once the vCPUs are paused: a
/// guest that powered off or reset just before must not be resumed on the destination, while
/// its event still waits for the source's owner.
#[derive(Debug, Clone)]
pub struct GuestEvents {
    sender: mpsc::UnboundedSender<GuestEvent>,
    sent: Arc<AtomicBool>,
}

impl GuestEvents {
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<GuestEvent>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let events = Self {
            sender,
            sent: Arc::new(AtomicBool::new(false)),
        };
        (events, receiver)
    }

    pub fn send(&self, event: GuestEvent) {
        // Marked before the owner can see the event, so the mark is never behind it.
        self.sent.store(true, Ordering::Release);
        // The owner may already be gone during teardown; nothing is left to end then.
        let _ = self.sender.send(event);
    }

    /// Whether the guest has asked to end the VM.
    pub fn ended_by_guest(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }
}

/// The VM as one value that can move between the owner and a migration task.
pub struct Vm {
    pub machine: crate::machine::Machine,
    pub vcpus: vcpus::Vcpus,
    /// KVM's dirty logging being turned off after an outgoing migration.
    pub dirty_log: crate::migrate::logging::PendingSwitch,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_from_any_device_marks_the_vm_as_ended_by_its_guest() {
        let (events, mut owner) = GuestEvents::channel();
        let device = events.clone();
        assert!(!events.ended_by_guest());
        device.send(GuestEvent::Poweroff);
        assert!(events.ended_by_guest());
        assert_eq!(owner.try_recv(), Ok(GuestEvent::Poweroff));
    }
}
