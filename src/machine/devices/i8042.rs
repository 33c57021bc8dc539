//! The i8042 keyboard controller, present so that a guest reset through it (`reboot=k`, the
//! 0xFE command) ends the VM.

use vm_superio::{I8042Device, Trigger};

use crate::runtime::{GuestEvent, GuestEvents};

/// Tells the VM owner that the guest asked for a reset.
#[derive(Debug, Clone)]
pub struct ResetTrigger(pub GuestEvents);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(GuestEvent::Reset);
        Ok(())
    }
}

/// The controller as the vCPUs see it.
pub struct I8042 {
    device: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(reset: ResetTrigger) -> Self {
        Self {
            device: I8042Device::new(reset),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.device.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        let Ok(()) = self.device.write(offset, value);
    }
}
