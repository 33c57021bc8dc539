//! Disk images behind `-drive`: raw files or block devices, opened buffered or with O_DIRECT,
//! locked the way QEMU locks them.

mod aligned;
mod error;
mod lock;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

pub use aligned::{AlignedBuf, BUF_ALIGN};
pub use error::BlockError;
pub use lock::LockMode;

use crate::cli::{DriveConfig, DriveFormat};
use lock::LockState;

/// The unit of disk sizes and offsets in virtio-blk.
pub const SECTOR_SIZE: u64 = 512;

/// The largest piece `write_zeroes` writes at a time when the file system cannot zero a range.
const ZERO_CHUNK: usize = 1 << 20;

/// An open disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    id: String,
    path: PathBuf,
    readonly: bool,
    size: u64,
    /// Offsets and lengths of O_DIRECT I/O must be multiples of this; 1 for buffered images.
    align: u64,
    can_punch: bool,
    /// Cleared the first time the file system refuses FALLOC_FL_ZERO_RANGE.
    can_zero_range: AtomicBool,
    locks: LockState,
}

impl DiskImage {
    /// Opens the image of `drive`, takes the locks `mode` asks for, and probes what the file
    /// system supports.
    pub fn open(drive: &DriveConfig, mode: LockMode) -> Result<Self, BlockError> {
        let DriveFormat::Raw = drive.format;
        let id = drive.id.clone();
        let path = drive.file.clone();
        let mut options = File::options();
        options.read(true).write(!drive.readonly);
        if drive.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options
            .open(&path)
            .map_err(|source| BlockError::from_open(drive, source))?;
        let file_type = file
            .metadata()
            .map_err(|source| BlockError::Io {
                id: id.clone(),
                path: path.clone(),
                what: "inspect",
                source,
            })?
            .file_type();
        if file_type.is_dir() {
            return Err(BlockError::Directory { id, path });
        }
        let size = image_size(&file).map_err(|source| BlockError::Io {
            id: id.clone(),
            path: path.clone(),
            what: "find the size of",
            source,
        })?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::UnalignedSize { id, path, size });
        }
        let align = if drive.direct {
            let align = aligned::direct_alignment(&file).map_err(|source| BlockError::Io {
                id: id.clone(),
                path: path.clone(),
                what: "probe the O_DIRECT block size of",
                source,
            })? as u64;
            if size % align != 0 {
                return Err(BlockError::DirectSize {
                    id,
                    path,
                    size,
                    align,
                });
            }
            align
        } else {
            1
        };
        let can_punch = !drive.readonly && probe_punch(&file, size);
        let mut image = Self {
            file,
            id,
            path,
            readonly: drive.readonly,
            size,
            align,
            can_punch,
            can_zero_range: AtomicBool::new(!drive.readonly),
            locks: LockState::default(),
        };
        image.set_lock_mode(mode)?;
        tracing::debug!(
            id = %image.id,
            path = %image.path.display(),
            size,
            align,
            can_punch,
            "opened disk image"
        );
        Ok(image)
    }

    /// Switches the image's locks to `mode`. On failure the previous locks stay in place.
    pub fn set_lock_mode(&mut self, mode: LockMode) -> Result<(), BlockError> {
        let wanted = LockState::for_mode(mode, self.readonly);
        lock::switch(&self.file, self.locks, wanted)
            .map_err(|failure| BlockError::from_lock(&self.id, &self.path, failure))?;
        self.locks = wanted;
        Ok(())
    }

    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The block size requests should be aligned to for the best speed: O_DIRECT's logical block
    /// size, or a sector for buffered images (which accept any alignment).
    pub fn block_size(&self) -> u32 {
        self.align.max(SECTOR_SIZE) as u32
    }

    /// Whether [`discard`](Self::discard) frees space (the file system can punch holes).
    pub fn supports_discard(&self) -> bool {
        self.can_punch
    }

    /// Whether [`write_zeroes`](Self::write_zeroes) works: on every writable image, since it
    /// falls back to writing zeroes.
    pub fn supports_write_zeroes(&self) -> bool {
        !self.readonly
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of a shrunk file read as zero.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.is_aligned(offset, buf) {
            return read_full(&self.file, offset, buf);
        }
        let (start, mut bounce) = self.bounce_for(offset, buf.len());
        read_full(&self.file, start, &mut bounce)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes `buf` at `offset`. Unaligned O_DIRECT writes read, patch and write whole blocks.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        if self.is_aligned(offset, buf) {
            return self.file.write_all_at(buf, offset);
        }
        let (start, mut bounce) = self.bounce_for(offset, buf.len());
        let skip = (offset - start) as usize;
        let end = skip + buf.len();
        // Only a partly covered first or last block holds bytes the write must keep.
        let align = self.align as usize;
        if skip % align != 0 {
            read_full(&self.file, start, &mut bounce[..align])?;
        }
        let tail = bounce.len() - align;
        if end % align != 0 && (tail > 0 || skip % align == 0) {
            read_full(&self.file, start + tail as u64, &mut bounce[tail..])?;
        }
        bounce[skip..end].copy_from_slice(buf);
        self.file.write_all_at(&bounce, start)
    }

    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Tells the file system that `len` bytes at `offset` are no longer needed; they read as
    /// zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if !self.can_punch {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Makes `len` bytes at `offset` read as zeroes, freeing their space when `may_unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        if may_unmap && self.can_punch {
            return self.discard(offset, len);
        }
        if self.can_zero_range.load(Ordering::Relaxed) {
            let zeroed = fallocate(
                &self.file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
            match zeroed {
                Err(err) if is_unsupported(&err) => {
                    tracing::debug!(id = %self.id, "file system cannot zero ranges; writing zeroes");
                    self.can_zero_range.store(false, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        let chunk = AlignedBuf::new(ZERO_CHUNK.min(len as usize));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(offset + done, &chunk[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    fn is_aligned(&self, offset: u64, buf: &[u8]) -> bool {
        let align = self.align;
        align == 1
            || (offset % align == 0
                && buf.len() as u64 % align == 0
                && buf.as_ptr() as usize % BUF_ALIGN == 0)
    }

    /// The aligned start of the blocks covering `len` bytes at `offset`, and a buffer for them.
    fn bounce_for(&self, offset: u64, len: usize) -> (u64, AlignedBuf) {
        let align = self.align;
        let start = offset / align * align;
        let end = (offset + len as u64).div_ceil(align) * align;
        (start, AlignedBuf::new((end - start) as usize))
    }
}

fn image_size(file: &File) -> io::Result<u64> {
    // SAFETY: lseek on an open fd has no memory effects.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// Reads all of `buf`, zero-filling what lies past the end of the file.
fn read_full(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: fallocate on an open fd has no memory effects.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

/// Whether the file system punches holes, tried past the end of the image where it changes
/// nothing (KEEP_SIZE keeps the file's size).
fn probe_punch(file: &File, size: u64) -> bool {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, mode, size, SECTOR_SIZE) {
        Ok(()) => true,
        Err(err) => {
            tracing::debug!(%err, "the image's file system cannot punch holes; no discard");
            false
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
