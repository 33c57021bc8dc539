//! The 8250 UART at 0x3f8 (COM1, IRQ 4), bridged to stdio, a file, or nothing.

use std::fs::File;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// The GSI the UART interrupts on, as on a PC.
pub const SERIAL_GSI: u32 = 4;

/// Raises the UART's interrupt line through an irqfd registered with KVM.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Why migrated serial state could not be put back.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create an eventfd for the serial port's interrupt: {0}")]
    EventFd(#[source] io::Error),
    #[error("invalid serial state: {0}")]
    State(#[source] vm_superio::serial::Error<io::Error>),
    #[error(
        "the source's receive FIFO holds {saved} bytes, more than the {size} this UART holds; \
         the two ends' ferry builds differ"
    )]
    FifoOverflow { saved: usize, size: usize },
}

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// Standard output, flushed on every write so prompts without a newline show up.
    Stdout,
    File(File),
    Sink,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Stdout => {
                let mut stdout = io::stdout().lock();
                stdout.write_all(buf)?;
                stdout.flush()?;
                Ok(buf.len())
            }
            SerialOutput::File(file) => file.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::File(file) => file.flush(),
            SerialOutput::Sink => Ok(()),
        }
    }
}

type Uart = vm_superio::Serial<IrqTrigger, NoEvents, SerialOutput>;

/// The UART's registers and receive FIFO, as they travel in a migration stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The UART as the vCPUs and the stdin reader see it.
pub struct Serial {
    uart: Uart,
}

impl Serial {
    pub fn new(interrupt: EventFd, output: SerialOutput) -> Self {
        Self {
            uart: Uart::new(IrqTrigger(interrupt), output),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(error) = self.uart.write(offset, value) {
            // Losing guest output (a closed stdout, a full disk) must not stop the guest.
            tracing::debug!(%error, "serial output failed");
        }
    }

    /// Offers host input to the guest; returns how many bytes the receive FIFO took.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(taken) => taken,
            Err(error) => {
                tracing::debug!(?error, "serial input dropped");
                0
            }
        }
    }

    pub fn state(&self) -> SerialState {
        let state = self.uart.state();
        SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        }
    }

    /// Whether `state` fits this UART, touching nothing: its receive FIFO holds no more bytes
    /// than this one can.
    pub fn check(&self, state: &SerialState) -> Result<(), SerialError> {
        // vm-superio's FIFO size: what this one has free plus what it holds.
        let size = self.uart.fifo_capacity() + self.uart.state().in_buffer.len();
        if state.in_buffer.len() > size {
            return Err(SerialError::FifoOverflow {
                saved: state.in_buffer.len(),
                size,
            });
        }
        Ok(())
    }

    /// Rebuilds the UART from migrated state, keeping this side's interrupt line and output.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), SerialError> {
        self.check(state)?;
        let uart_state = UartState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        // Everything that can fail before the UART is taken apart fails first, so that such a
        // failure leaves this side's interrupt line and output in place.
        let interrupt = IrqTrigger(
            self.uart
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(SerialError::EventFd)?,
        );
        let placeholder = Uart::new(
            IrqTrigger(EventFd::new(0).map_err(SerialError::EventFd)?),
            SerialOutput::Sink,
        );
        let output = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = Uart::from_state(&uart_state, interrupt, NoEvents, output)
            .map_err(SerialError::State)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial_into(file: &File) -> Serial {
        let output = SerialOutput::File(file.try_clone().unwrap());
        Serial::new(EventFd::new(0).unwrap(), output)
    }

    /// A migration checks the UART's state before it tells the source it has it; a refused
    /// restore leaves this side's UART whole, its output included.
    #[test]
    fn an_overfull_fifo_is_refused_before_the_uart_is_rebuilt() {
        let written = tempfile::tempfile().unwrap();
        let mut serial = serial_into(&written);
        let mut state = serial.state();
        state.in_buffer = vec![b'x'; serial.uart.fifo_capacity()];
        serial.check(&state).unwrap();
        state.in_buffer.push(b'y');

        let checked = serial.check(&state).unwrap_err().to_string();
        assert!(
            checked.contains("holds 65 bytes, more than the 64"),
            "{checked}"
        );
        let restored = serial.restore(&state).unwrap_err().to_string();
        assert_eq!(restored, checked);

        serial.write(0, b'!');
        let mut output = String::new();
        let mut file = written;
        io::Seek::rewind(&mut file).unwrap();
        io::Read::read_to_string(&mut file, &mut output).unwrap();
        assert_eq!(output, "!", "the refused restore lost the UART's output");
    }
}
