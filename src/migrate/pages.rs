//! Sending guest pages: frames of up to [`MAX_PAGES_PER_FRAME`] pages, zero pages as markers
//! without data, paced to `max-bandwidth`.

use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::RegionBitmap;
use super::lanes::{LaneError, SourceLanes};
use super::link::Link;
use super::pacing::Pacer;
use super::wire::{self, Message, PageEntry, WireError, MAX_PAGES_PER_FRAME, MAX_ZERO_RUNS};
use super::Shared;
use crate::machine::memory::{ram_slice, resident_bitmap, GuestMemory, PAGE_SIZE};

/// What one call of [`PageSender::send`] did.
pub struct SendStats {
    pub pages: u64,
    pub bytes: u64,
}

/// Why pages could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("cannot read guest page {gpa:#x}: {reason}")]
    Read { gpa: u64, reason: String },
    #[error("{0}")]
    Lane(#[from] LaneError),
}

/// Turns dirty bitmaps into PAGES frames, reusing its buffers from round to round.
pub struct PageSender {
    memory: GuestMemory,
    /// Whether `max-bandwidth` applies: not once the guest is paused, when every millisecond
    /// is downtime (QEMU lifts its limit for the completion too).
    paced: bool,
    pacer: Pacer,
    entries: Vec<PageEntry>,
    /// Host addresses of the frame's non-zero pages, in guest memory itself: they go to the
    /// socket from there, by reference where the host allows (see `splice`).
    pages: Vec<usize>,
    /// The PAGES frame's tag, length and page list; the pages follow it on the wire.
    head: Vec<u8>,
    /// Extra connections that carry the frames instead of the control link, if any.
    lanes: Option<SourceLanes>,
}

impl PageSender {
    pub fn new(memory: GuestMemory) -> Self {
        Self {
            memory,
            paced: true,
            pacer: Pacer::default(),
            entries: Vec::with_capacity(capacity()),
            pages: Vec::with_capacity(capacity()),
            head: frame_head(),
            lanes: None,
        }
    }

    /// Sends every frame from now on over `lanes`, in turn.
    pub fn use_lanes(&mut self, lanes: SourceLanes) {
        self.lanes = Some(lanes);
    }

    /// Everything sent so far reaches the destination before what the control link sends
    /// next: with lanes, a mark on each, which the destination waits for at the next SYNC or
    /// STATE.
    pub async fn mark(&mut self) -> Result<(), PageError> {
        if let Some(lanes) = self.lanes.as_mut() {
            lanes.mark().await?;
        }
        Ok(())
    }

    /// Waits until the lanes have written every mark handed to them (see
    /// [`SourceLanes::marks_written`]); nothing to wait for without lanes.
    pub async fn marks_written(&mut self) -> Result<(), PageError> {
        if let Some(lanes) = self.lanes.as_mut() {
            lanes.marks_written().await?;
        }
        Ok(())
    }

    /// Sends at full speed from now on, whatever `max-bandwidth` says.
    pub fn stop_pacing(&mut self) {
        self.paced = false;
    }

    /// Sends the pages set in `pages` that the host never backed as zero runs, without reading
    /// them (the first pass over an idle guest reads almost nothing); returns the others, still
    /// to send, and what the runs took.
    pub async fn send_untouched(
        &mut self,
        link: &mut Link,
        pages: &[RegionBitmap],
        shared: &Shared,
    ) -> Result<(Vec<RegionBitmap>, SendStats), PageError> {
        let mut present = Vec::with_capacity(pages.len());
        let mut runs = Vec::new();
        for (region, bitmap) in self.memory.iter().zip(pages) {
            let resident = resident_bitmap(region).map_err(|e| PageError::Read {
                gpa: region.start_addr().0,
                reason: format!("cannot tell which pages are in use: {e}"),
            })?;
            let (touched, untouched) = bitmap.split(&resident);
            runs.extend(untouched.runs());
            present.push(touched);
        }
        let mut zero_bytes = 0;
        for chunk in runs.chunks(MAX_ZERO_RUNS as usize) {
            let frame = wire::encode_message(&Message::Zeros(chunk.to_vec()))?;
            link.write_frames(&frame).await?;
            let pages: u64 = chunk.iter().map(|(_, count)| count).sum();
            zero_bytes += frame.len() as u64;
            let mut progress = shared.progress();
            progress.transferred += frame.len() as u64;
            progress.duplicate += pages;
            progress.remaining_pages = progress.remaining_pages.saturating_sub(pages);
        }
        let stats = SendStats {
            pages: runs.iter().map(|(_, count)| count).sum(),
            bytes: zero_bytes,
        };
        Ok((present, stats))
    }

