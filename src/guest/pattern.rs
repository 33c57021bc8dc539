//! Checker for the memory pattern of the guest's `sweep` workload.
//!
//! Each guest CPU increments the first byte of every 4 KiB page of its slices
//! in ascending address order, forever (QEMU's migration-test pattern). At any
//! instant, walking those pages in sweep order, every byte therefore equals the
//! one before it, except at the page the CPU is about to touch: there the
//! value steps down by exactly one (modulo 256), from the pages already
//! incremented in this pass to those still waiting. A copy of guest memory
//! taken while the vCPUs are stopped (the end of a migration, a snapshot) must
//! show the same shape; a lost or stale page shows up as a second step or as a
//! jump by some other amount.
//!
//! [`check_pages`] checks page bytes already collected; [`check_dump`] and
//! [`check_dump_file`] pick them out of a dump of guest-physical RAM that starts
//! at address 0 (as QEMU's `pmemsave 0 <size> <file>` writes).
//!
//! The RAM `ferry.fill` wrote once at boot holds [`fill_word`] at every 8-byte word;
//! [`check_fill`] checks a range of it in such a dump.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Size of a guest page as the sweep sees it: one counter byte per 4 KiB.
pub const SWEEP_PAGE_SIZE: u64 = 4096;

/// Why a sequence of page bytes is not a valid sweep pattern.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatternError {
    /// Two neighbouring pages differ by something other than a step down by one.
    #[error(
        "page {cur_addr:#x} holds {cur:#04x} after page {prev_addr:#x} holding {prev:#04x}; \
         expected {prev:#04x} or {expected_step:#04x}",
        expected_step = prev.wrapping_sub(1)
    )]
    BadStep {
        /// Address of the earlier page in sweep order.
        prev_addr: u64,
        /// Its first byte.
        prev: u8,
        /// Address of the later page.
        cur_addr: u64,
        /// Its first byte.
        cur: u8,
    },
    /// A second step down: only the page under the sweep may have one.
    #[error(
        "second step down: page {cur_addr:#x} holds {cur:#04x} after page {prev_addr:#x} \
         holding {prev:#04x}; the first was at page {first_step_addr:#x}"
    )]
    SecondStepDown {
        /// Address of the earlier page in sweep order.
        prev_addr: u64,
        /// Its first byte.
        prev: u8,
        /// Address of the later page.
        cur_addr: u64,
        /// Its first byte.
        cur: u8,
        /// The page after the first step down.
        first_step_addr: u64,
    },
}

