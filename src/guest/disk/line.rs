//! The `disk …` lines of the guest's serial output.

use std::fmt;
use std::str::FromStr;

use crate::guest::{fields_of, hex, GuestLine};

/// A request of the disk workload, as `disk error op=…` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `flush`.
    Flush,
    /// `get-id` (the serial, at start).
    GetId,
}

impl FromStr for DiskOp {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "read" => Ok(DiskOp::Read),
            "write" => Ok(DiskOp::Write),
            "flush" => Ok(DiskOp::Flush),
            "get-id" => Ok(DiskOp::GetId),
            _ => Err(()),
        }
    }
}

impl fmt::Display for DiskOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskOp::Read => "read",
            DiskOp::Write => "write",
            DiskOp::Flush => "flush",
            DiskOp::GetId => "get-id",
        })
    }
}

/// `disk gen=G done=B irqs=I inflight=K`: blocks `[0, done)` hold generation `gen`, written,
/// read back, and flushed; blocks `[done, N)` hold `gen - 1` (anything when `gen` is 1),
/// except that the requests in flight may already have written some of the
/// [`DISK_AHEAD_BLOCKS`](super::DISK_AHEAD_BLOCKS) blocks from `done` on at `gen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskProgress {
    /// The generation being written, from 1.
    pub gen: u64,
    /// Blocks done in this pass: a multiple of 64, or all of them.
    pub done: u64,
    /// Disk interrupts the BSP has taken so far.
    pub irqs: u64,
    /// Requests in flight (made available, completion not yet seen) as the line was printed,
    /// all on blocks from `done` on.
    pub inflight: u64,
}

/// A `disk …` line of the guest's serial output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskLine {
    /// `disk found addr=SS.F capacity=SECTORS blk_size=N ro=0|1 blocks=N serial=S`.
    Found {
        /// PCI slot on bus 0.
        slot: u8,
        /// PCI function.
        function: u8,
        /// Size in 512-byte sectors.
        capacity: u64,
        /// The device's block size (512 unless it offers BLK_SIZE).
        blk_size: u32,
        /// The device offered VIRTIO_BLK_F_RO.
        ro: bool,
        /// 4 KiB blocks the workload uses.
        blocks: u64,
        /// From GET_ID; bytes other than printable ASCII shown as `?`; may be empty.
        serial: String,
    },
    /// `disk beyond-end status=N`: the status of a read of the 4 KiB past the end (1, IOERR,
    /// is right).
    BeyondEnd {
        /// The virtio-blk status byte.
        status: u8,
    },
    /// `disk ro-write status=N`: the status of a write to a read-only disk (1 is right).
    RoWrite {
        /// The virtio-blk status byte.
        status: u8,
    },
    /// `disk gen=G done=B irqs=I inflight=K`.
    Progress(DiskProgress),
    /// `disk ro verified pass=P`: pass P found every block at generation 1.
    RoVerified {
        /// Passes so far, from 1.
        pass: u64,
    },
    /// `disk mismatch block=B gen=G expected=E found=F word=W value=0x…`: block B did not
    /// hold generation E in pass G; its word W holds `value`, whose generation field is F.
    Mismatch {
        /// The block.
        block: u64,
        /// The generation being written (read-only: 1).
        gen: u64,
        /// The generation the block should hold.
        expected: u64,
        /// The generation field of the first wrong word.
        found: u64,
        /// Index of that word.
        word: u64,
        /// That word.
        value: u64,
    },
    /// `disk error op=OP block=B status=S`: a request ended with status S (a flush's block is
    /// the blocks done before it).
    Error {
        /// The request.
        op: DiskOp,
        /// Its block.
        block: u64,
        /// The virtio-blk status byte.
        status: u8,
    },
}