    /// Sends every page set in `pages`, keeping `shared`'s counters current.
    pub async fn send(
        &mut self,
        link: &mut Link,
        pages: &[RegionBitmap],
        shared: &Shared,
    ) -> Result<SendStats, PageError> {
        let started = Instant::now();
        let mut stats = SendStats { pages: 0, bytes: 0 };
        for bitmap in pages {
            let base = self.host_base(bitmap)?;
            for gpa in bitmap.addresses() {
                let host = base + (gpa - bitmap.start) as usize;
                // SAFETY: `host_base` checked that the bitmap's pages are mapped guest RAM,
                // which `memory` keeps mapped. The guest may write a page meanwhile; a page it
                // changes after this read is dirty again and goes again in the next round (or,
                // paused, cannot change).
                let zero = is_zero(unsafe {
                    std::slice::from_raw_parts(host as *const u8, PAGE_SIZE as usize)
                });
                if !zero {
                    self.pages.push(host);
                }
                self.entries.push(PageEntry { gpa, zero });
                if self.entries.len() == MAX_PAGES_PER_FRAME as usize {
                    self.flush(link, shared, &mut stats, started).await?;
                }
            }
        }
        self.flush(link, shared, &mut stats, started).await?;
        Ok(stats)
    }

    async fn flush(
        &mut self,
        link: &mut Link,
        shared: &Shared,
        stats: &mut SendStats,
        started: Instant,
    ) -> Result<(), PageError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let data_len = self.pages.len() * PAGE_SIZE as usize;
        wire::encode_pages_head(&mut self.head, &self.entries, data_len);
        let frame_len = (self.head.len() + data_len) as u64;
        if self.paced {
            let cap = || shared.params().max_bandwidth;
            self.pacer.wait(frame_len, cap).await;
        }
        match self.lanes.as_mut() {
            Some(lanes) => {
                let head = std::mem::replace(&mut self.head, frame_head());
                let pages = std::mem::replace(&mut self.pages, Vec::with_capacity(capacity()));
                // SAFETY: `host_base` checked that every page lies in `memory`, the guest RAM
                // the lanes were opened with.
                unsafe { lanes.send_frame(head, pages) }.await?;
            }
            // `host_base` checked every address, and `memory` keeps them mapped.
            None => link.write_pages_frame(&self.head, &self.pages).await?,
        }
        let zero = self.entries.iter().filter(|e| e.zero).count() as u64;
        let count = self.entries.len() as u64;
        stats.pages += count;
        stats.bytes += frame_len;
        {
            let mut progress = shared.progress();
            progress.transferred += frame_len;
            progress.duplicate += zero;
            progress.normal += count - zero;
            progress.remaining_pages = progress.remaining_pages.saturating_sub(count);
            let elapsed = started.elapsed();
            // Keep `mbps` current during long rounds; short bursts say little about the link.
            if elapsed >= Duration::from_millis(50) {
                progress.bandwidth = stats.bytes as f64 / elapsed.as_secs_f64();
            }
        }
        self.entries.clear();
        self.pages.clear();
        // Reading and checking a frame's pages is work without an await; when the socket
        // takes every frame at once, this is where `migrate_cancel` gets its turn.
        tokio::task::yield_now().await;
        Ok(())
    }
}

impl PageSender {
    /// The host address of the first page `bitmap` covers; all of them must lie in one
    /// mapped region of guest RAM, so the others follow it (looked up once, not per page).
    fn host_base(&self, bitmap: &RegionBitmap) -> Result<usize, PageError> {
        let slice =
            ram_slice(&self.memory, bitmap.start, bitmap.pages).ok_or_else(|| PageError::Read {
                gpa: bitmap.start,
                reason: format!("{} pages from it are not in one RAM region", bitmap.pages),
            })?;
        Ok(slice.ptr_guard().as_ptr() as usize)
    }
}

/// Pages in a full frame.
fn capacity() -> usize {
    MAX_PAGES_PER_FRAME as usize
}

/// A buffer that holds a full frame's head: tag, length and one entry per page.
fn frame_head() -> Vec<u8> {
    Vec::with_capacity(capacity() * 8 + 16)
}

/// Whether a page is all zeros; OR-folding whole words lets the compiler vectorise it.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|chunk| {
        chunk.chunks_exact(8).fold(0u64, |acc, word| {
            acc | u64::from_ne_bytes(word.try_into().expect("8 bytes"))
        }) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[0] = 0x80;
        assert!(!is_zero(&page));
    }
}