/// Why a memory dump could not be checked, or what was wrong in it.
#[derive(Debug, Error)]
pub enum DumpError {
    /// Reading the dump failed.
    #[error("reading dump {path}")]
    Io {
        /// The dump file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A slice reaches past the end of the dump.
    #[error("slice {start:#x}..{end:#x} lies beyond the end of the {dump_len}-byte dump")]
    SliceOutsideDump {
        /// Start of the slice.
        start: u64,
        /// End of the slice (exclusive).
        end: u64,
        /// Length of the dump in bytes.
        dump_len: u64,
    },
    /// The pattern is broken.
    #[error(transparent)]
    Pattern(#[from] PatternError),
}

/// Checks one CPU's page bytes, given as `(page address, first byte)` in sweep
/// order: every byte equals the previous one, except for at most one place
/// where it is one less (modulo 256).
pub fn check_pages<I>(pages: I) -> Result<(), PatternError>
where
    I: IntoIterator<Item = (u64, u8)>,
{
    let mut prev: Option<(u64, u8)> = None;
    let mut first_step_addr = None;
    for (cur_addr, cur) in pages {
        if let Some((prev_addr, prev)) = prev {
            if cur != prev {
                if prev != cur.wrapping_add(1) {
                    return Err(PatternError::BadStep {
                        prev_addr,
                        prev,
                        cur_addr,
                        cur,
                    });
                }
                if let Some(first_step_addr) = first_step_addr {
                    return Err(PatternError::SecondStepDown {
                        prev_addr,
                        prev,
                        cur_addr,
                        cur,
                        first_step_addr,
                    });
                }
                first_step_addr = Some(cur_addr);
            }
        }
        prev = Some((cur_addr, cur));
    }
    Ok(())
}

/// The page addresses of `slices`, in sweep order.
pub fn sweep_pages(slices: &[Range<u64>]) -> impl Iterator<Item = u64> + '_ {
    slices
        .iter()
        .flat_map(|s| (s.start..s.end).step_by(SWEEP_PAGE_SIZE as usize))
}

/// Checks one CPU's slices (in sweep order) in a dump of guest-physical RAM
/// that starts at address 0.
pub fn check_dump(dump: &[u8], slices: &[Range<u64>]) -> Result<(), DumpError> {
    let dump_len = dump.len() as u64;
    if let Some(s) = slices.iter().find(|s| s.end > dump_len) {
        return Err(DumpError::SliceOutsideDump {
            start: s.start,
            end: s.end,
            dump_len,
        });
    }
    // Every address is below dump.len(), so it fits in usize.
    check_pages(sweep_pages(slices).map(|addr| (addr, dump[addr as usize])))?;
    Ok(())
}

/// Like [`check_dump`], reading the slices from a dump file without loading
/// all of it.
pub fn check_dump_file(path: &Path, slices: &[Range<u64>]) -> Result<(), DumpError> {
    let io_err = |source| DumpError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let dump_len = file.metadata().map_err(io_err)?.len();
    if let Some(s) = slices.iter().find(|s| s.end > dump_len) {
        return Err(DumpError::SliceOutsideDump {
            start: s.start,
            end: s.end,
            dump_len,
        });
    }

    const CHUNK_PAGES: u64 = 256;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; (CHUNK_PAGES * SWEEP_PAGE_SIZE) as usize];
    for s in slices {
        file.seek(SeekFrom::Start(s.start)).map_err(io_err)?;
        let mut addr = s.start;
        while addr < s.end {
            let len = (s.end - addr).min(CHUNK_PAGES * SWEEP_PAGE_SIZE);
            let chunk = &mut buf[..len as usize];
            file.read_exact(chunk).map_err(io_err)?;
            bytes.extend(
                chunk
                    .iter()
                    .step_by(SWEEP_PAGE_SIZE as usize)
                    .enumerate()
                    .map(|(i, &b)| (addr + i as u64 * SWEEP_PAGE_SIZE, b)),
            );
            addr += len;
        }
    }
    check_pages(bytes)?;
    Ok(())
}

/// The 64-bit word (little-endian) that the guest's `ferry.fill` stores at the 8-aligned
/// guest-physical address `addr`. Every byte of it is odd, hence never zero.
pub fn fill_word(addr: u64) -> u64 {
    let x = addr.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x ^ (x >> 32)) | 0x0101_0101_0101_0101
}

/// Why a filled range does not hold the fill pattern.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FillError {
    /// The range reaches past the end of the dump.
    #[error("fill range {start:#x}..{end:#x} lies beyond the end of the {dump_len}-byte dump")]
    OutsideDump {
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
        /// Length of the dump in bytes.
        dump_len: u64,
    },
    /// A word differs from [`fill_word`].
    #[error("word at {addr:#x} holds {found:#018x}, expected {expected:#018x}")]
    Mismatch {
        /// Its guest-physical address.
        addr: u64,
        /// What the dump holds.
        found: u64,
        /// What the fill wrote.
        expected: u64,
    },
}

