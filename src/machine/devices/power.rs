//! ACPI power on ferry's hardware-reduced platform: the sleep control and status registers
//! (ACPI 6.5, sections 4.8.3.7 and 4.8.3.8), through which a guest powers the machine off, and
//! the power button that `system_powerdown` presses.
//!
//! The FADT points at the sleep registers and the DSDT's `\_S5` gives the sleep type of
//! soft-off; Linux's `poweroff` ends by writing that type with SLP_EN to the control register.
//! Without them a guest's power-off only halts its CPUs, and the VM stays there with no guest
//! left.
//!
//! A hardware-reduced platform has no fixed power button; as in Cloud Hypervisor, the button is
//! a control-method device (`PNP0C0C`) that a Generic Event Device (`ACPI0013`) notifies when
//! its interrupt fires: the event device's `_EVT` reads and acknowledges its event register,
//! then notifies the button. Linux's button driver turns the notification into a KEY_POWER
//! press, which systemd-logind or acpid answer by shutting down.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::migrate::state::{Migratable, StateError};

use crate::runtime::{GuestEvent, GuestEvents};

/// SLEEP_CONTROL_REG, one byte in I/O space, in a range QEMU's q35 also gives to ACPI.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// SLEEP_STATUS_REG, the byte after it.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The SLP_TYPx value `\_S5` names.
pub const SOFT_OFF_SLEEP_TYPE: u8 = 5;

const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111 << SLEEP_TYPE_SHIFT;
const SLEEP_ENABLE: u8 = 1 << 5;

/// Turns the guest's write of soft-off into the owner's power-off.
pub struct SleepControl {
    guest_events: GuestEvents,
}

impl SleepControl {
    pub fn new(guest_events: GuestEvents) -> Self {
        Self { guest_events }
    }

    pub fn write_control(&self, value: u8) {
        if value & SLEEP_ENABLE == 0 {
            return;
        }
        let sleep_type = (value & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT;
        if sleep_type == SOFT_OFF_SLEEP_TYPE {
            self.guest_events.send(GuestEvent::Poweroff);
        } else {
            // The DSDT names no other sleep state, so a guest that enters one guessed it.
            tracing::warn!(
                sleep_type,
                "the guest asked for a sleep state ferry does not have"
            );
        }
    }

    /// WAK_STS never reads set: ferry's guests power off but never sleep and wake.
    pub fn read_status(&self) -> u8 {
        0
    }

    /// No sleep is ever under way to read back.
    pub fn read_control(&self) -> u8 {
        0
    }
}

/// The Generic Event Device's interrupt: an IOAPIC pin no other device uses, outside the ISA
/// range so that no legacy trigger mode applies; level triggered, active high.
pub const POWER_BUTTON_GSI: u32 = 23;
/// The Generic Event Device's event register, one byte: [`POWER_BUTTON_EVENT`] reads set while
/// a press waits for the guest; writing it back acknowledges the press.
pub const GED_EVENT_PORT: u16 = 0x602;
pub const POWER_BUTTON_EVENT: u8 = 1;

/// The power button. A press is latched, as QEMU's PM1 status latches one: the interrupt line
/// stays asserted until the guest's event handler acknowledges it, so a press made while the
/// VM is paused, not yet started or migrating, or before the guest unmasks the pin, reaches the
/// handler once it runs. (Linux's GED driver may take it before userspace can act on it, and
/// that press is then spent, as on QEMU.)
pub struct PowerButton {
    vm: Arc<VmFd>,
    pressed: bool,
}

impl PowerButton {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm, pressed: false }
    }

    pub fn press(&mut self) -> Result<(), kvm_ioctls::Error> {
        // Latched only once the line is up: a press QMP reports as failed never arrives later.
        self.vm.set_irq_line(POWER_BUTTON_GSI, true)?;
        self.pressed = true;
        Ok(())
    }

    pub fn read_events(&self) -> u8 {
        if self.pressed {
            POWER_BUTTON_EVENT
        } else {
            0
        }
    }

    pub fn acknowledge(&mut self, events: u8) {
        if events & POWER_BUTTON_EVENT == 0 || !self.pressed {
            return;
        }
        // The press stays latched if the line cannot drop, so that the register and the line
        // agree (KVM refuses only without an in-kernel irqchip, which ferry always has).
        match self.vm.set_irq_line(POWER_BUTTON_GSI, false) {
            Ok(()) => self.pressed = false,
            Err(error) => tracing::warn!(%error, "cannot lower the power button's interrupt"),
        }
    }
}

/// What migrates: whether a press waits for the guest.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PowerButtonState {
    pub pressed: bool,
}

impl Migratable for PowerButton {
    const KIND: &'static str = "acpi-ged";
    const VERSION: u32 = 1;
    type State = PowerButtonState;

    fn save_state(&self) -> Result<PowerButtonState, StateError> {
        Ok(PowerButtonState {
            pressed: self.pressed,
        })
    }

    fn restore_state(&mut self, state: PowerButtonState) -> Result<(), StateError> {
        self.pressed = state.pressed;
        // KVM's per-source level of the line is not in the saved IOAPIC; raising it again
        // keeps KVM consistent, so that the acknowledgement's lowering acts on it.
        self.vm
            .set_irq_line(POWER_BUTTON_GSI, state.pressed)
            .map_err(|error| StateError::Restore {
                what: "the power button".into(),
                reason: error.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> (
        SleepControl,
        tokio::sync::mpsc::UnboundedReceiver<GuestEvent>,
    ) {
        let (sender, receiver) = GuestEvents::channel();
        (SleepControl::new(sender), receiver)
    }

    #[test]
    fn soft_off_with_sleep_enable_powers_off() {
        let (control, mut events) = control();
        control.write_control(SOFT_OFF_SLEEP_TYPE << SLEEP_TYPE_SHIFT | SLEEP_ENABLE);
        assert!(matches!(events.try_recv(), Ok(GuestEvent::Poweroff)));
    }

    #[test]
    fn other_writes_leave_the_guest_running() {
        let (control, mut events) = control();
        // The sleep type alone, without SLP_EN: the first half of a two-step write.
        control.write_control(SOFT_OFF_SLEEP_TYPE << SLEEP_TYPE_SHIFT);
        // S3 (suspend to RAM), which ferry's DSDT does not offer.
        control.write_control(3 << SLEEP_TYPE_SHIFT | SLEEP_ENABLE);
        assert!(events.try_recv().is_err());
        assert_eq!(control.read_status(), 0);
    }
}
