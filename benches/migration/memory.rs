//! The memory a ferry process uses beyond its guest's RAM, from `/proc/PID/smaps`.
//!
//! Guest RAM is anonymous memory that vm-memory maps, one mapping per RAM range of the q35
//! layout (`ferry::machine::memory::ram_layout`), when ferry starts. The kernel merges adjacent
//! anonymous mappings of the same protection into one VMA, so the RAM ranges may show as one
//! VMA, and the VMA that holds RAM may also hold ferry's own allocations mapped next to it
//! (a 4 MiB frame buffer, a malloc arena's first pages). So:
//!
//! - every anonymous read-write VMA at least as large as the smallest RAM range holds guest RAM;
//! - what such a VMA grew by since the first sample (taken before `migrate`) is ferry's own:
//!   its resident pages are counted from `/proc/PID/pagemap` and moved to the overhead;
//! - by how much those VMAs exceeded the RAM at the first sample stays uncertain and is kept as
//!   `guest_vma_extra` (a malloc arena's 132 KiB, typically): what ferry had there is counted as
//!   guest, so the overhead is low by at most that much.
//!
//! Everything else resident (heap, stacks, the binary, libraries) is ferry's overhead.
//!
//! Reading smaps walks every page table entry of the process, some 10 to 40 ms per resident GiB
//! on the CI host, and the walk competes with the migration for the host's two cores, so the
//! probe waits at least [`COST_FACTOR`] times as long as its last read took between samples.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::MIB;

/// The shortest interval between two samples.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Between two samples, at least this many times as long as reading them took.
const COST_FACTOR: u32 = 6;

/// Resident memory of one process, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Resident {
    /// All of it (the sum of every VMA's Rss, as VmRSS).
    pub total: u64,
    /// In the VMAs that hold guest RAM.
    pub guest: u64,
    /// Everything else: ferry's own memory.
    pub overhead: u64,
    /// Bytes by which the guest RAM VMAs are larger than the guest's RAM (before what they grew
    /// by since the first sample is taken out).
    pub guest_vma_extra: u64,
}

/// The guest RAM VMAs of a process, as [start, end) addresses.
pub type GuestVmas = Vec<(u64, u64)>;

/// Reads `/proc/PID/smaps`; `ram_ranges` are the sizes of the guest's RAM ranges in bytes, and
/// `baseline` the guest RAM VMAs of the first sample (see the module's doc).
pub fn resident(
    pid: i32,
    ram_ranges: &[u64],
    baseline: Option<&GuestVmas>,
) -> Option<(Resident, GuestVmas)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut resident, vmas) = parse_smaps(&smaps, ram_ranges);
    if let Some(baseline) = baseline {
        let mut grown = 0;
        for &(start, end) in &vmas {
            for (from, to) in outside(start, end, baseline) {
                grown += resident_bytes(pid, from, to).unwrap_or(0);
            }
        }
        let grown = grown.min(resident.guest);
        resident.guest -= grown;
        resident.overhead += grown;
    }
    Some((resident, vmas))
}

/// The parts of [start, end) that none of `ranges` covers.
fn outside(start: u64, end: u64, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut inside: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(s, e)| (s.max(start), e.min(end)))
        .filter(|&(s, e)| s < e)
        .collect();
    inside.sort_unstable();
    let mut parts = Vec::new();
    let mut at = start;
    for (s, e) in inside {
        if s > at {
            parts.push((at, s));
        }
        at = at.max(e);
    }
    if at < end {
        parts.push((at, end));
    }
    parts
}

/// Bytes of [start, end) of a process that are in RAM or swap, from its pagemap.
fn resident_bytes(pid: i32, start: u64, end: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let mut entries = vec![0u8; ((end - start) / PAGE * 8) as usize];
    pagemap.read_exact_at(&mut entries, start / PAGE * 8).ok()?;
    let present = entries
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()))
        .filter(|e| e & (PRESENT | SWAPPED) != 0)
        .count() as u64;
    Some(present * PAGE)
}

/// One VMA's header line: its start, end, and whether it is an anonymous read-write mapping.
fn vma_header(line: &str) -> Option<(u64, u64, bool)> {
    let mut words = line.split_whitespace();
    let (start, end) = words.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = words.next()?;
    if perms.len() != 4 || end < start {
        return None;
    }
    let _offset = words.next()?;
    let _device = words.next()?;
    let inode = words.next()?;
    let anonymous = inode == "0" && words.next().is_none();
    Some((start, end, anonymous && perms.starts_with("rw")))
}