/// Checks that `range` (8-aligned, from a `fill` line) of a dump of guest-physical RAM
/// starting at address 0 holds the fill pattern; the first wrong word is the error.
pub fn check_fill(dump: &[u8], range: Range<u64>) -> Result<(), FillError> {
    let dump_len = dump.len() as u64;
    if range.end > dump_len || range.start > range.end {
        return Err(FillError::OutsideDump {
            start: range.start,
            end: range.end,
            dump_len,
        });
    }
    // Every address is below dump.len(), so it fits in usize.
    let bytes = &dump[range.start as usize..range.end as usize];
    for (i, word) in bytes.chunks_exact(8).enumerate() {
        let addr = range.start + 8 * i as u64;
        let found = u64::from_le_bytes(word.try_into().expect("chunks of 8"));
        let expected = fill_word(addr);
        if found != expected {
            return Err(FillError::Mismatch {
                addr,
                found,
                expected,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const P: u64 = SWEEP_PAGE_SIZE;

    /// `(address, value)` pairs for pages starting at 1 MiB.
    fn pages(values: &[u8]) -> Vec<(u64, u8)> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| (0x10_0000 + i as u64 * P, v))
            .collect()
    }

    #[test]
    fn flat_pattern_is_intact() {
        assert_eq!(check_pages(pages(&[5, 5, 5, 5])), Ok(()));
        assert_eq!(check_pages(pages(&[])), Ok(()));
        assert_eq!(check_pages(pages(&[9])), Ok(()));
    }

    #[test]
    fn one_step_down_is_intact() {
        assert_eq!(check_pages(pages(&[6, 6, 5, 5, 5])), Ok(()));
        // The step may be anywhere, including right after the first page.
        assert_eq!(check_pages(pages(&[6, 5, 5])), Ok(()));
        assert_eq!(check_pages(pages(&[6, 6, 5])), Ok(()));
    }

    #[test]
    fn wrap_around_step_is_intact() {
        // 0x00 -> 0xff is a step down by one modulo 256.
        assert_eq!(check_pages(pages(&[0x00, 0x00, 0xff, 0xff])), Ok(()));
    }

    #[test]
    fn step_up_is_broken() {
        // 0xff -> 0x00 is a step *up*: the later page was touched more often.
        assert_eq!(
            check_pages(pages(&[0xff, 0x00])),
            Err(PatternError::BadStep {
                prev_addr: 0x10_0000,
                prev: 0xff,
                cur_addr: 0x10_0000 + P,
                cur: 0x00,
            })
        );
    }

    #[test]
    fn stale_page_is_broken() {
        // A page the destination never received keeps an old value.
        let err = check_pages(pages(&[7, 7, 7, 3, 7, 7])).unwrap_err();
        assert_eq!(
            err,
            PatternError::BadStep {
                prev_addr: 0x10_0000 + 2 * P,
                prev: 7,
                cur_addr: 0x10_0000 + 3 * P,
                cur: 3,
            }
        );
        assert_eq!(
            err.to_string(),
            "page 0x103000 holds 0x03 after page 0x102000 holding 0x07; expected 0x07 or 0x06"
        );
    }

    #[test]
    fn page_two_sweeps_behind_is_broken() {
        assert!(matches!(
            check_pages(pages(&[9, 9, 7, 7])),
            Err(PatternError::BadStep {
                prev: 9,
                cur: 7,
                ..
            })
        ));
    }

    #[test]
    fn two_step_downs_are_broken() {
        // Each step alone is fine; a page one sweep behind in the middle of
        // the already-incremented run makes two.
        assert_eq!(
            check_pages(pages(&[8, 7, 8, 8])),
            Err(PatternError::BadStep {
                prev_addr: 0x10_0000 + P,
                prev: 7,
                cur_addr: 0x10_0000 + 2 * P,
                cur: 8,
            })
        );
        assert_eq!(
            check_pages(pages(&[9, 8, 8, 7])),
            Err(PatternError::SecondStepDown {
                prev_addr: 0x10_0000 + 2 * P,
                prev: 8,
                cur_addr: 0x10_0000 + 3 * P,
                cur: 7,
                first_step_addr: 0x10_0000 + P,
            })
        );
    }

    /// A dump of `len` bytes with `values` at the pages of `slices`, in order.
    fn make_dump(len: usize, slices: &[Range<u64>], values: &[u8]) -> Vec<u8> {
        let mut dump = vec![0xaa; len];
        for (addr, v) in sweep_pages(slices).zip(values) {
            dump[addr as usize] = *v;
        }
        dump
    }

    #[test]
    fn dump_walks_slices_in_sweep_order() {
        // The second slice is at a lower address but is swept later.
        let slices = [4 * P..6 * P, P..3 * P];
        let dump = make_dump(8 * P as usize, &slices, &[4, 4, 3, 3]);
        assert!(check_dump(&dump, &slices).is_ok());

        let dump = make_dump(8 * P as usize, &slices, &[4, 3, 3, 2]);
        assert!(matches!(
            check_dump(&dump, &slices),
            Err(DumpError::Pattern(PatternError::SecondStepDown {
                cur_addr,
                first_step_addr,
                ..
            })) if cur_addr == 2 * P && first_step_addr == 5 * P
        ));
    }

    #[test]
    fn slice_beyond_dump_is_an_error() {
        let dump = vec![0; 4 * P as usize];
        let slices = [0..P, 2 * P..5 * P];
        assert!(matches!(
            check_dump(&dump, &slices),
            Err(DumpError::SliceOutsideDump { dump_len, .. }) if dump_len == 4 * P
        ));
    }

    #[test]
    fn dump_file_matches_in_memory_check() {
        // More pages than one read chunk, so the chunking is exercised too.
        let slices = [
            0x10_0000..0x10_0000 + 300 * P,
            0x20_0000..0x20_0000 + 10 * P,
        ];
        let mut values = vec![0x01u8; 200];
        values.extend([0x00u8; 110]);
        let dump = make_dump(0x30_0000, &slices, &values);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&dump).unwrap();
        assert!(check_dump_file(file.path(), &slices).is_ok());

        values[250] = 0x05; // a stale page
        let dump = make_dump(0x30_0000, &slices, &values);
        file.as_file().set_len(0).unwrap();
        file.as_file_mut().seek(SeekFrom::Start(0)).unwrap();
        file.write_all(&dump).unwrap();
        assert!(matches!(
            check_dump_file(file.path(), &slices),
            Err(DumpError::Pattern(PatternError::BadStep { cur: 0x05, cur_addr, .. }))
                if cur_addr == 0x10_0000 + 250 * P
        ));
        assert!(matches!(
            check_dump_file(Path::new("/nonexistent/ferry-dump"), &slices),
            Err(DumpError::Io { .. })
        ));
    }

    /// The guest's C, `x * 0x9e3779b97f4a7c15; (x ^ (x >> 32)) | 0x0101010101010101`,
    /// worked by hand for two addresses, and the property the benchmark relies on.
    #[test]
    fn fill_word_is_the_guests_and_never_has_a_zero_byte() {
        assert_eq!(fill_word(0), 0x0101_0101_0101_0101);
        // 0x400000 × 0x9e3779b97f4a7c15 mod 2^64
        let x: u64 = 0x6e5f_d29f_0540_0000;
        assert_eq!(0x40_0000u64.wrapping_mul(0x9e37_79b9_7f4a_7c15), x);
        assert_eq!(
            fill_word(0x40_0000),
            (x ^ (x >> 32)) | 0x0101_0101_0101_0101
        );
        assert_eq!(fill_word(0x40_0000), 0x6f5f_d39f_6b1f_d39f);
        for addr in (0..1 << 20).step_by(8) {
            assert!(fill_word(addr).to_le_bytes().iter().all(|&b| b != 0));
        }
    }

    #[test]
    fn check_fill_finds_a_changed_word() {
        let range = 2 * P..4 * P;
        let mut dump = vec![0u8; 5 * P as usize];
        for addr in range.clone().step_by(8) {
            dump[addr as usize..addr as usize + 8].copy_from_slice(&fill_word(addr).to_le_bytes());
        }
        assert_eq!(check_fill(&dump, range.clone()), Ok(()));
        dump[(3 * P + 17) as usize] = 0;
        assert_eq!(
            check_fill(&dump, range.clone()),
            Err(FillError::Mismatch {
                addr: 3 * P + 16,
                found: fill_word(3 * P + 16) & !0xff00,
                expected: fill_word(3 * P + 16),
            })
        );
        assert!(matches!(
            check_fill(&dump, 4 * P..6 * P),
            Err(FillError::OutsideDump { dump_len, .. }) if dump_len == 5 * P
        ));
    }
}
