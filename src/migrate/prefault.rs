//! On the destination: backing guest RAM with host pages ahead of the pages that will land in
//! it. The first touch of fresh memory (a page fault and a zeroed page) is a large share of a
//! receiver's work; a thread of its own does it while the receiver copies, on a core the
//! transfer leaves partly idle.
//!
//! Round 0 names, before any data, every range the source's guest never touched (its zero
//! runs); everything else will arrive, so that is what gets backed, in address order, as the
//! source sends it, until round 0 has landed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::machine::memory::{populate_write, GuestMemory, PAGE_SIZE, POPULATE_CHUNK};

/// The prefault thread; dropping it stops it at its next chunk.
pub struct Prefault {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Backed>>,
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Prefault {
    /// Stops the thread at its next chunk and waits for it to end: at most one chunk, a few ms
    /// where the host backs memory slowly. Returns what it backed.
    pub async fn finish(mut self) -> Option<Backed> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take()?;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .ok()?
            .ok()
    }
}

/// What a prefault thread backed, and in how long.
pub struct Backed {
    bytes: u64,
    wanted: u64,
    took: Duration,
}

impl Backed {
    /// How fast this host backs fresh memory bounds how fast a migration can land in it; where
    /// the host returns its free memory to a hypervisor, that bound can be far below a socket's
    /// speed.
    pub fn log(&self) {
        tracing::info!(
            backed_mib = self.bytes >> 20,
            wanted_mib = self.wanted >> 20,
            ms = self.took.as_millis() as u64,
            "guest RAM backed ahead of the pages"
        );
    }
}

/// Starts backing every RAM page outside `zero_runs` (`(gpa, pages)`, ascending).
pub fn start(memory: GuestMemory, zero_runs: Vec<(u64, u64)>) -> Option<Prefault> {
    let ranges = wanted_ranges(&memory, &zero_runs);
    if ranges.is_empty() {
        return None;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("prefault".into())
        .spawn(move || run(&memory, &ranges, &thread_stop));
    match spawned {
        Ok(thread) => Some(Prefault {
            stop,
            thread: Some(thread),
        }),
        Err(error) => {
            tracing::debug!(%error, "no prefault thread");
            None
        }
    }
}

/// RAM minus the zero runs, as `(gpa, bytes)` ranges.
fn wanted_ranges(memory: &GuestMemory, zero_runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for region in memory.iter() {
        let (start, end) = (region.start_addr().0, region.start_addr().0 + region.len());
        let mut at = start;
        for &(gpa, pages) in zero_runs {
            let run_end = gpa + pages * PAGE_SIZE;
            if run_end <= at || gpa >= end {
                continue;
            }
            if gpa > at {
                ranges.push((at, gpa - at));
            }
            at = run_end.min(end);
        }
        if at < end {
            ranges.push((at, end - at));
        }
    }
    ranges
}

fn run(memory: &GuestMemory, ranges: &[(u64, u64)], stop: &AtomicBool) -> Backed {
    let started = Instant::now();
    let bytes = back(memory, ranges, stop);
    Backed {
        bytes,
        wanted: ranges.iter().map(|&(_, bytes)| bytes).sum(),
        took: started.elapsed(),
    }
}

/// Backs `ranges` in order until done or stopped; returns the bytes backed.
fn back(memory: &GuestMemory, ranges: &[(u64, u64)], stop: &AtomicBool) -> u64 {
    let mut backed = 0u64;
    for &(gpa, bytes) in ranges {
        let mut offset = 0;
        while offset < bytes {
            if stop.load(Ordering::Relaxed) {
                return backed;
            }
            let len = (POPULATE_CHUNK as u64).min(bytes - offset);
            let Ok(host) = memory.get_host_address(GuestAddress(gpa + offset)) else {
                return backed;
            };
            // SAFETY: [host, host + len) lies in one region of `memory`, which this thread keeps
            // mapped.
            if let Err(error) = unsafe { populate_write(host, len as usize) } {
                // An older kernel without MADV_POPULATE_WRITE: faults happen on arrival instead.
                tracing::debug!(%error, "prefault gave up");
                return backed;
            }
            backed += len;
            offset += len;
        }
    }
    backed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_but_the_zero_runs_is_wanted() {
        let memory = GuestMemory::from_ranges(&[
            (GuestAddress(0), 16 * PAGE_SIZE as usize),
            (GuestAddress(1 << 32), 4 * PAGE_SIZE as usize),
        ])
        .unwrap();
        let runs = [
            (0, 2),
            (5 * PAGE_SIZE, 3),
            (14 * PAGE_SIZE, 2),
            (1 << 32, 4),
        ];
        assert_eq!(
            wanted_ranges(&memory, &runs),
            vec![
                (2 * PAGE_SIZE, 3 * PAGE_SIZE),
                (8 * PAGE_SIZE, 6 * PAGE_SIZE)
            ]
        );
        assert_eq!(
            wanted_ranges(&memory, &[]),
            vec![(0, 16 * PAGE_SIZE), (1 << 32, 4 * PAGE_SIZE)]
        );
    }

    /// `finish` is what keeps the thread off the cores at the switchover: it must stop the
    /// thread and return once it has ended, with what it backed.
    #[tokio::test]
    async fn finish_stops_the_thread_and_waits_for_it() {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Backed {
                bytes: 1,
                wanted: 2,
                took: Duration::ZERO,
            }
        });
        let prefault = Prefault {
            stop,
            thread: Some(thread),
        };
        let finished = tokio::time::timeout(Duration::from_secs(10), prefault.finish()).await;
        let backed = finished
            .expect("finish stops the thread")
            .expect("the thread's report");
        assert_eq!((backed.bytes, backed.wanted), (1, 2));
    }

    #[test]
    fn a_stopped_thread_backs_nothing_more() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 2 * POPULATE_CHUNK)]).unwrap();
        let ranges = wanted_ranges(&memory, &[]);
        assert_eq!(back(&memory, &ranges, &AtomicBool::new(true)), 0);
        let backed = run(&memory, &ranges, &AtomicBool::new(false));
        assert_eq!(backed.wanted, 2 * POPULATE_CHUNK as u64);
        assert!(backed.bytes <= backed.wanted);
    }
}
