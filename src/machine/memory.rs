//! Guest RAM: the q35 layout, the mapping through vm-memory, and the bitmap of ferry's own
//! writes into it.
//!
//! q35 puts RAM below the 32-bit PCI/MMIO hole and the rest above 4 GiB. As in QEMU, the hole
//! starts at 2.75 GiB when all RAM fits below that, and at 2 GiB otherwise (so large guests keep
//! a 2 GiB window for 32-bit BARs).

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::write_log::WriteLog;

/// Guest memory whose every write made by ferry sets a bit in a per-page bitmap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<WriteLog>;
/// One mapped region of [`GuestMemory`].
pub type GuestRegion = GuestRegionMmap<WriteLog>;

/// The guest page size that dirty tracking and migration work in.
pub const PAGE_SIZE: u64 = 4096;
/// The first guest-physical address above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Where the 32-bit hole starts for guests of at least this much RAM.
const LARGE_GUEST_LOW_LIMIT: u64 = 0x8000_0000;
/// Where the 32-bit hole starts for smaller guests.
const SMALL_GUEST_LOW_LIMIT: u64 = 0xB000_0000;

/// A contiguous run of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRange {
    pub start: u64,
    pub size: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Where `mem_bytes` of RAM go on a q35 machine: one range below 4 GiB, and one above it when
/// RAM does not fit below the hole.
pub fn ram_layout(mem_bytes: u64) -> Vec<RamRange> {
    let low_limit = if mem_bytes >= SMALL_GUEST_LOW_LIMIT {
        LARGE_GUEST_LOW_LIMIT
    } else {
        SMALL_GUEST_LOW_LIMIT
    };
    let low = mem_bytes.min(low_limit);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
    }];
    if mem_bytes > low {
        ranges.push(RamRange {
            start: HIGH_RAM_START,
            size: mem_bytes - low,
        });
    }
    ranges
}

/// The end of RAM below the 32-bit hole.
pub fn low_ram_end(layout: &[RamRange]) -> u64 {
    layout.first().map_or(0, RamRange::end)
}

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} MiB of guest RAM on this host: {source}")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("RAM range at {start:#x} of {size:#x} bytes does not fit this host's address space")]
    TooLarge { start: u64, size: u64 },
    #[error("-m: {requested} MiB of guest RAM is more than this host's {available} MiB of memory and swap")]
    MoreThanHost { requested: u64, available: u64 },
}

/// Memory and swap of the host in bytes, from /proc/meminfo (`None` if unreadable).
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kib| kib << 10)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

/// Maps anonymous memory for every range of `layout`. Guest RAM is mapped lazily, but more of it
/// than the host has could never be backed, so that is refused up front.
pub fn create_guest_memory(layout: &[RamRange]) -> Result<GuestMemory, MemoryError> {
    let requested: u64 = layout.iter().map(|r| r.size).sum();
    if let Some(available) = host_memory_bytes() {
        if requested > available {
            return Err(MemoryError::MoreThanHost {
                requested: requested >> 20,
                available: available >> 20,
            });
        }
    }
    let mut ranges = Vec::with_capacity(layout.len());
    for range in layout {
        let size = usize::try_from(range.size).map_err(|_| MemoryError::TooLarge {
            start: range.start,
            size: range.size,
        })?;
        ranges.push((GuestAddress(range.start), size));
    }
    let total: u64 = layout.iter().map(|r| r.size).sum();
    let memory = GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        size: total >> 20,
        source,
    })?;
    prefer_huge_pages(&memory);
    Ok(memory)
}

/// Asks for transparent huge pages under guest RAM, as QEMU and Cloud Hypervisor do: one fault
/// backs 2 MiB instead of 4 KiB, which is most of a destination's cost of landing RAM in fresh
/// memory (measured here: a 1 GiB guest half full of data migrated in 185 ms instead of 405),
/// and the guest's TLB reaches further (KVM maps a huge page only where host and guest
/// addresses agree modulo 2 MiB: Linux aligns mappings this large since 6.7). Dirty logging
/// still works per 4 KiB page. A host with THP set to `never` keeps small pages; that only costs
/// speed.
fn prefer_huge_pages(memory: &GuestMemory) {
    for region in memory.iter() {
        // SAFETY: the range is the region's own mapping, which `memory` keeps mapped, and it
        // was only just created: no vCPU or device writes it while the slice lives.
        let slice = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        if let Err(error) = advise_huge_pages(slice) {
            tracing::debug!(gpa = region.start_addr().0, %error, "guest RAM stays on small pages");
        }
    }
}

