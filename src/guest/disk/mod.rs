//! The guest's disk workload (`ferry.run=disk`): its serial lines, its block pattern, and
//! checks of a disk image against what the guest reported.
//!
//! The guest writes 4 KiB blocks. Block `b` at generation `g` holds, in its 8-byte word `i`
//! (little-endian), [`disk_word`]`(b, g, i)`: an invertible scramble of a tag, `i`, `g` (20
//! bits) and `b` (32 bits), so every word names its block, generation and place, and a
//! misplaced, stale or torn block fails the check. [`decode_disk_word`] recovers the fields.
//!
//! [`check_image`] checks an image file against a [`DiskProgress`] line, and [`write_image`]
//! prepares one (generation 1 for the read-only check). [`DiskLine`] is the parsed form of
//! the `disk …` lines.

mod line;

pub use line::{last_disk_progress, DiskLine, DiskOp, DiskProgress};

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Size of the guest's disk blocks.
pub const DISK_BLOCK_SIZE: usize = 4096;

/// The guest prints a `disk gen=G done=B` line (after a flush) every this many blocks and at
/// the end of each pass.
pub const DISK_REPORT_BLOCKS: u64 = 64;

/// After a `disk gen=G done=B` line the guest starts no block at or past `B +` this many
/// before its next line, and none of the next pass before the pass's last line: the disk is
/// never more than this many blocks ahead of the last line. The guest works on 8 blocks at
/// once; the blocks between the next line's `done` and this limit are the ones it goes on
/// with while that line's flush runs.
pub const DISK_AHEAD_BLOCKS: u64 = 2 * DISK_REPORT_BLOCKS;

const PATTERN_MUL: u64 = 0xd1b5_4a32_d192_ed03;
const PATTERN_MUL_INV: u64 = 0x0610_6ccf_a448_e5ab;
const PATTERN_TAG: u64 = 5;
const GEN_MASK: u64 = 0xf_ffff;
const WORDS: usize = DISK_BLOCK_SIZE / 8;

/// Word `word` (0..512) of block `block` at generation `gen`. Only the low 32 bits of
/// `block` and the low 20 bits of `gen` take part.
pub fn disk_word(block: u64, gen: u64, word: u64) -> u64 {
    let v =
        PATTERN_TAG << 61 | (word & 0x1ff) << 52 | (gen & GEN_MASK) << 32 | (block & 0xffff_ffff);
    let x = v.wrapping_mul(PATTERN_MUL);
    x ^ (x >> 32)
}

/// The 4096 bytes of block `block` at generation `gen`, as the guest writes them.
pub fn disk_block(block: u64, gen: u64) -> Vec<u8> {
    (0..WORDS as u64)
        .flat_map(|i| disk_word(block, gen, i).to_le_bytes())
        .collect()
}

/// The fields of a word of the disk pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskWord {
    /// Block number (low 32 bits).
    pub block: u64,
    /// Generation (low 20 bits).
    pub gen: u64,
    /// Index of the word in its block.
    pub word: u64,
}

/// The fields of `value` if it is a word of the disk pattern (its tag is right), else `None`.
pub fn decode_disk_word(value: u64) -> Option<DiskWord> {
    let v = (value ^ (value >> 32)).wrapping_mul(PATTERN_MUL_INV);
    (v >> 61 == PATTERN_TAG).then_some(DiskWord {
        block: v & 0xffff_ffff,
        gen: (v >> 32) & GEN_MASK,
        word: (v >> 52) & 0x1ff,
    })
}

/// What is in a word, for error messages.
fn describe(value: u64) -> String {
    match decode_disk_word(value) {
        Some(w) => format!("block {} generation {} word {}", w.block, w.gen, w.word),
        None => "not the disk pattern".to_string(),
    }
}

/// Why a disk image does not hold what a `disk gen=G done=B` line promises.
#[derive(Debug, Error)]
pub enum DiskImageError {
    /// The image could not be read or written.
    #[error("disk image {path}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The image is smaller than the blocks to check.
    #[error("disk image {path} holds {len} bytes, less than {blocks} blocks of 4096")]
    TooShort {
        /// The image file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
        /// The blocks the guest uses.
        blocks: u64,
    },
    /// No `disk` line can say this.
    #[error("`disk gen={gen} done={done}` is no progress line for {blocks} blocks")]
    BadProgress {
        /// The generation given.
        gen: u64,
        /// The blocks done given.
        done: u64,
        /// The blocks the guest uses.
        blocks: u64,
    },
    /// A block holds something else than the generation promised.
    #[error(
        "block {block} should hold generation {expected}, but its word {word} is {value:#018x} \
         ({})", describe(*.value)
    )]
    WrongBlock {
        /// The block.
        block: u64,
        /// The generation it should hold.
        expected: u64,
        /// The first word that differs.
        word: u64,
        /// What that word holds.
        value: u64,
    },
}

