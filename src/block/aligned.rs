//! Page-aligned buffers, and the alignment O_DIRECT needs on an image.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::ptr::NonNull;

/// The alignment of every [`AlignedBuf`]: enough for O_DIRECT on any logical block size Linux
/// supports, so a buffer's address never needs checking.
pub const BUF_ALIGN: usize = 4096;

/// A zeroed, heap-allocated byte buffer aligned to [`BUF_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory with no thread affinity.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned memory.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zero bytes (at least one, so the layout is never empty).
    pub fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), BUF_ALIGN).expect("buffer size overflows isize")
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this same layout and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Smallest and largest logical block sizes O_DIRECT may demand.
const MIN_BLOCK: usize = 512;
const MAX_BLOCK: usize = 4096;

/// The offset and length alignment O_DIRECT I/O needs on `file`, opened with O_DIRECT: the
/// device's logical block size for a block device, otherwise the smallest read size the file
/// system accepts at offset 0.
pub(crate) fn direct_alignment(file: &File) -> io::Result<usize> {
    if file.metadata()?.file_type().is_block_device() {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to the pointer it is given.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
        if ret == 0 && size > 0 {
            return Ok(size as usize);
        }
    }
    let mut buf = AlignedBuf::new(MAX_BLOCK);
    let mut block = MIN_BLOCK;
    loop {
        match file.read_at(&mut buf[..block], 0) {
            Ok(_) => return Ok(block),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) && block < MAX_BLOCK => {
                block *= 2;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 512, 70_000] {
            let buf = AlignedBuf::new(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }
}
