//! The host side of the serial console: keyboard input into the UART, and the terminal put in
//! raw mode for as long as the guest owns it.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use crate::machine::devices::{lock, Devices};

/// Puts the terminal on stdin in raw mode (keeping Ctrl-C as a signal, as QEMU's `-serial
/// stdio` does) and restores it when dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// `None` when stdin is not a terminal (a pipe, a file, /dev/null).
    pub fn enter() -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check its result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a valid termios pointer.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_lflag |= libc::ISIG;
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: a valid descriptor and a valid termios pointer.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter` on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// Copies stdin into the UART's receive FIFO on a thread of its own, waiting while the FIFO is
/// full, until stdin ends. The thread is not joined: a blocking read of a terminal has no
/// timeout, and the process exit ends it.
pub fn spawn_stdin_reader(devices: Arc<Devices>) {
    let spawned = std::thread::Builder::new()
        .name("serial input".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buffer = [0u8; 64];
            loop {
                let count = match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => return,
                    Ok(count) => count,
                };
                let mut pending = &buffer[..count];
                while !pending.is_empty() {
                    let taken = lock(&devices.serial).enqueue_input(pending);
                    pending = &pending[taken..];
                    if taken == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no serial input: cannot start the stdin reader");
    }
}
