//! The sleep control and status registers of ferry's hardware-reduced ACPI platform (ACPI 6.5,
//! sections 4.8.3.7 and 4.8.3.8): how a guest powers the machine off. The FADT points at them
//! and the DSDT's `\_S5` gives the sleep type of soft-off; Linux's `poweroff` ends by writing
//! that type with SLP_EN to the control register. Without them a guest's power-off only halts
//! its CPUs, and the VM stays there with no guest left.

use tokio::sync::mpsc::UnboundedSender;

use crate::runtime::GuestEvent;

/// SLEEP_CONTROL_REG, one byte in I/O space (QEMU's q35 puts its ACPI PM registers here too).
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
    guest_events: UnboundedSender<GuestEvent>,
}

impl SleepControl {
    pub fn new(guest_events: UnboundedSender<GuestEvent>) -> Self {
        Self { guest_events }
    }

    pub fn write_control(&self, value: u8) {
        if value & SLEEP_ENABLE == 0 {
            return;
        }
        let sleep_type = (value & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT;
        if sleep_type == SOFT_OFF_SLEEP_TYPE {
            // The owner may already be gone during teardown; nothing is left to power off then.
            let _ = self.guest_events.send(GuestEvent::Poweroff);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> (
        SleepControl,
        tokio::sync::mpsc::UnboundedReceiver<GuestEvent>,
    ) {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
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