impl DiskLine {
    /// Parses the part of a line after `disk `.
    pub(crate) fn parse(s: &str) -> Option<DiskLine> {
        if let Some(rest) = s.strip_prefix("found ") {
            let [addr, capacity, blk_size, ro, blocks, serial] = fields_of(
                rest,
                ["addr", "capacity", "blk_size", "ro", "blocks", "serial"],
            )?;
            let (slot, function) = addr.split_once('.')?;
            if slot.len() != 2 || function.len() != 1 {
                return None;
            }
            return Some(DiskLine::Found {
                slot: u8::from_str_radix(slot, 16).ok()?,
                function: function.parse().ok()?,
                capacity: capacity.parse().ok()?,
                blk_size: blk_size.parse().ok()?,
                ro: match ro {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                },
                blocks: blocks.parse().ok()?,
                serial: serial.to_string(),
            });
        }
        if let Some(rest) = s.strip_prefix("beyond-end ") {
            let [status] = fields_of(rest, ["status"])?;
            return Some(DiskLine::BeyondEnd {
                status: status.parse().ok()?,
            });
        }
        if let Some(rest) = s.strip_prefix("ro-write ") {
            let [status] = fields_of(rest, ["status"])?;
            return Some(DiskLine::RoWrite {
                status: status.parse().ok()?,
            });
        }
        if let Some(rest) = s.strip_prefix("ro verified ") {
            let [pass] = fields_of(rest, ["pass"])?;
            return Some(DiskLine::RoVerified {
                pass: pass.parse().ok()?,
            });
        }
        if let Some(rest) = s.strip_prefix("mismatch ") {
            let [block, gen, expected, found, word, value] =
                fields_of(rest, ["block", "gen", "expected", "found", "word", "value"])?;
            return Some(DiskLine::Mismatch {
                block: block.parse().ok()?,
                gen: gen.parse().ok()?,
                expected: expected.parse().ok()?,
                found: found.parse().ok()?,
                word: word.parse().ok()?,
                value: hex(value)?,
            });
        }
        if let Some(rest) = s.strip_prefix("error ") {
            let [op, block, status] = fields_of(rest, ["op", "block", "status"])?;
            return Some(DiskLine::Error {
                op: op.parse().ok()?,
                block: block.parse().ok()?,
                status: status.parse().ok()?,
            });
        }
        let [gen, done, irqs, inflight] = fields_of(s, ["gen", "done", "irqs", "inflight"])?;
        Some(DiskLine::Progress(DiskProgress {
            gen: gen.parse().ok()?,
            done: done.parse().ok()?,
            irqs: irqs.parse().ok()?,
            inflight: inflight.parse().ok()?,
        }))
    }
}

/// Prints the line as the guest does, without the leading `disk `.
impl fmt::Display for DiskLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskLine::Found {
                slot,
                function,
                capacity,
                blk_size,
                ro,
                blocks,
                serial,
            } => write!(
                f,
                "found addr={slot:02x}.{function} capacity={capacity} blk_size={blk_size} \
                 ro={} blocks={blocks} serial={serial}",
                u8::from(*ro)
            ),
            DiskLine::BeyondEnd { status } => write!(f, "beyond-end status={status}"),
            DiskLine::RoWrite { status } => write!(f, "ro-write status={status}"),
            DiskLine::Progress(DiskProgress {
                gen,
                done,
                irqs,
                inflight,
            }) => {
                write!(f, "gen={gen} done={done} irqs={irqs} inflight={inflight}")
            }
            DiskLine::RoVerified { pass } => write!(f, "ro verified pass={pass}"),
            DiskLine::Mismatch {
                block,
                gen,
                expected,
                found,
                word,
                value,
            } => write!(
                f,
                "mismatch block={block} gen={gen} expected={expected} found={found} \
                 word={word} value={value:#x}"
            ),
            DiskLine::Error { op, block, status } => {
                write!(f, "error op={op} block={block} status={status}")
            }
        }
    }
}