/// Checks that the first `blocks` blocks of the image at `path` hold what the guest's line
/// `disk gen=GEN done=DONE` promises: blocks below `done` at generation `gen`, the others at
/// `gen - 1` (anything when `gen` is 1).
///
/// The guest goes on writing after a line, several blocks at once whose writes land in any
/// order: any of the [`DISK_AHEAD_BLOCKS`] blocks from `done` on may already hold generation
/// `gen` (after `done == blocks`, from block 0 at `gen + 1`). Such blocks pass; the return
/// value says how many there were, so a caller that knows the guest was stopped right after
/// the line can insist on 0. A torn block fails: the guest writes a block with one request,
/// which lands whole or not at all.
pub fn check_image(path: &Path, blocks: u64, gen: u64, done: u64) -> Result<u64, DiskImageError> {
    if gen == 0 || done > blocks {
        return Err(DiskImageError::BadProgress { gen, done, blocks });
    }
    let (gen, done) = if done == blocks {
        (gen + 1, 0)
    } else {
        (gen, done)
    };
    let io_err = |source| DiskImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len < blocks * DISK_BLOCK_SIZE as u64 {
        return Err(DiskImageError::TooShort {
            path: path.to_path_buf(),
            len,
            blocks,
        });
    }
    let mut file = BufReader::new(file);
    let mut buf = vec![0u8; DISK_BLOCK_SIZE];
    let mut ahead = 0;
    for block in 0..blocks {
        file.read_exact(&mut buf).map_err(io_err)?;
        let expected = if block < done {
            gen
        } else if block - done < DISK_AHEAD_BLOCKS && first_difference(&buf, block, gen).is_none() {
            ahead += 1;
            continue;
        } else if gen > 1 {
            gen - 1
        } else {
            continue;
        };
        if let Some((word, value)) = first_difference(&buf, block, expected) {
            return Err(DiskImageError::WrongBlock {
                block,
                expected,
                word,
                value,
            });
        }
    }
    Ok(ahead)
}

/// The first word of `data` that differs from block `block` at generation `gen`.
fn first_difference(data: &[u8], block: u64, gen: u64) -> Option<(u64, u64)> {
    data.chunks_exact(8).zip(0u64..).find_map(|(bytes, i)| {
        let value = u64::from_le_bytes(bytes.try_into().expect("8-byte chunk"));
        (value != disk_word(block, gen, i)).then_some((i, value))
    })
}

