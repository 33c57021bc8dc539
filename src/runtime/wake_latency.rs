//! Keeping the host's idle CPUs quick to wake while a switchover runs.
//!
//! A switchover is a chain of hand-offs between threads: the owner kicks each vCPU, the vCPUs
//! save, the state goes out, the destination's vCPUs restore and resume. Each hand-off wakes a
//! thread, often on a CPU that has gone idle. A CPU idle in a deep state takes long to wake: a
//! deep C-state on bare metal, or, when the host is itself a VM, a halted vCPU that its
//! hypervisor must schedule again (up to 240 µs on the PVM host this was measured on, against a
//! whole switchover of under 1 ms). A PM QoS CPU latency request of 0 µs keeps idle CPUs
//! polling instead, for as long as it is held: while the switchover runs (usually a few
//! milliseconds, at most the commit's deadline), and only then.

use std::fs::{File, OpenOptions};
use std::io::Write;

/// The kernel's CPU latency QoS interface: a request lives as long as its open file.
const CPU_LATENCY_QOS: &str = "/dev/cpu_dma_latency";

/// A held request that idle CPUs wake at once; dropping it withdraws the request.
#[derive(Debug)]
pub struct QuickWake {
    _request: File,
}

impl QuickWake {
    /// Asks the host to keep its idle CPUs polling. Only root may ask; without the right, or on
    /// a kernel without the interface, the switchover runs as it would have anyway.
    pub fn request() -> Option<Self> {
        let requested = OpenOptions::new()
            .write(true)
            .open(CPU_LATENCY_QOS)
            .and_then(|mut request| {
                // The interface takes the latency in µs as a native 32-bit integer.
                request.write_all(&0i32.to_ne_bytes())?;
                Ok(request)
            });
        match requested {
            Ok(request) => Some(Self { _request: request }),
            Err(error) => {
                tracing::debug!(%error, path = CPU_LATENCY_QOS, "idle CPUs may sleep through the switchover");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// What the host's CPUs are held to now, in µs, across every request.
    fn host_latency_limit() -> i32 {
        let mut value = [0u8; 4];
        File::open(CPU_LATENCY_QOS)
            .and_then(|mut limit| limit.read_exact(&mut value))
            .expect("read the CPU latency limit");
        i32::from_ne_bytes(value)
    }

    #[test]
    fn a_held_request_holds_the_host_to_polling() {
        // Some sandboxes have no such device or keep it from root; only a host that lets this
        // process open it can show the request working.
        if let Err(error) = OpenOptions::new().write(true).open(CPU_LATENCY_QOS) {
            eprintln!("skipped: cannot open {CPU_LATENCY_QOS}: {error}");
            return;
        }
        let held = QuickWake::request().expect("the interface opened, so the request is allowed");
        assert_eq!(host_latency_limit(), 0);
        drop(held);
    }
}