/// The last `disk gen=G done=B …` line among `lines`: what [`check_image`](super::check_image) checks.
pub fn last_disk_progress<'a, I>(lines: I) -> Option<DiskProgress>
where
    I: IntoIterator<Item = &'a GuestLine>,
{
    lines
        .into_iter()
        .filter_map(|line| match line {
            GuestLine::Disk(DiskLine::Progress(p)) => Some(*p),
            _ => None,
        })
        .last()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the guest prints them (the first three copied from a QEMU run).
    #[test]
    fn parses_and_prints_every_disk_line() {
        let cases = [
            (
                "disk found addr=03.0 capacity=4096 blk_size=512 ro=0 blocks=512 serial=abc",
                DiskLine::Found {
                    slot: 3,
                    function: 0,
                    capacity: 4096,
                    blk_size: 512,
                    ro: false,
                    blocks: 512,
                    serial: "abc".into(),
                },
            ),
            (
                "disk found addr=1f.7 capacity=7 blk_size=4096 ro=1 blocks=0 serial=",
                DiskLine::Found {
                    slot: 0x1f,
                    function: 7,
                    capacity: 7,
                    blk_size: 4096,
                    ro: true,
                    blocks: 0,
                    serial: String::new(),
                },
            ),
            (
                "disk beyond-end status=1",
                DiskLine::BeyondEnd { status: 1 },
            ),
            ("disk ro-write status=1", DiskLine::RoWrite { status: 1 }),
            (
                "disk gen=1146 done=64 irqs=1764009 inflight=8",
                DiskLine::Progress(DiskProgress {
                    gen: 1146,
                    done: 64,
                    irqs: 1_764_009,
                    inflight: 8,
                }),
            ),
            ("disk ro verified pass=3", DiskLine::RoVerified { pass: 3 }),
            (
                "disk mismatch block=70 gen=2 expected=1 found=0 word=0 value=0x0",
                DiskLine::Mismatch {
                    block: 70,
                    gen: 2,
                    expected: 1,
                    found: 0,
                    word: 0,
                    value: 0,
                },
            ),
            (
                "disk error op=flush block=128 status=2",
                DiskLine::Error {
                    op: DiskOp::Flush,
                    block: 128,
                    status: 2,
                },
            ),
            (
                "disk error op=get-id block=0 status=1",
                DiskLine::Error {
                    op: DiskOp::GetId,
                    block: 0,
                    status: 1,
                },
            ),
        ];
        for (text, line) in cases {
            assert_eq!(
                GuestLine::parse(text),
                GuestLine::Disk(line.clone()),
                "{text}"
            );
            assert_eq!(GuestLine::Disk(line).to_string(), text);
        }
    }

    #[test]
    fn malformed_disk_lines_are_other() {
        for text in [
            "disk",
            "disk gen=1 done=64 irqs=1",
            "disk gen=1 done=64 irqs=1 inflight=2 extra=2",
            "disk gen=1 done=64 irqs=1 inflight=-1",
            "disk found addr=3.0 capacity=1 blk_size=512 ro=0 blocks=0 serial=a",
            "disk found addr=03.0 capacity=1 blk_size=512 ro=2 blocks=0 serial=a",
            "disk found addr=03.0 capacity=1 blk_size=512 ro=0 serial=a",
            "disk beyond-end status=256",
            "disk error op=trim block=0 status=1",
            "disk mismatch block=1 gen=1 expected=1 found=1 word=1 value=12",
            "disk ro verified",
        ] {
            assert_eq!(
                GuestLine::parse(text),
                GuestLine::Other(text.into()),
                "{text}"
            );
        }
    }

    #[test]
    fn last_progress_is_the_latest_line() {
        let lines: Vec<GuestLine> = [
            "disk gen=1 done=64 irqs=130 inflight=8",
            "tick 1 cpu=0",
            "disk gen=1 done=128 irqs=259 inflight=7",
            "disk ro verified pass=1",
        ]
        .into_iter()
        .map(GuestLine::parse)
        .collect();
        assert_eq!(
            last_disk_progress(&lines),
            Some(DiskProgress {
                gen: 1,
                done: 128,
                irqs: 259,
                inflight: 7,
            })
        );
        assert_eq!(last_disk_progress(&lines[1..2]), None);
    }
}