fn parse_smaps(smaps: &str, ram_ranges: &[u64]) -> (Resident, GuestVmas) {
    let smallest = ram_ranges.iter().copied().min().unwrap_or(u64::MAX);
    let mut ram_left: u64 = ram_ranges.iter().sum();
    let mut resident = Resident::default();
    let mut vmas = Vec::new();
    let mut guest_vma = false;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let bytes = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                << 10;
            resident.total += bytes;
            if guest_vma {
                resident.guest += bytes;
            } else {
                resident.overhead += bytes;
            }
        } else if let Some((start, end, anonymous_rw)) = vma_header(line) {
            let size = end - start;
            guest_vma = anonymous_rw && size >= smallest;
            if guest_vma {
                let ram = size.min(ram_left);
                ram_left -= ram;
                resident.guest_vma_extra += size - ram;
                vmas.push((start, end));
            }
        }
    }
    (resident, vmas)
}

/// What the probe saw at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Since the probe's origin (the `migrate` command), in ms.
    pub t_ms: f64,
    pub source: Option<Resident>,
    pub destination: Option<Resident>,
}

/// Samples both VMs' memory on a thread of its own until [`MemoryProbe::finish`].
pub struct MemoryProbe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Trace>,
}

impl MemoryProbe {
    /// Starts sampling the source and destination processes now; times count from `origin`.
    pub fn start(origin: Instant, source: i32, destination: i32, ram_ranges: Vec<u64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut trace = Trace::default();
            let mut baselines: [Option<GuestVmas>; 2] = [None, None];
            loop {
                let began = Instant::now();
                let t_ms = origin.elapsed().as_secs_f64() * 1000.0;
                let mut read = |index: usize, pid: i32| {
                    let (resident, vmas) = resident(pid, &ram_ranges, baselines[index].as_ref())?;
                    baselines[index].get_or_insert(vmas);
                    Some(resident)
                };
                let sample = Sample {
                    t_ms,
                    source: read(0, source),
                    destination: read(1, destination),
                };
                let cost = began.elapsed();
                trace.read_ms_max = trace.read_ms_max.max(cost.as_secs_f64() * 1000.0);
                trace.samples.push(sample);
                // One last sample after the stop, so the end of the migration is in the trace.
                if stopped.load(Ordering::Acquire) {
                    return trace;
                }
                let until = Instant::now() + (cost * COST_FACTOR).max(MIN_INTERVAL);
                while Instant::now() < until && !stopped.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Self { stop, thread }
    }

    /// Stops sampling (after one last sample) and returns what it saw.
    pub fn finish(self) -> Trace {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

/// Which VM of a migration.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    Source,
    Destination,
}

/// The samples of one migration.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub samples: Vec<Sample>,
    /// The longest a sample took to read, in ms.
    pub read_ms_max: f64,
}

impl Trace {
    fn side(&self, side: Side) -> impl Iterator<Item = (f64, Resident)> + '_ {
        self.samples.iter().filter_map(move |s| {
            let resident = match side {
                Side::Source => s.source,
                Side::Destination => s.destination,
            };
            Some((s.t_ms, resident?))
        })
    }

    /// The most memory of ferry's own one side had at any sample, in bytes.
    pub fn peak_overhead(&self, side: Side) -> Option<u64> {
        self.side(side).map(|(_, r)| r.overhead).max()
    }

    /// The most resident memory in all.
    pub fn peak_total(&self, side: Side) -> Option<u64> {
        self.side(side).map(|(_, r)| r.total).max()
    }

    /// Ferry's own memory at the first sample, just before `migrate`.
    pub fn baseline_overhead(&self, side: Side) -> Option<u64> {
        self.side(side).next().map(|(_, r)| r.overhead)
    }

    /// The largest excess of the guest RAM VMAs over the RAM at the first sample, whose
    /// resident part counts as guest (see the module's doc).
    pub fn guest_vma_extra(&self, side: Side) -> Option<u64> {
        self.side(side).next().map(|(_, r)| r.guest_vma_extra)
    }

    /// (ms, MiB) of one side's overhead, for the plots.
    pub fn overhead_mib(&self, side: Side) -> Vec<(f64, f64)> {
        self.side(side)
            .map(|(t, r)| (t / 1000.0, r.overhead as f64 / MIB))
            .collect()
    }

    pub fn to_json(&self) -> Value {
        let side = |side: Side| {
            let rows: Vec<Value> = self
                .side(side)
                .map(|(t, r)| json!([t.round() as u64, r.total, r.guest, r.overhead]))
                .collect();
            json!({
                "peak_overhead": self.peak_overhead(side),
                "baseline_overhead": self.baseline_overhead(side),
                "peak_total": self.peak_total(side),
                "guest_vma_extra": self.guest_vma_extra(side),
                "samples": rows,
            })
        };
        json!({
            "columns": ["t_ms", "rss", "guest_rss", "overhead"],
            "read_ms_max": self.read_ms_max,
            "source": side(Side::Source),
            "destination": side(Side::Destination),
        })
    }
}
