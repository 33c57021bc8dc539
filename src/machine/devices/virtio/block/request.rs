//! One virtio-blk request: a 16-byte header the device reads, data in the direction the type
//! says, and a status byte at the very end of the device-writable part.

use std::io::{self, Read, Write};

use virtio_bindings::virtio_blk as blk;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;

use super::{BlockDevice, MAX_ZERO_SECTORS, MAX_ZERO_SEGMENTS};
use crate::block::SECTOR_SIZE;
use crate::machine::memory::GuestMemory;

/// `struct virtio_blk_outhdr`.
const HEADER_SIZE: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`.
const SEGMENT_SIZE: usize = 16;

/// Why a request failed, and so which status the driver sees.
#[derive(Debug)]
enum Rejection {
    /// The request breaks the protocol or the disk's limits (VIRTIO_BLK_S_IOERR).
    Invalid(&'static str),
    /// The image could not do what was asked (VIRTIO_BLK_S_IOERR).
    Host(&'static str, io::Error),
    /// The device does not do this (VIRTIO_BLK_S_UNSUPP).
    Unsupported(&'static str),
}

impl Rejection {
    fn status(&self) -> u8 {
        match self {
            Self::Invalid(_) | Self::Host(..) => blk::VIRTIO_BLK_S_IOERR as u8,
            Self::Unsupported(_) => blk::VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

impl BlockDevice {
    /// Executes one request and returns the length to put in its used element: the bytes
    /// written into the guest's buffers, status byte included.
    pub(super) fn execute(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let head = chain.head_index();
        let buffers = chain
            .clone()
            .reader(mem)
            .and_then(|r| Ok((r, chain.writer(mem)?)));
        let (mut reader, mut writer) = match buffers {
            Ok(buffers) => buffers,
            Err(err) => {
                tracing::debug!(id = %self.id, head, %err, "virtio-blk request with unusable buffers");
                return 0;
            }
        };
        let Some(status_at) = writer.available_bytes().checked_sub(1) else {
            tracing::debug!(id = %self.id, head, "virtio-blk request without a status byte");
            return 0;
        };
        let Ok(mut status_writer) = writer.split_at(status_at) else {
            return 0;
        };
        let status = match self.run(&mut reader, &mut writer) {
            Ok(()) => blk::VIRTIO_BLK_S_OK as u8,
            Err(rejection) => {
                match &rejection {
                    Rejection::Host(what, err) => {
                        tracing::warn!(id = %self.id, %err, "virtio-blk: cannot {what}");
                    }
                    Rejection::Invalid(why) | Rejection::Unsupported(why) => {
                        tracing::debug!(id = %self.id, head, "virtio-blk request refused: {why}");
                    }
                }
                rejection.status()
            }
        };
        let written = writer.bytes_written();
        if status_writer.write_all(&[status]).is_err() {
            return written as u32;
        }
        written as u32 + 1
    }

    fn run<B: BitmapSlice>(
        &mut self,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> Result<(), Rejection> {
        let mut header = [0; HEADER_SIZE];
        reader
            .read_exact(&mut header)
            .map_err(|_| Rejection::Invalid("header shorter than 16 bytes"))?;
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        match kind {
            blk::VIRTIO_BLK_T_IN => self.read(sector, reader, writer),
            blk::VIRTIO_BLK_T_OUT => self.write(sector, reader, writer),
            blk::VIRTIO_BLK_T_FLUSH => self
                .image
                .flush()
                .map_err(|err| Rejection::Host("flush the image", err)),
            blk::VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.serial.len());
                writer
                    .write_all(&self.serial[..n])
                    .map_err(|_| Rejection::Invalid("ID buffer not writable"))
            }
            blk::VIRTIO_BLK_T_DISCARD => self.zero(false, reader, writer),
            blk::VIRTIO_BLK_T_WRITE_ZEROES => self.zero(true, reader, writer),
            _ => Err(Rejection::Unsupported("unknown request type")),
        }
    }

    fn read<B: BitmapSlice>(
        &mut self,
        sector: u64,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> Result<(), Rejection> {
        if reader.available_bytes() != 0 {
            return Err(Rejection::Invalid("read with device-readable data buffers"));
        }
        let len = writer.available_bytes() as u64;
        let offset = self.byte_range(sector, len)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.bounce.len() as u64) as usize;
            let buf = &mut self.bounce[..n];
            self.image
                .read_at(offset + done, buf)
                .map_err(|err| Rejection::Host("read the image", err))?;
            writer
                .write_all(buf)
                .map_err(|_| Rejection::Invalid("data buffer not writable"))?;
            done += n as u64;
        }
        Ok(())
    }

    fn write<B: BitmapSlice>(
        &mut self,
        sector: u64,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> Result<(), Rejection> {
        if self.image.readonly() {
            return Err(Rejection::Invalid("write to a read-only disk"));
        }
        if writer.available_bytes() != 0 {
            return Err(Rejection::Invalid(
                "write with device-writable data buffers",
            ));
        }
        let len = reader.available_bytes() as u64;
        let offset = self.byte_range(sector, len)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.bounce.len() as u64) as usize;
            let buf = &mut self.bounce[..n];
            reader
                .read_exact(buf)
                .map_err(|_| Rejection::Invalid("data buffer not readable"))?;
            self.image
                .write_at(offset + done, buf)
                .map_err(|err| Rejection::Host("write the image", err))?;
            done += n as u64;
        }
        Ok(())
    }

    /// DISCARD (`write_zeroes` false) or WRITE_ZEROES: one segment naming sectors to drop.
    fn zero<B: BitmapSlice>(
        &mut self,
        write_zeroes: bool,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> Result<(), Rejection> {
        let feature = if write_zeroes {
            blk::VIRTIO_BLK_F_WRITE_ZEROES
        } else {
            blk::VIRTIO_BLK_F_DISCARD
        };
        if !self.acked(feature) {
            return Err(Rejection::Unsupported(
                "discard or write-zeroes not negotiated",
            ));
        }
        if writer.available_bytes() != 0 {
            return Err(Rejection::Invalid("segments in device-writable buffers"));
        }
        let len = reader.available_bytes();
        if len > SEGMENT_SIZE * MAX_ZERO_SEGMENTS as usize {
            return Err(Rejection::Unsupported("more segments than max_*_seg"));
        }
        let mut segment = [0; SEGMENT_SIZE];
        reader
            .read_exact(&mut segment)
            .map_err(|_| Rejection::Invalid("segment shorter than 16 bytes"))?;
        let sector = u64::from_le_bytes(segment[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(segment[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(segment[12..16].try_into().expect("4 bytes"));
        let allowed = if write_zeroes {
            blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(Rejection::Unsupported("unknown segment flags"));
        }
        if sectors > MAX_ZERO_SECTORS {
            return Err(Rejection::Invalid("segment longer than max_*_sectors"));
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let offset = self.byte_range(sector, len)?;
        if len == 0 {
            return Ok(());
        }
        let done = if write_zeroes {
            let may_unmap = flags & blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            self.image.write_zeroes(offset, len, may_unmap)
        } else {
            self.image.discard(offset, len)
        };
        done.map_err(|err| Rejection::Host("discard or zero a range of the image", err))
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, Rejection> {
        if len % SECTOR_SIZE != 0 {
            return Err(Rejection::Invalid("length not a multiple of 512"));
        }
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|offset| {
                offset
                    .checked_add(len)
                    .is_some_and(|end| end <= self.image.size())
            })
            .ok_or(Rejection::Invalid("request outside the disk"))
    }
}
