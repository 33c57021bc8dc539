//! The set of guest pages that must (still) be sent: KVM's dirty log of guest writes OR ferry's
//! own record of its writes, accumulated in a pending set that only sending empties.
//!
//! A bitmap taken out for sending goes back into the pending set if the send does not finish,
//! so a consumed dirty log is never lost.

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::machine::memory::{take_vmm_writes, GuestMemory, PAGE_SIZE};
use crate::machine::write_log::BitIter;

/// Dirty pages of one RAM region: bit `i` of word `i / 64` is the page at `start + i * 4 KiB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionBitmap {
    pub start: u64,
    pub pages: u64,
    pub words: Vec<u64>,
}

impl RegionBitmap {
    fn empty(start: u64, pages: u64) -> Self {
        Self {
            start,
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    fn full(start: u64, pages: u64) -> Self {
        let mut bitmap = Self::empty(start, pages);
        for (index, word) in bitmap.words.iter_mut().enumerate() {
            let first = index as u64 * 64;
            let bits = (pages - first).min(64);
            *word = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
        }
        bitmap
    }

    fn merge(&mut self, other: &[u64]) {
        for (word, bits) in self.words.iter_mut().zip(other) {
            *word |= bits;
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Guest-physical addresses of the set pages, ascending.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(move |(index, &word)| {
                let base = self.start + index as u64 * 64 * PAGE_SIZE;
                BitIter(word).map(move |bit| base + u64::from(bit) * PAGE_SIZE)
            })
    }

    /// Splits the set pages into those whose bit in `mask` is set and those whose bit is not.
    pub fn split(&self, mask: &[u64]) -> (RegionBitmap, RegionBitmap) {
        let mut inside = RegionBitmap::empty(self.start, self.pages);
        let mut outside = RegionBitmap::empty(self.start, self.pages);
        for (index, word) in self.words.iter().enumerate() {
            let mask = mask.get(index).copied().unwrap_or(0);
            inside.words[index] = word & mask;
            outside.words[index] = word & !mask;
        }
        (inside, outside)
    }

    /// The set pages as runs of consecutive pages: (first address, page count), ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for gpa in self.addresses() {
            match runs.last_mut() {
                Some((start, count)) if *start + *count * PAGE_SIZE == gpa => *count += 1,
                _ => runs.push((gpa, 1)),
            }
        }
        runs
    }

    /// Sets the bit of the page at `gpa`, which must be in this region.
    pub fn set(&mut self, gpa: u64) {
        let page = (gpa - self.start) / PAGE_SIZE;
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read KVM's dirty log of memory slot {slot}: {source}")]
pub struct DirtyLogError {
    slot: u32,
    #[source]
    source: kvm_ioctls::Error,
}

/// The pages still to send, per RAM region (in KVM slot order).
pub struct DirtyTracker {
    pending: Vec<RegionBitmap>,
}

impl DirtyTracker {
    /// A tracker whose pending set is all of RAM: the first pass sends everything, so ferry's
    /// record of its own writes until now is taken into it, and so cleared.
    pub fn all_pending(memory: &GuestMemory) -> Self {
        let pending = memory
            .iter()
            .map(|region| {
                let pages = region.len() / PAGE_SIZE;
                let mut bitmap = RegionBitmap::full(region.start_addr().0, pages);
                take_vmm_writes(region, &mut bitmap.words);
                bitmap
            })
            .collect();
        Self { pending }
    }

    /// Pages pending now.
    pub fn pending_pages(&self) -> u64 {
        self.pending.iter().map(RegionBitmap::count).sum()
    }

    /// Adds the pages the guest (KVM's log) and ferry (its write log) wrote since the last
    /// sync; returns the pages now pending.
    pub fn sync(&mut self, vm: &VmFd, memory: &GuestMemory) -> Result<u64, DirtyLogError> {
        for (slot, (region, pending)) in memory.iter().zip(&mut self.pending).enumerate() {
            let slot = slot as u32;
            let guest = vm
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| DirtyLogError { slot, source })?;
            pending.merge(&guest);
            take_vmm_writes(region, &mut pending.words);
        }
        Ok(self.pending_pages())
    }

    /// Takes the pending set out for sending, leaving it empty.
    pub fn take(&mut self) -> Vec<RegionBitmap> {
        self.pending
            .iter_mut()
            .map(|p| std::mem::replace(p, RegionBitmap::empty(p.start, p.pages)))
            .collect()
    }

    /// Puts pages that were taken but not sent back into the pending set.
    pub fn give_back(&mut self, unsent: &[RegionBitmap]) {
        for (pending, bitmap) in self.pending.iter_mut().zip(unsent) {
            pending.merge(&bitmap.words);
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::machine::memory::take_vmm_dirty_bitmap;

    /// Round 0 sends all of RAM, so what ferry wrote before it must not come back as dirty at
    /// the first sync.
    #[test]
    fn a_tracker_of_all_ram_clears_ferrys_earlier_writes() {
        let memory =
            GuestMemory::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE as usize)]).unwrap();
        memory.write_obj(1u8, GuestAddress(5 * PAGE_SIZE)).unwrap();
        let tracker = DirtyTracker::all_pending(&memory);
        assert_eq!(tracker.pending_pages(), 16);
        let region = memory.iter().next().unwrap();
        assert!(take_vmm_dirty_bitmap(region).iter().all(|w| *w == 0));
    }

    #[test]
    fn full_bitmap_covers_exactly_the_region() {
        let bitmap = RegionBitmap::full(0x1000_0000, 130);
        assert_eq!(bitmap.count(), 130);
        let addresses: Vec<u64> = bitmap.addresses().collect();
        assert_eq!(addresses.len(), 130);
        assert_eq!(addresses[0], 0x1000_0000);
        assert_eq!(addresses[129], 0x1000_0000 + 129 * 4096);
    }

    #[test]
    fn runs_across_empty_words_are_not_merged() {
        // StratoVirt's bug: a run ending at bit 63, an empty word, then bit 0 of the next word.
        let mut bitmap = RegionBitmap::empty(0, 192);
        bitmap.words = vec![1 << 63, 0, 1];
        let pages: Vec<u64> = bitmap.addresses().map(|a| a / 4096).collect();
        assert_eq!(pages, vec![63, 128]);
    }

    #[test]
    fn split_and_runs() {
        let mut bitmap = RegionBitmap::full(0x10_0000, 130);
        bitmap.words[1] &= !(1 << 5);
        let (inside, outside) = bitmap.split(&[0b1111, 0, u64::MAX]);
        assert_eq!(
            inside.runs(),
            vec![(0x10_0000, 4), (0x10_0000 + 128 * 4096, 2)]
        );
        assert_eq!(
            outside.runs(),
            vec![(0x10_0000 + 4 * 4096, 65), (0x10_0000 + 70 * 4096, 58)]
        );
        assert_eq!(inside.count() + outside.count(), 129);
    }

    #[test]
    fn taken_pages_come_back_when_not_sent() {
        let mut tracker = DirtyTracker {
            pending: vec![RegionBitmap::empty(0, 128)],
        };
        tracker.pending[0].set(5 * 4096);
        tracker.pending[0].set(70 * 4096);
        let taken = tracker.take();
        assert_eq!(tracker.pending_pages(), 0);
        tracker.pending[0].set(9 * 4096);
        tracker.give_back(&taken);
        let pages: Vec<u64> = tracker.pending[0].addresses().map(|a| a / 4096).collect();
        assert_eq!(pages, vec![5, 9, 70]);
    }
}
