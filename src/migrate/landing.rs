//! On the destination: putting received pages into guest RAM. A PAGES frame's data goes from
//! the socket straight into the guest's pages with readv, without a buffer in between: on a
//! receiver that also has to back every page with fresh host memory, a second copy of each
//! page was a cost the source's side of the link does not have.

use std::future::poll_fn;
use std::io::IoSliceMut;

use vm_memory::{Bytes, GuestAddress};

use super::ranges::{push_page, Cursor};
use super::transport::BoxedStream;
use super::wire::{PageEntry, WireError};
use crate::machine::memory::{
    ram_slice, resident_pages, written_pages, GuestMemory, RamSlice, PAGE_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum LandingError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("malformed stream: {0}")]
    Protocol(String),
    #[error("{0}")]
    Local(String),
}

/// How much page data a receiver reads before it lets the runtime's other tasks run.
const YIELD_EVERY: usize = 1 << 20;

/// Receives the page data of PAGES frames, reusing its list of target ranges.
pub struct Landing {
    memory: GuestMemory,
    /// Where the frame's data goes: (host address, length), adjacent pages merged.
    ranges: Vec<(usize, usize)>,
    /// Page data read since the last yield to the runtime, across frames.
    unyielded: usize,
}

impl Landing {
    pub fn new(memory: GuestMemory) -> Self {
        Self {
            memory,
            ranges: Vec::new(),
            unyielded: 0,
        }
    }

    /// Reads the `data_len` bytes of page data that follow `entries` on `stream` into guest
    /// RAM and clears the zero pages; returns the size of the frame's payload. Every address
    /// is checked against RAM before a byte lands.
    pub async fn receive(
        &mut self,
        stream: &BoxedStream,
        entries: &[PageEntry],
        data_len: usize,
    ) -> Result<u64, LandingError> {
        self.ranges.clear();
        for entry in entries {
            let page = page(&self.memory, entry.gpa)?;
            if entry.zero {
                continue;
            }
            push_page(&mut self.ranges, page.ptr_guard_mut().as_ptr() as usize);
        }
        let expected: usize = self.ranges.iter().map(|(_, len)| len).sum();
        if expected != data_len {
            return Err(LandingError::Protocol(format!(
                "{data_len} bytes of page data for {expected} bytes of pages"
            )));
        }
        self.read_ranges(stream).await?;
        for entry in entries.iter().filter(|e| e.zero) {
            zero_page(&self.memory, GuestAddress(entry.gpa))?;
        }
        Ok(8 + entries.len() as u64 * 8 + data_len as u64)
    }

    /// Fills `ranges` from the stream, one readv per batch of data the socket holds.
    async fn read_ranges(&mut self, stream: &BoxedStream) -> Result<(), LandingError> {
        let mut cursor = Cursor::new(&self.ranges);
        while !cursor.is_done() {
            // While the socket holds data no read returns pending, and a copy into fresh memory
            // runs at 0.4-3 GiB/s here: two lanes would keep both of the runtime's threads for
            // as long as data is buffered, the control link would go unread, and a cancel would
            // be heard (and the lanes aborted) tens of ms late, with a source on this host
            // waiting for a core meanwhile.
            if self.unyielded >= YIELD_EVERY {
                self.unyielded = 0;
                tokio::task::yield_now().await;
            }
            poll_fn(|cx| stream.poll_read_ready(cx))
                .await
                .map_err(WireError::from)?;
            let mut buffers: Vec<IoSliceMut<'_>> = cursor
                .iovecs()
                .iter()
                .map(|iovec| {
                    // SAFETY: every range is whole pages of guest RAM (checked by `page`),
                    // which `memory` keeps mapped. The guest does not run while it is being
                    // received, and nothing else in this process touches those pages meanwhile.
                    IoSliceMut::new(unsafe {
                        std::slice::from_raw_parts_mut(iovec.iov_base.cast::<u8>(), iovec.iov_len)
                    })
                })
                .collect();
            match stream.try_read_vectored(&mut buffers) {
                Ok(0) => return Err(WireError::Closed.into()),
                Ok(read) => {
                    cursor.advance(read);
                    self.unyielded += read;
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(WireError::from(error).into()),
            }
        }
        Ok(())
    }
}

/// Guest page `gpa`, which must lie wholly in RAM.
fn page(memory: &GuestMemory, gpa: u64) -> Result<RamSlice<'_>, LandingError> {
    ram_slice(memory, gpa, 1)
        .ok_or_else(|| LandingError::Protocol(format!("page {gpa:#x} is outside this VM's RAM")))
}