/// Asks for transparent huge pages under the whole pages of `memory` (the benchmark's stand-in
/// for a destination's RAM backs itself the same way).
pub fn advise_huge_pages(memory: &[u8]) -> std::io::Result<()> {
    let page = PAGE_SIZE as usize;
    let start = (memory.as_ptr() as usize).next_multiple_of(page);
    let end = (memory.as_ptr() as usize + memory.len()) / page * page;
    if end <= start {
        return Ok(());
    }
    // SAFETY: the range lies within `memory`, page-aligned; MADV_HUGEPAGE changes how the kernel
    // backs it, never its contents.
    let result =
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How much one [`populate_write`] call should back: a huge page's worth. Small enough that a
/// thread doing it in a loop sees a stop within a few ms (cold fresh memory is backed at
/// 0.4-1.5 GiB/s on this host), and that several threads share the work evenly.
pub const POPULATE_CHUNK: usize = 2 << 20;

/// Backs `[host, host + len)` with host memory, as a write that stores nothing would: contents
/// stay as they are. `EINVAL` means a kernel before 5.14, without `MADV_POPULATE_WRITE`.
///
/// # Safety
///
/// The range must be mapped, writable memory.
pub unsafe fn populate_write(host: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the range; MADV_POPULATE_WRITE changes how it is backed,
    // never what it holds.
    let result = unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes and clears the record of ferry's own writes into one region, ORing it into `into`:
/// one bit per page (bit `i` of word `i / 64` is the page at `region start + i * PAGE_SIZE`).
pub fn take_vmm_writes(region: &GuestRegion, into: &mut [u64]) {
    let mapping: &vm_memory::MmapRegion<WriteLog> = region;
    mapping.bitmap().take_into(into);
}

/// [`take_vmm_writes`] into a bitmap of its own.
#[cfg(test)]
pub fn take_vmm_dirty_bitmap(region: &GuestRegion) -> Vec<u64> {
    let mut bits = vec![0; (region.len() / PAGE_SIZE).div_ceil(64) as usize];
    take_vmm_writes(region, &mut bits);
    bits
}

/// One bit per page of `len` bytes at `host` (bit `i` of word `i / 64`), set where the host
/// backs the page, in RAM or in swap. /proc/self/pagemap tells both; mincore(2) would miss
/// swapped-out pages, and those hold data. The map is read in chunks, so a large guest costs
/// one bit per page, not the 8 bytes of a pagemap entry.
fn residency(host: *const u8, len: usize) -> std::io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const CHUNK_PAGES: usize = 1 << 15;
    let pages = len.div_ceil(PAGE_SIZE as usize);
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let first = host as u64 / PAGE_SIZE;
    let mut bits = vec![0u64; pages.div_ceil(64)];
    let mut entries = vec![0u8; CHUNK_PAGES.min(pages) * 8];
    for start in (0..pages).step_by(CHUNK_PAGES) {
        let count = CHUNK_PAGES.min(pages - start);
        let chunk = &mut entries[..count * 8];
        pagemap.read_exact_at(chunk, (first + start as u64) * 8)?;
        for (offset, entry) in chunk.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if entry & (PRESENT | SWAPPED) != 0 {
                let page = start + offset;
                bits[page / 64] |= 1 << (page % 64);
            }
        }
    }
    Ok(bits)
}

/// Which pages of a region the host has ever backed, one bit per page like the dirty bitmaps.
/// A page it never backed is known to be zero without reading it, which is what makes an idle
/// guest's first migration pass cheap. On huge pages a touched page backs its whole 2 MiB, and
/// khugepaged may back zeros too: more pages are read, none is skipped wrongly.
pub fn resident_bitmap(region: &GuestRegion) -> std::io::Result<Vec<u64>> {
    let mapping: &vm_memory::MmapRegion<WriteLog> = region;
    residency(mapping.as_ptr(), region.len() as usize)
}

