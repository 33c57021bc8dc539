//! `-mem-prealloc`: backing all guest RAM with host memory before the guest or a migration
//! touches it. A host that cannot hold the guest says so at startup, not by killing it later;
//! and a migration destination lands pages in memory that is already there. Backing fresh
//! memory is most of a destination's work otherwise: on this host, whose own hypervisor takes
//! back the memory it frees, it runs at 0.4-1.5 GiB/s, against a socket's 4-6.
//!
//! Pages stay zero, but residency (see `memory::resident_pages`) no longer tells which of them
//! were ever written: a destination then goes by the pages ferry wrote (see `migrate::landing`).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{populate_write, GuestMemory, POPULATE_CHUNK};

/// Threads beyond the host's cores only queue; this many already saturate a large host's
/// memory bandwidth (QEMU lets the operator pick; StratoVirt caps at 16).
const MAX_THREADS: usize = 8;

#[derive(Debug, thiserror::Error)]
#[error("-mem-prealloc: cannot back {mib} MiB of guest RAM with host memory: {source}{hint}")]
pub struct PreallocError {
    mib: u64,
    #[source]
    source: std::io::Error,
    hint: &'static str,
}

impl PreallocError {
    fn new(mib: u64, source: std::io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::ENOMEM | libc::EAGAIN) => "; free host memory, or give the guest less (-m)",
            Some(libc::EHWPOISON) => "; the host has bad memory pages: see its kernel log",
            _ => "",
        };
        Self { mib, source, hint }
    }
}

/// Backs every page of `memory`, with one thread per core (up to 8).
pub fn preallocate(memory: &GuestMemory) -> Result<(), PreallocError> {
    let started = Instant::now();
    let regions: Vec<(usize, usize)> = memory
        .iter()
        .map(|region| (region.as_ptr() as usize, region.len() as usize))
        .collect();
    let chunks: usize = regions
        .iter()
        .map(|&(_, len)| len.div_ceil(POPULATE_CHUNK))
        .sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |cores| cores.get())
        .clamp(1, MAX_THREADS)
        .min(chunks.max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let back = || -> std::io::Result<()> {
        while !failed.load(Ordering::Relaxed) {
            let Some((host, len)) = chunk(&regions, next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            // SAFETY: every chunk lies in a region of guest RAM, which `memory` keeps mapped
            // and writable.
            if let Err(error) = unsafe { back_chunk(host, len) } {
                failed.store(true, Ordering::Relaxed);
                return Err(error);
            }
        }
        Ok(())
    };
    let (result, threads) = std::thread::scope(|scope| {
        // A thread that could not be spawned leaves its share to the others.
        let helpers: Vec<_> = (1..threads)
            .filter_map(|index| {
                std::thread::Builder::new()
                    .name(format!("prealloc-{index}"))
                    .spawn_scoped(scope, back)
                    .ok()
            })
            .collect();
        let threads = 1 + helpers.len();
        let mut result = back();
        for helper in helpers {
            let joined = helper.join().expect("a prealloc thread panicked");
            result = result.and(joined);
        }
        (result, threads)
    });
    let mib = regions.iter().map(|&(_, len)| len as u64).sum::<u64>() >> 20;
    result.map_err(|source| PreallocError::new(mib, source))?;
    tracing::info!(
        mib,
        threads,
        ms = started.elapsed().as_millis() as u64,
        "guest RAM preallocated"
    );
    Ok(())
}

/// The `index`-th chunk of the regions, as (host address, length).
fn chunk(regions: &[(usize, usize)], mut index: usize) -> Option<(usize, usize)> {
    for &(host, len) in regions {
        let count = len.div_ceil(POPULATE_CHUNK);
        if index < count {
            let offset = index * POPULATE_CHUNK;
            return Some((host + offset, POPULATE_CHUNK.min(len - offset)));
        }
        index -= count;
    }
    None
}

/// Backs `[host, host + len)`.
///
/// # Safety
///
/// The range must be mapped, writable memory.
unsafe fn back_chunk(host: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the range.
    let Err(error) = (unsafe { populate_write(host as *mut u8, len) }) else {
        return Ok(());
    };
    if error.raw_os_error() != Some(libc::EINVAL) {
        return Err(error);
    }
    // Linux before 5.14 lacks MADV_POPULATE_WRITE: write to each page instead, an atomic add of
    // zero, which changes nothing even if a vCPU writes the page meanwhile.
    for page in (host..host + len).step_by(4096) {
        // SAFETY: `page` lies in the mapped, writable range the caller vouches for, and a
        // byte has no alignment to keep.
        let byte = unsafe { AtomicU8::from_ptr(page as *mut u8) };
        byte.fetch_add(0, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::machine::memory::resident_pages;

    #[test]
    fn chunks_cover_every_region_in_order() {
        let regions = [
            (0x10_0000, 2 * POPULATE_CHUNK + 4096),
            (0x1_0000_0000, 4096),
        ];
        let all: Vec<_> = (0..5).map(|index| chunk(&regions, index)).collect();
        assert_eq!(
            all,
            vec![
                Some((0x10_0000, POPULATE_CHUNK)),
                Some((0x10_0000 + POPULATE_CHUNK, POPULATE_CHUNK)),
                Some((0x10_0000 + 2 * POPULATE_CHUNK, 4096)),
                Some((0x1_0000_0000, 4096)),
                None,
            ]
        );
    }

    #[test]
    fn preallocated_ram_is_resident_and_keeps_its_contents() {
        let memory =
            GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20), (GuestAddress(1 << 32), 4096)])
                .unwrap();
        memory.write_obj(0xfeed_u64, GuestAddress(0x3000)).unwrap();
        preallocate(&memory).unwrap();
        for region in memory.iter() {
            let pages = region.len() / 4096;
            let resident = resident_pages(&memory, region.start_addr().0, pages).unwrap();
            let backed: u64 = resident
                .iter()
                .map(|word| u64::from(word.count_ones()))
                .sum();
            assert_eq!(backed, pages, "{backed} of {pages} pages backed");
        }
        assert_eq!(
            memory.read_obj::<u64>(GuestAddress(0x3000)).unwrap(),
            0xfeed
        );
        assert_eq!(memory.read_obj::<u64>(GuestAddress(1 << 32)).unwrap(), 0);
    }
}