/// Makes every page of the runs zero; pages the host never backed already are, and stay
/// unallocated. On RAM that was `preallocated` every page is backed, and, as long as the guest
/// has not run here (KVM's writes bypass ferry's write log), zero unless ferry wrote it through
/// `GuestMemory` (firmware tables at launch). Pages that [`Landing::receive`] lands with
/// `readv` bypass that log too: zero runs come before any of them, and the destination refuses
/// them later. Returns the number of pages.
pub fn write_zero_runs(
    memory: &GuestMemory,
    runs: &[(u64, u64)],
    preallocated: bool,
) -> Result<u64, LandingError> {
    let mut total = 0;
    for &(gpa, pages) in runs {
        let may_hold_data = if preallocated {
            written_pages(memory, gpa, pages)
        } else {
            resident_pages(memory, gpa, pages)
        };
        let may_hold_data = may_hold_data.ok_or_else(|| {
            LandingError::Protocol(format!(
                "zero run of {pages} pages at {gpa:#x} is outside this VM's RAM"
            ))
        })?;
        for index in 0..pages {
            if may_hold_data[(index / 64) as usize] & (1 << (index % 64)) != 0 {
                zero_page(memory, GuestAddress(gpa + index * PAGE_SIZE))?;
            }
        }
        total += pages;
    }
    Ok(total)
}

/// Zeroes one page unless it already is zero (reading an untouched page does not allocate it;
/// writing would).
fn zero_page(memory: &GuestMemory, address: GuestAddress) -> Result<(), LandingError> {
    let mut current = [0u8; PAGE_SIZE as usize];
    memory
        .read_slice(&mut current, address)
        .map_err(|e| LandingError::Local(e.to_string()))?;
    if current.iter().any(|b| *b != 0) {
        memory
            .write_slice(&[0u8; PAGE_SIZE as usize], address)
            .map_err(|e| LandingError::Local(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    /// On preallocated RAM every page is resident: only ferry's write log says which pages a
    /// zero run must clear, those ferry wrote through `GuestMemory` before the migration
    /// (firmware tables at launch). (The RAM here is not preallocated: `preallocated: true` is
    /// what makes the difference.)
    #[test]
    fn a_zero_run_clears_what_ferry_wrote_into_preallocated_ram() {
        let memory =
            GuestMemory::from_ranges(&[(GuestAddress(0), 64 * PAGE_SIZE as usize)]).unwrap();
        for page in [3u64, 4, 9] {
            memory
                .write_slice(&[0xa5; PAGE_SIZE as usize], GuestAddress(page * PAGE_SIZE))
                .unwrap();
        }
        assert_eq!(
            memory.read_obj::<u8>(GuestAddress(4 * PAGE_SIZE)).unwrap(),
            0xa5
        );

        write_zero_runs(&memory, &[(2 * PAGE_SIZE, 4), (9 * PAGE_SIZE, 1)], true).unwrap();
        for page in [3u64, 4, 9] {
            let mut data = [0xffu8; PAGE_SIZE as usize];
            memory
                .read_slice(&mut data, GuestAddress(page * PAGE_SIZE))
                .unwrap();
            assert!(data.iter().all(|&b| b == 0), "page {page} kept its data");
        }
    }
}