/// Which pages of `[gpa, gpa + pages * 4 KiB)`, which must lie in one RAM region, the host
/// backs, as bits like [`resident_bitmap`]'s; `None` if the range is not RAM.
pub fn resident_pages(memory: &GuestMemory, gpa: u64, pages: u64) -> Option<Vec<u64>> {
    let slice = ram_slice(memory, gpa, pages)?;
    residency(slice.ptr_guard().as_ptr(), slice.len()).ok()
}

/// Guest RAM with its part of the record of ferry's writes.
pub type RamSlice<'a> = vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, WriteLog>>;

/// `pages` pages of RAM from `gpa`, if they lie in one mapped region of `memory` (which
/// `get_slice` checks).
pub fn ram_slice(memory: &GuestMemory, gpa: u64, pages: u64) -> Option<RamSlice<'_>> {
    let len = usize::try_from(pages.checked_mul(PAGE_SIZE)?).ok()?;
    memory.get_slice(GuestAddress(gpa), len).ok()
}

/// Which pages of `[gpa, gpa + pages * 4 KiB)`, which must lie in one RAM region, ferry has
/// written (through vm-memory, or marked as written), as bits like [`resident_bitmap`]'s;
/// `None` if the range is not RAM.
pub fn written_pages(memory: &GuestMemory, gpa: u64, pages: u64) -> Option<Vec<u64>> {
    let slice = ram_slice(memory, gpa, pages)?;
    let written = slice.bitmap();
    let mut bits = vec![0u64; (pages as usize).div_ceil(64)];
    for page in 0..pages as usize {
        if written.dirty_at(page * PAGE_SIZE as usize) {
            bits[page / 64] |= 1 << (page % 64);
        }
    }
    Some(bits)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn small_guest_is_all_low() {
        assert_eq!(
            ram_layout(512 << 20),
            vec![RamRange {
                start: 0,
                size: 512 << 20
            }]
        );
        assert_eq!(ram_layout(0xB000_0000 - 4096).len(), 1);
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let layout = ram_layout(4 << 30);
        assert_eq!(
            layout,
            vec![
                RamRange {
                    start: 0,
                    size: 2 << 30
                },
                RamRange {
                    start: 4 << 30,
                    size: 2 << 30
                },
            ]
        );
        assert_eq!(low_ram_end(&layout), 2 << 30);
        let at_threshold = ram_layout(0xB000_0000);
        assert_eq!(at_threshold[0].size, 0x8000_0000);
        assert_eq!(at_threshold[1].size, 0x3000_0000);
    }

    #[test]
    fn untouched_pages_are_not_resident() {
        let memory = create_guest_memory(&ram_layout(16 << 20)).unwrap();
        memory.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        memory.write_obj(1u8, GuestAddress(0x10_0000)).unwrap();
        let region = memory.iter().next().unwrap();
        let resident = resident_bitmap(region).unwrap();
        assert_eq!(resident.len(), 64);
        let pages: Vec<usize> = (0..4096)
            .filter(|i| resident[i / 64] & (1 << (i % 64)) != 0)
            .collect();
        assert!(pages.contains(&3) && pages.contains(&0x100), "{pages:x?}");
        // A touched page may bring in the rest of its 2 MiB huge page, never more: the pages
        // from 4 MiB on lie outside any huge page that holds the two written ones.
        assert!(pages.iter().all(|page| *page < 0x400), "{pages:x?}");
    }

    #[test]
    fn vmm_writes_are_recorded_once() {
        let memory = create_guest_memory(&ram_layout(16 << 20)).unwrap();
        memory.write_obj(0xdead_u32, GuestAddress(0x5000)).unwrap();
        memory
            .write_slice(&[1u8; 8192], GuestAddress(0x10800))
            .unwrap();
        let region = memory.iter().next().unwrap();
        let bits = take_vmm_dirty_bitmap(region);
        let dirty: Vec<usize> = (0..bits.len() * 64)
            .filter(|i| bits[i / 64] & (1 << (i % 64)) != 0)
            .collect();
        assert_eq!(dirty, vec![5, 0x10, 0x11, 0x12]);
        assert!(take_vmm_dirty_bitmap(region).iter().all(|w| *w == 0));
    }
}