/// Writes blocks `0..blocks` at generation `gen` to the start of the file at `path` (made if
/// missing; anything past those blocks is kept): a disk for the guest's read-only check,
/// which expects generation 1.
pub fn write_image(path: &Path, blocks: u64, gen: u64) -> Result<(), DiskImageError> {
    let io_err = |source| DiskImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err)?;
    let mut out = BufWriter::new(file);
    for block in 0..blocks {
        out.write_all(&disk_block(block, gen)).map_err(io_err)?;
    }
    out.flush().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn words_match_what_the_guest_wrote() {
        // Read back from an image the guest wrote under QEMU.
        assert_eq!(disk_word(0, 9, 0), 0x3e2a_551b_3e2a_551b);
        assert_eq!(disk_word(5, 9, 1), 0x26e4_c819_313a_6916);
        assert_eq!(disk_word(511, 8, 511), 0x9546_8388_c101_9b75);
        let block = disk_block(5, 9);
        assert_eq!(block.len(), DISK_BLOCK_SIZE);
        assert_eq!(block[8..16], 0x26e4_c819_313a_6916u64.to_le_bytes());
    }

    #[test]
    fn words_decode_to_their_fields() {
        assert_eq!(PATTERN_MUL.wrapping_mul(PATTERN_MUL_INV), 1);
        for (block, gen, word) in [(0, 1, 0), (4095, 2, 511), (0xffff_ffff, GEN_MASK, 17)] {
            assert_eq!(
                decode_disk_word(disk_word(block, gen, word)),
                Some(DiskWord { block, gen, word })
            );
        }
        assert_eq!(decode_disk_word(0), None);
        assert_ne!(disk_word(1, 1, 0), disk_word(0, 1, 0));
        assert_ne!(disk_word(0, 2, 0), disk_word(0, 1, 0));
        assert_ne!(disk_word(0, 1, 1), disk_word(0, 1, 0));
    }

    const BLOCKS: u64 = 200;

    /// An image of BLOCKS blocks: `gens(b)` gives block b's generation, 0 for zeros.
    fn image(gens: impl Fn(u64) -> u64) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for b in 0..BLOCKS {
            let data = match gens(b) {
                0 => vec![0; DISK_BLOCK_SIZE],
                g => disk_block(b, g),
            };
            file.write_all(&data).unwrap();
        }
        file.flush().unwrap();
        file
    }

    fn wrong_block(r: Result<u64, DiskImageError>) -> (u64, u64, u64) {
        match r {
            Err(DiskImageError::WrongBlock {
                block,
                expected,
                word,
                ..
            }) => (block, expected, word),
            other => panic!("expected WrongBlock, got {other:?}"),
        }
    }

    #[test]
    fn image_at_a_progress_line_passes() {
        let img = image(|b| if b < 64 { 3 } else { 2 });
        assert_eq!(check_image(img.path(), BLOCKS, 3, 64).unwrap(), 0);
        // The guest may have gone on after the line it printed, by up to 128 blocks.
        assert_eq!(check_image(img.path(), BLOCKS, 3, 0).unwrap(), 64);
        let img = image(|b| if b < 64 + DISK_AHEAD_BLOCKS { 3 } else { 2 });
        assert_eq!(
            check_image(img.path(), BLOCKS, 3, 64).unwrap(),
            DISK_AHEAD_BLOCKS
        );
        // The end of a pass: generation 2 everywhere, or generation 3 starting.
        let img = image(|_| 2);
        assert_eq!(check_image(img.path(), BLOCKS, 2, BLOCKS).unwrap(), 0);
        let img = image(|b| if b < 10 { 3 } else { 2 });
        assert_eq!(check_image(img.path(), BLOCKS, 2, BLOCKS).unwrap(), 10);
    }

    #[test]
    fn first_generation_leaves_the_rest_unchecked() {
        let img = image(|b| if b < 64 { 1 } else { 0 });
        assert_eq!(check_image(img.path(), BLOCKS, 1, 64).unwrap(), 0);
        assert_eq!(check_image(img.path(), BLOCKS, 1, 0).unwrap(), 64);
        assert_eq!(
            wrong_block(check_image(img.path(), BLOCKS, 1, 128)),
            (64, 1, 0)
        );
    }

    #[test]
    fn image_behind_or_too_far_ahead_fails() {
        let img = image(|b| if b < 64 { 3 } else { 2 });
        assert_eq!(
            wrong_block(check_image(img.path(), BLOCKS, 3, 128)),
            (64, 3, 0)
        );
        let img = image(|b| if b < 129 { 3 } else { 2 });
        assert_eq!(
            wrong_block(check_image(img.path(), BLOCKS, 3, 0)),
            (DISK_AHEAD_BLOCKS, 2, 0)
        );
        // A block of the new generation past the blocks the guest may have started.
        let img = image(|b| {
            if b < 64 || b == 64 + DISK_AHEAD_BLOCKS {
                3
            } else {
                2
            }
        });
        assert_eq!(
            wrong_block(check_image(img.path(), BLOCKS, 3, 64)),
            (64 + DISK_AHEAD_BLOCKS, 2, 0)
        );
        // The next pass before the end of this one.
        let img = image(|b| if b == 0 { 3 } else { 2 });
        assert_eq!(
            wrong_block(check_image(img.path(), BLOCKS, 2, 192)),
            (0, 2, 0)
        );
    }

    #[test]
    fn blocks_in_flight_may_land_in_any_order() {
        // Requests on blocks 64..192 finished out of order: some landed, some did not yet.
        let landed = [64, 66, 67, 71, 100, 191];
        let img = image(|b| if b < 64 || landed.contains(&b) { 3 } else { 2 });
        assert_eq!(check_image(img.path(), BLOCKS, 3, 64).unwrap(), 6);
        // The same at the start of a pass.
        let img = image(|b| if [1, 5].contains(&b) { 4 } else { 3 });
        assert_eq!(check_image(img.path(), BLOCKS, 3, BLOCKS).unwrap(), 2);
    }

    #[test]
    fn torn_and_misplaced_blocks_fail() {
        let mut img = image(|_| 2);
        let mut torn = disk_block(70, 2);
        torn[2048..].copy_from_slice(&disk_block(70, 1)[2048..]);
        img.as_file_mut()
            .write_all_at(&torn, 70 * DISK_BLOCK_SIZE as u64)
            .unwrap();
        assert_eq!(
            wrong_block(check_image(img.path(), BLOCKS, 2, 128)),
            (70, 2, 256)
        );

        let mut img = image(|_| 2);
        img.as_file_mut()
            .write_all_at(&disk_block(4, 2), 3 * DISK_BLOCK_SIZE as u64)
            .unwrap();
        let err = check_image(img.path(), BLOCKS, 2, 64).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "block 3 should hold generation 2, but its word 0 is {:#018x} \
                 (block 4 generation 2 word 0)",
                disk_word(4, 2, 0)
            )
        );
    }

    #[test]
    fn bad_arguments_and_short_images_fail() {
        let img = image(|_| 1);
        assert!(matches!(
            check_image(img.path(), BLOCKS, 0, 0),
            Err(DiskImageError::BadProgress { .. })
        ));
        assert!(matches!(
            check_image(img.path(), BLOCKS, 1, BLOCKS + 1),
            Err(DiskImageError::BadProgress { .. })
        ));
        assert!(matches!(
            check_image(img.path(), BLOCKS + 1, 1, 0),
            Err(DiskImageError::TooShort { len, .. }) if len == BLOCKS * 4096
        ));
    }

    #[test]
    fn written_image_holds_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0xaa; 300 * DISK_BLOCK_SIZE]).unwrap();
        write_image(&path, BLOCKS, 1).unwrap();
        assert_eq!(check_image(&path, BLOCKS, 1, BLOCKS).unwrap(), 0);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 300 * DISK_BLOCK_SIZE, "the tail is kept");
        assert_eq!(data[data.len() - 1], 0xaa);
    }
}
