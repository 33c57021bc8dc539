//! The built-in guest program, and how to read what it prints.
//!
//! [`BUILTIN_GUEST`] is a small freestanding x86-64 program, built from
//! `guest/` (C and GNU assembler) by `build.rs`. ferry runs it when no kernel
//! is given, and the tests use it to exercise vCPUs, the LAPIC timer, serial
//! output, reset and migration. On this project's KVM (PVM), ring-0 code is
//! emulated instruction by instruction and ring-3 code runs natively, so the
//! guest sets up in ring 0 as briefly as it can and runs its loops in ring 3.
//! `guest/README.md` describes its insides.
//!
//! # Boot
//!
//! An ELF64 image linked at 1 MiB with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`):
//! it is entered in 32-bit protected mode with `%ebx` pointing at
//! `struct hvm_start_info` (command line, memory map). It finds the CPUs in
//! ACPI's MADT, else in the Intel MP table, else by broadcasting INIT-SIPI-SIPI
//! and counting who answers. The AP trampoline is copied to 0x10000. It routes
//! ferry's ACPI power button (IOAPIC pin 23) to the BSP, which prints `power button`
//! and powers off through the FADT's sleep control register when it is pressed.
//!
//! # Command line
//!
//! Words are separated by spaces; only `ferry.*` words are read, others are
//! ignored. An unknown `ferry.*` word or a bad value prints a `warning:` line.
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `ferry.run=LIST` | comma-separated: `tick`, `sweep`, `tsc`, `disk` (see [Disk](#disk)); actions `reset`, `poweroff` (through ACPI's sleep control register), `triplefault`; `echo` (the BSP prints each line it receives on the UART as `echo: LINE`) | `tick,sweep,tsc` |
//! | `ferry.tick_ms=N` | LAPIC timer period in ms (N > 0) | 1000 |
//! | `ferry.idle=hlt\|poll` | what a vCPU with nothing left to do does between ticks: halt until the next interrupt, as an idle OS does (the host core is free), or spin in ring 3 | poll |
//! | `ferry.sweep_mb=N` | cap on each CPU's total slice size, MiB (0 = no cap) | no cap |
//! | `ferry.fill=PERCENT` | before `ready`, the BSP fills this share (0..=100) of free RAM, from its low end, with [`fill_word`]'s pattern, which then never changes; the slices split only the rest | 0 |
//! | `ferry.dirty_mbps=N` | the sweep writes about N MiB/s (N × 256 pages/s; MiB, not QMP's megabits) in total, split evenly over the CPUs that sweep; 0 = as fast as it can | 0 |
//! | `ferry.blackout[=MS]` | every CPU reports each stretch longer than MS ms in which it did not run, as `gap` lines; bare = 1 ms, 0 = off | off |
//! | `ferry.disk_blocks=N` | 4 KiB blocks the `disk` workload uses (more than the disk holds: a warning, then the whole disk); 0 = the default | the whole disk, at most 4096 (16 MiB) |
//!
//! `ferry.dirty_mbps` and `ferry.blackout` need the TSC frequency: the BSP measures it once
//! before `ready` (25 ms against the LAPIC timer, whose KVM bus runs at 1 GHz; CPUID leaves
//! 0x40000010, 0x15, 0x16 as a fallback) and prints it as `tsc khz=N`. Without these keys
//! nothing is measured and no new line appears: the output is as before.
//!
//! Pacing: each sweeping CPU waits on the TSC before each page so that its pages follow a
//! fixed schedule. When it falls behind (preempted by the host, throttled, slowed by dirty
//! logging, a short stop), it catches up at full speed on at most 50 ms of lag; beyond that
//! the schedule restarts from the present, so a long stop is not followed by a long burst.
//! The rate is therefore a ceiling that holds on average while the vCPUs get enough CPU time.
//!
//! # Serial protocol (COM1, one line per event, `\n`-terminated)
//!
//! Lines from different CPUs never interleave. In order:
//!
//! ```text
//! ferry-guest: cpus=2 ram=536345600 cmdline="ferry.tick_ms=200"
//! warning: unknown option ferry.bogus=1          (zero or more)
//! cpu 0 online apic=0                            (one per CPU, by index)
//! cpu 1 online apic=1
//! tsc khz=2599989                                (with dirty_mbps or blackout)
//! disk found addr=03.0 capacity=131072 blk_size=512 ro=0 blocks=4096 serial=abc  (with `disk`)
//! disk beyond-end status=1
//! disk ro-write status=1                         (with `disk`, read-only device)
//! fill pages=65024 start=0x400000 end=0x10200000 (with fill: per range, in address order)
//! slice cpu=0 start=0x10200000 end=0x18100000    (with `sweep`: per CPU, in sweep order)
//! slice cpu=1 start=0x18100000 end=0x20000000
//! ready
//! ```
//!
//! `fill pages=N start=0x… end=0x…`: the BSP has written the fill pattern to every page of
//! that range of guest-physical RAM (end exclusive, page aligned, N = (end − start) / 4096).
//! A fill that crosses a hole in the memory map prints one line per range. The filled pages
//! come first in free RAM (from 4 MiB or just above the guest's own data) and never change
//! afterwards; the slices follow them.
//!
//! then, from every CPU, for as long as it runs:
//!
//! - `tick N cpu=I`: the Nth LAPIC timer interrupt of CPU I (N from 1, none
//!   skipped; lines may lag the interrupts).
//! - `sweep N cpu=I`: CPU I finished its Nth pass over its slices.
//! - `tsc backwards cpu=I prev=0x… now=0x…`: `rdtsc` went backwards on CPU I.
//! - `gap cpu=I us=N ago=M` (with `ferry.blackout`): CPU I went N µs between two of its TSC
//!   readings, more than the threshold. A CPU reads the TSC at least every 4 pages of its
//!   sweep, on every turn of its idle loop, and for every byte it prints or spins on the
//!   serial lock, so a gap is time the vCPU did not run: a QMP `stop`, a migration's
//!   switchover, the host preempting its thread (on a busy 2-core host, gaps of 1–20 ms
//!   are common; a threshold of 5 ms or more keeps them down). The line comes after the
//!   fact, from the CPU's next poll, M µs after the gap ended (M grows when ticks queued
//!   up to be printed first); if several gaps end before that, the largest is reported.
//! - `gap cpu=I us=N ago=M stopped` (with `ferry.blackout`): the gap across which the VMM stopped
//!   CPU I, whatever its length. KVM's clock tells the guest (`PVCLOCK_GUEST_STOPPED`, which
//!   ferry sets on every resume), so the line is told apart from the host's preemptions and
//!   from stalls still waiting to be reported. After a migration, it is the CPU's own
//!   measurement of the blackout: from its last reading on the source to its first on the
//!   destination. On this project's PVM host, ring-3 `rdtsc` reads the host's TSC itself
//!   (no offset: a guest sees the host's uptime), which both ferry processes share, so the
//!   figure is the true blackout, including any time the host keeps the vCPU off its core
//!   right after it runs again. A CPU halted through the stop lost no time, and reports
//!   how late its timer came (often not at all). Where KVM applies the migrated TSC (VT-x/SVM), ferry moves it on by the time the
//!   state spent in transit, so the figure means the same there (not verified on such a
//!   host).
//!
//! - `disk …` (with `disk`, from the BSP): see [Disk](#disk).
//!
//! and, from the BSP after `ready`: `resetting` (then the i8042 reset, port
//! 0x64 ← 0xfe) or `triple-faulting` (then an empty IDT and a fault). A
//! `fatal: …` line reports an unexpected exception; that CPU then halts.
//!
//! Each CPU's slices are ranges of guest-physical RAM (end exclusive, page
//! aligned) whose pages' first bytes it increments in sweep order forever.
//! The first pass stores 1 instead (RAM may hold firmware leftovers), so once
//! CPU I has printed `sweep 1 cpu=I`, a copy of its slices taken with the
//! vCPUs stopped must pass [`pattern::check_dump`]. Slices start at 4 MiB or
//! above and never cover the guest's own code, stacks or page tables.
//!
//! # Disk
//!
//! With `ferry.run=disk` the BSP drives the first virtio-blk device on PCI bus 0 with a
//! driver of its own (`guest/virtio_blk.c`): configuration space through ports
//! 0xcf8/0xcfc, modern virtio 1.x only (device 0x1042, or 0x1001 offering VERSION_1), the
//! BARs as found (never moved; ones above the boot page tables' reach are mapped on
//! demand), features VERSION_1 plus RO, BLK_SIZE, FLUSH, SEG_MAX and RING_EVENT_IDX when
//! offered, queue 0 a split ring of min(device maximum, 128) entries in 112 KiB reserved below
//! the fill and the slices, MSI-X entry 0 to the BSP (the config vector is NO_VECTOR). Up to
//! 8 blocks are worked on at once, each request with its own descriptors and buffer, plus a
//! flush; completions are taken in the order the used ring reports them. The BSP finds them
//! by polling the used ring from its `poll()` (between sweep pages, or in its idle loop), so
//! no port I/O; with EVENT_IDX it notifies the device only when `avail_event` asks, and asks
//! through `used_event` for an interrupt at its next completion. It counts the interrupts in
//! ring 0. The lines ([`DiskLine`], as `GuestLine::Disk`):
//!
//! - `disk found addr=SS.F capacity=SECTORS blk_size=N ro=0|1 blocks=N serial=S`, before
//!   `ready`: slot (2 hex digits) and function, capacity in 512-byte sectors, the blocks the
//!   workload uses, the serial from VIRTIO_BLK_T_GET_ID (at most 20 bytes; anything but
//!   printable non-space ASCII shown as `?`; empty if the device has none).
//! - `disk beyond-end status=N`: the status of a 4 KiB read at sector `capacity`; a correct
//!   device says 1 (IOERR).
//! - `disk ro-write status=N` (read-only device): the status of a write of block 0 (with the
//!   content it should hold anyway); 1 is right.
//! - `disk gen=G done=B irqs=I inflight=K` (read-write device): generations G = 1, 2, …; in
//!   each pass, for every block b: if G > 1 read b and check it holds G−1, write b at G, read
//!   it back and check. Once every block below the next multiple of 64 (or all of them) is
//!   done, it issues a FLUSH (when offered) and, when the flush ends, prints this line:
//!   blocks `[0, B)` hold G, blocks `[B, N)` hold G−1 (anything while G is 1: the disk is
//!   not assumed fresh), except that the blocks in flight may already hold G: after this
//!   line the guest starts no block at or past B + [`disk::DISK_AHEAD_BLOCKS`] (128) before
//!   the next line, and no block of the next pass before the pass's last line. I counts the
//!   device's interrupts so far (with EVENT_IDX, about one each time the device runs out of
//!   requests); K is the requests in flight as the line is printed.
//! - `disk ro verified pass=P` (read-only device): pass P read every block and found
//!   generation 1 (the host writes it first, with [`disk::write_image`]).
//! - `disk mismatch block=B gen=G expected=E found=F word=W value=0x…`: block B should have
//!   held generation E during pass G (read-only: 1), but its word W holds `value`, whose
//!   generation field is F. The disk workload stops; the others go on.
//! - `disk error op=read|write|flush|get-id block=B status=S`: a request ended with status
//!   S (for a flush, B is the blocks done). The disk workload stops.
//! - `warning: disk: …`: no device, or it could not be set up; the workload is off.
//!
//! The blocks hold [`disk::disk_word`]'s pattern: every 8-byte word names its block,
//! generation and index. [`disk::check_image`] checks an image file against a `disk gen=G
//! done=B` line (any of the 128 blocks from B on may be ahead of the last line).

pub mod disk;
pub mod pattern;

pub use disk::{DiskLine, DiskProgress};
pub use pattern::{check_fill, fill_word};

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::Instant;

/// The guest program as an ELF image, for ferry's PVH loader.
pub const BUILTIN_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

/// One line of the guest's serial output, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// `ferry-guest: cpus=N ram=BYTES cmdline="…"`, always the first line.
    Banner {
        /// CPUs that came online.
        cpus: u32,
        /// Bytes of RAM in the memory map.
        ram: u64,
        /// The command line, verbatim.
        cmdline: String,
    },
    /// `warning: …` (unknown option, bad value, fewer CPUs than listed, …).
    Warning(String),
    /// `cpu I online apic=A`.
    CpuOnline {
        /// CPU index (0 is the BSP).
        cpu: u32,
        /// Its LAPIC ID.
        apic: u32,
    },
    /// `slice cpu=I start=0x… end=0x…`: part of the RAM CPU I sweeps.
    Slice {
        /// CPU index.
        cpu: u32,
        /// First byte (page aligned).
        start: u64,
        /// End, exclusive (page aligned).
        end: u64,
    },
    /// `tsc khz=N`: the TSC frequency the guest measured (only with `ferry.dirty_mbps` or
    /// `ferry.blackout`).
    TscKhz {
        /// TSC ticks per millisecond.
        khz: u64,
    },
    /// `fill pages=N start=0x… end=0x…`: a range of RAM holding [`fill_word`]'s pattern.
    Fill {
        /// Pages in the range, `(end - start) / 4096`.
        pages: u64,
        /// First byte (page aligned).
        start: u64,
        /// End, exclusive (page aligned).
        end: u64,
    },
    /// `ready`: setup is over and the workloads start.
    Ready,
    /// `tick N cpu=I`.
    Tick {
        /// Count of timer interrupts on this CPU, from 1.
        n: u64,
        /// CPU index.
        cpu: u32,
    },
    /// `sweep N cpu=I`.
    Sweep {
        /// Number of completed passes on this CPU, from 1.
        n: u64,
        /// CPU index.
        cpu: u32,
    },
    /// `tsc backwards cpu=I prev=0x… now=0x…`.
    TscBackwards {
        /// CPU index.
        cpu: u32,
        /// The earlier reading.
        prev: u64,
        /// The later, smaller reading.
        now: u64,
    },
    /// `gap cpu=I us=N ago=M [stopped]`: CPU I did not run for N µs (`ferry.blackout`), a
    /// stretch that ended M µs before the line was printed; `stopped` if the VMM stopped it
    /// meanwhile, as KVM's clock told the guest.
    Gap {
        /// CPU index.
        cpu: u32,
        /// Length of the gap in microseconds, by the guest's TSC.
        us: u64,
        /// How long before the line the gap ended, in microseconds: gaps are printed late
        /// (held back for a late stop flag, or behind ticks waiting to be printed).
        ago_us: u64,
        /// The host stopped the CPU (a pause, a migration's switchover).
        stopped: bool,
    },
    /// `resetting`: the guest is about to reset the machine through the i8042.
    Resetting,
    /// `triple-faulting`: the guest is about to triple fault.
    TripleFaulting,
    /// `disk …`: the disk workload (`ferry.run=disk`).
    Disk(DiskLine),
    /// `fatal: …`: an unexpected exception; the CPU halts.
    Fatal(String),
    /// Anything else.
    Other(String),
}

impl GuestLine {
    /// Parses one line (a trailing `\r` or `\n` is ignored). Never fails:
    /// a line that does not match the protocol is [`GuestLine::Other`].
    pub fn parse(line: &str) -> GuestLine {
        let line = line.trim_end_matches(['\r', '\n']);
        Self::parse_known(line).unwrap_or_else(|| GuestLine::Other(line.to_string()))
    }

    fn parse_known(line: &str) -> Option<GuestLine> {
        if let Some(rest) = line.strip_prefix("ferry-guest: ") {
            let (fields, cmdline) = rest.split_once(" cmdline=\"")?;
            let cmdline = cmdline.strip_suffix('"')?;
            let [cpus, ram] = fields_of(fields, ["cpus", "ram"])?;
            return Some(GuestLine::Banner {
                cpus: cpus.parse().ok()?,
                ram: ram.parse().ok()?,
                cmdline: cmdline.to_string(),
            });
        }
        if let Some(rest) = line.strip_prefix("warning: ") {
            return Some(GuestLine::Warning(rest.to_string()));
        }
        if let Some(rest) = line.strip_prefix("fatal: ") {
            return Some(GuestLine::Fatal(rest.to_string()));
        }
        if let Some(rest) = line.strip_prefix("cpu ") {
            let (cpu, rest) = rest.split_once(" online ")?;
            let [apic] = fields_of(rest, ["apic"])?;
            return Some(GuestLine::CpuOnline {
                cpu: cpu.parse().ok()?,
                apic: apic.parse().ok()?,
            });
        }
        if let Some(rest) = line.strip_prefix("slice ") {
            let [cpu, start, end] = fields_of(rest, ["cpu", "start", "end"])?;
            return Some(GuestLine::Slice {
                cpu: cpu.parse().ok()?,
                start: hex(start)?,
                end: hex(end)?,
            });
        }
        if let Some(rest) = line.strip_prefix("tsc backwards ") {
            let [cpu, prev, now] = fields_of(rest, ["cpu", "prev", "now"])?;
            return Some(GuestLine::TscBackwards {
                cpu: cpu.parse().ok()?,
                prev: hex(prev)?,
                now: hex(now)?,
            });
        }
        if let Some(rest) = line.strip_prefix("tsc ") {
            let [khz] = fields_of(rest, ["khz"])?;
            return Some(GuestLine::TscKhz {
                khz: khz.parse().ok()?,
            });
        }
        if let Some(rest) = line.strip_prefix("fill ") {
            let [pages, start, end] = fields_of(rest, ["pages", "start", "end"])?;
            return Some(GuestLine::Fill {
                pages: pages.parse().ok()?,
                start: hex(start)?,
                end: hex(end)?,
            });
        }
        if let Some(rest) = line.strip_prefix("gap ") {
            let (rest, stopped) = match rest.strip_suffix(" stopped") {
                Some(rest) => (rest, true),
                None => (rest, false),
            };
            let [cpu, us, ago] = fields_of(rest, ["cpu", "us", "ago"])?;
            return Some(GuestLine::Gap {
                cpu: cpu.parse().ok()?,
                us: us.parse().ok()?,
                ago_us: ago.parse().ok()?,
                stopped,
            });
        }
        if let Some(rest) = line.strip_prefix("disk ") {
            return DiskLine::parse(rest).map(GuestLine::Disk);
        }
        if let Some(rest) = line.strip_prefix("tick ") {
            let (n, cpu) = count_and_cpu(rest)?;
            return Some(GuestLine::Tick { n, cpu });
        }
        if let Some(rest) = line.strip_prefix("sweep ") {
            let (n, cpu) = count_and_cpu(rest)?;
            return Some(GuestLine::Sweep { n, cpu });
        }
        match line {
            "ready" => Some(GuestLine::Ready),
            "resetting" => Some(GuestLine::Resetting),
            "triple-faulting" => Some(GuestLine::TripleFaulting),
            _ => None,
        }
    }
}

/// The values of `key=value` words, which must be exactly `keys` in order.
fn fields_of<'a, const N: usize>(s: &'a str, keys: [&str; N]) -> Option<[&'a str; N]> {
    let mut words = s.split(' ');
    let mut values = [""; N];
    for (value, key) in values.iter_mut().zip(keys) {
        let (k, v) = words.next()?.split_once('=')?;
        if k != key {
            return None;
        }
        *value = v;
    }
    words.next().is_none().then_some(values)
}

/// `N cpu=I`, the tail of `tick` and `sweep` lines.
fn count_and_cpu(s: &str) -> Option<(u64, u32)> {
    let (n, rest) = s.split_once(' ')?;
    let [cpu] = fields_of(rest, ["cpu"])?;
    Some((n.parse().ok()?, cpu.parse().ok()?))
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// Prints the line exactly as the guest does (without the newline).
impl fmt::Display for GuestLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestLine::Banner { cpus, ram, cmdline } => {
                write!(
                    f,
                    "ferry-guest: cpus={cpus} ram={ram} cmdline=\"{cmdline}\""
                )
            }
            GuestLine::Warning(s) => write!(f, "warning: {s}"),
            GuestLine::CpuOnline { cpu, apic } => write!(f, "cpu {cpu} online apic={apic}"),
            GuestLine::Slice { cpu, start, end } => {
                write!(f, "slice cpu={cpu} start={start:#x} end={end:#x}")
            }
            GuestLine::TscKhz { khz } => write!(f, "tsc khz={khz}"),
            GuestLine::Fill { pages, start, end } => {
                write!(f, "fill pages={pages} start={start:#x} end={end:#x}")
            }
            GuestLine::Ready => f.write_str("ready"),
            GuestLine::Tick { n, cpu } => write!(f, "tick {n} cpu={cpu}"),
            GuestLine::Sweep { n, cpu } => write!(f, "sweep {n} cpu={cpu}"),
            GuestLine::TscBackwards { cpu, prev, now } => {
                write!(f, "tsc backwards cpu={cpu} prev={prev:#x} now={now:#x}")
            }
            GuestLine::Gap {
                cpu,
                us,
                ago_us,
                stopped,
            } => {
                write!(f, "gap cpu={cpu} us={us} ago={ago_us}")?;
                if *stopped {
                    f.write_str(" stopped")?;
                }
                Ok(())
            }
            GuestLine::Resetting => f.write_str("resetting"),
            GuestLine::TripleFaulting => f.write_str("triple-faulting"),
            GuestLine::Disk(d) => write!(f, "disk {d}"),
            GuestLine::Fatal(s) => write!(f, "fatal: {s}"),
            GuestLine::Other(s) => f.write_str(s),
        }
    }
}

/// The counts of CPU `cpu`'s `tick N cpu=I` lines among `lines`, in order.
pub fn ticks(lines: &[GuestLine], cpu: u32) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| match l {
            GuestLine::Tick { n, cpu: c } if *c == cpu => Some(*n),
            _ => None,
        })
        .collect()
}

/// The number of the last sweep CPU `cpu` reported among `lines` (0 before its first).
pub fn last_sweep(lines: &[GuestLine], cpu: u32) -> u64 {
    lines
        .iter()
        .filter_map(|l| match l {
            GuestLine::Sweep { n, cpu: c } if *c == cpu => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Each CPU's slices, in sweep order, from the `slice` lines among `lines`:
/// what [`pattern::check_dump`] wants for each CPU.
pub fn slices_by_cpu<'a, I>(lines: I) -> BTreeMap<u32, Vec<Range<u64>>>
where
    I: IntoIterator<Item = &'a GuestLine>,
{
    let mut slices: BTreeMap<u32, Vec<Range<u64>>> = BTreeMap::new();
    for line in lines {
        if let GuestLine::Slice { cpu, start, end } = *line {
            slices.entry(cpu).or_default().push(start..end);
        }
    }
    slices
}

/// The ranges the guest filled (`ferry.fill`), from the `fill` lines among `lines`, in
/// address order: what [`check_fill`] wants.
pub fn fill_ranges<'a, I>(lines: I) -> Vec<Range<u64>>
where
    I: IntoIterator<Item = &'a GuestLine>,
{
    lines
        .into_iter()
        .filter_map(|line| match *line {
            GuestLine::Fill { start, end, .. } => Some(start..end),
            _ => None,
        })
        .collect()
}

/// The blackout the guest saw across the stop its lines follow (a migration's destination
/// output): the longest of each CPU's first `gap ... stopped` line, the gap across which the
/// VMM stopped that CPU; `None` until every one of `cpus` has printed one.
///
/// KVM's clock tells the guest of the stop, so a stall from before it that a CPU reports late
/// cannot pass for it. A CPU halted through the stop reports how late its timer came.
pub fn stop_blackout_us(lines: &[GuestLine], cpus: u32) -> Option<u64> {
    let mut stopped: Vec<Option<u64>> = vec![None; cpus as usize];
    for line in lines {
        if let GuestLine::Gap {
            cpu,
            us,
            stopped: true,
            ..
        } = *line
        {
            if let Some(slot @ None) = stopped.get_mut(cpu as usize) {
                *slot = Some(us);
            }
        }
    }
    stopped
        .into_iter()
        .collect::<Option<Vec<u64>>>()?
        .into_iter()
        .max()
}

/// A `gap` report placed in time: CPU `cpu` went `us` µs without running, a stretch that
/// ended `end_ms` after a reference instant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlacedGap {
    /// The line's arrival less how long before it the guest says the gap ended. Late by the
    /// time the guest takes to print the line (a fraction of a ms), more if another CPU held
    /// the serial lock.
    pub end_ms: f64,
    pub cpu: u32,
    pub us: u64,
    /// Across one of the VMM's stops (a pause, a switchover), as KVM's clock told the guest.
    pub stopped: bool,
}

impl PlacedGap {
    /// When the gap began, in ms after the reference instant.
    pub fn start_ms(self) -> f64 {
        self.end_ms - self.us as f64 / 1000.0
    }

    /// How much of the gap lies after `t_ms`, in ms (0 if it ended before).
    pub fn ms_after(self, t_ms: f64) -> f64 {
        (self.end_ms - self.start_ms().max(t_ms)).max(0.0)
    }
}

/// The gaps the `gap` lines among `arrived` (lines with the instant each arrived, as
/// [`crate::harness::Ferry::arrived_guest_lines_from`] gives them) report, placed in ms after
/// `since`.
pub fn placed_gaps(arrived: &[(Instant, GuestLine)], since: Instant) -> Vec<PlacedGap> {
    arrived
        .iter()
        .filter_map(|(at, line)| match *line {
            GuestLine::Gap {
                cpu,
                us,
                ago_us,
                stopped,
            } => {
                let arrived_ms = at.saturating_duration_since(since).as_secs_f64() * 1000.0;
                Some(PlacedGap {
                    end_ms: arrived_ms - ago_us as f64 / 1000.0,
                    cpu,
                    us,
                    stopped,
                })
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn gaps_are_placed_where_they_ended_not_where_their_line_came() {
        let since = Instant::now();
        let at = |ms: u64| since + Duration::from_millis(ms);
        let arrived = [
            (at(50), "tick 3 cpu=0"),
            // Printed 40 ms after it ended, behind queued ticks: it ended at 10 ms.
            (at(50), "gap cpu=1 us=8000 ago=40000"),
            (at(60), "gap cpu=0 us=3000 ago=0 stopped"),
        ]
        .map(|(at, line)| (at, GuestLine::parse(line)));
        let gaps = placed_gaps(&arrived, since);
        assert_eq!(gaps.len(), 2);
        assert_eq!((gaps[0].cpu, gaps[0].us, gaps[0].stopped), (1, 8000, false));
        assert!((gaps[0].end_ms - 10.0).abs() < 1e-9, "{gaps:?}");
        assert!((gaps[0].start_ms() - 2.0).abs() < 1e-9, "{gaps:?}");
        assert!(gaps[1].stopped && (gaps[1].end_ms - 60.0).abs() < 1e-9);
    }

    #[test]
    fn only_the_part_of_a_gap_after_an_instant_counts_after_it() {
        let gap = PlacedGap {
            end_ms: 10.0,
            cpu: 0,
            us: 8000,
            stopped: false,
        };
        assert_eq!(gap.ms_after(0.0), 8.0);
        assert!((gap.ms_after(6.5) - 3.5).abs() < 1e-9);
        assert_eq!(gap.ms_after(10.0), 0.0);
        assert_eq!(gap.ms_after(20.0), 0.0);
    }

    #[test]
    fn the_blackout_is_the_longest_stop_and_nothing_else() {
        // A stall from before the switchover printed late, and one after it, do not count.
        let lines: Vec<GuestLine> = [
            "p cpu=1 us=900",
            "gap cpu=1 us=9000 ago=5000",
            "gap cpu=1 us=2100 ago=1200 stopped",
            "sweep 3 cpu=1",
            "gap cpu=0 us=2600 ago=1100 stopped",
            "gap cpu=0 us=7000 ago=1600",
            "gap cpu=0 us=500 ago=900 stopped",
        ]
        .into_iter()
        .map(GuestLine::parse)
        .collect();
        assert_eq!(stop_blackout_us(&lines, 2), Some(2600));
        assert_eq!(stop_blackout_us(&lines[..4], 2), None);
        assert_eq!(stop_blackout_us(&lines, 3), None);
    }

    #[test]
    fn ticks_and_last_sweep_pick_one_cpu() {
        let lines: Vec<GuestLine> = [
            "tick 1 cpu=0",
            "tick 1 cpu=1",
            "sweep 4 cpu=1",
            "tick 2 cpu=0",
            "sweep 3 cpu=0",
        ]
        .iter()
        .map(|l| GuestLine::parse(l))
        .collect();
        assert_eq!(ticks(&lines, 0), vec![1, 2]);
        assert_eq!(last_sweep(&lines, 1), 4);
        assert_eq!(last_sweep(&lines, 2), 0);
    }

    #[test]
    fn builtin_guest_is_an_elf64_with_a_pvh_note() {
        assert_eq!(&BUILTIN_GUEST[..4], b"\x7fELF");
        assert_eq!(BUILTIN_GUEST[4], 2, "ELFCLASS64");
        // The note's name and type (XEN_ELFNOTE_PHYS32_ENTRY = 18) as laid out.
        let note: &[u8] = &[4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
        assert!(BUILTIN_GUEST.windows(note.len()).any(|w| w == note));
    }

    /// Lines copied from a QEMU run of the guest.
    #[test]
    fn parses_every_kind_of_line() {
        let cases = [
            (
                "ferry-guest: cpus=2 ram=536345600 cmdline=\"console=ttyS0 ferry.tick_ms=200\"",
                GuestLine::Banner {
                    cpus: 2,
                    ram: 536_345_600,
                    cmdline: "console=ttyS0 ferry.tick_ms=200".into(),
                },
            ),
            (
                "ferry-guest: cpus=1 ram=4096 cmdline=\"\"",
                GuestLine::Banner {
                    cpus: 1,
                    ram: 4096,
                    cmdline: String::new(),
                },
            ),
            (
                "warning: unknown option ferry.bogus=1",
                GuestLine::Warning("unknown option ferry.bogus=1".into()),
            ),
            (
                "cpu 3 online apic=2",
                GuestLine::CpuOnline { cpu: 3, apic: 2 },
            ),
            (
                "slice cpu=0 start=0x100000000 end=0x100210000",
                GuestLine::Slice {
                    cpu: 0,
                    start: 0x1_0000_0000,
                    end: 0x1_0021_0000,
                },
            ),
            ("tsc khz=2599989", GuestLine::TscKhz { khz: 2_599_989 }),
            (
                "fill pages=65024 start=0x400000 end=0x10200000",
                GuestLine::Fill {
                    pages: 65024,
                    start: 0x40_0000,
                    end: 0x1020_0000,
                },
            ),
            ("ready", GuestLine::Ready),
            ("tick 17 cpu=1", GuestLine::Tick { n: 17, cpu: 1 }),
            (
                "gap cpu=1 us=503271 ago=1712",
                GuestLine::Gap {
                    cpu: 1,
                    us: 503_271,
                    ago_us: 1712,
                    stopped: false,
                },
            ),
            (
                "gap cpu=0 us=2250 ago=48130 stopped",
                GuestLine::Gap {
                    cpu: 0,
                    us: 2250,
                    ago_us: 48_130,
                    stopped: true,
                },
            ),
            ("sweep 2 cpu=0", GuestLine::Sweep { n: 2, cpu: 0 }),
            (
                "tsc backwards cpu=1 prev=0x1f00 now=0x1e00",
                GuestLine::TscBackwards {
                    cpu: 1,
                    prev: 0x1f00,
                    now: 0x1e00,
                },
            ),
            ("resetting", GuestLine::Resetting),
            ("triple-faulting", GuestLine::TripleFaulting),
            (
                "fatal: exception vector=14 error=0x2",
                GuestLine::Fatal("exception vector=14 error=0x2".into()),
            ),
        ];
        for (text, line) in cases {
            assert_eq!(GuestLine::parse(text), line, "{text}");
            assert_eq!(line.to_string(), text);
            assert_eq!(GuestLine::parse(&format!("{text}\r\n")), line);
        }
    }

    #[test]
    fn cmdline_may_contain_quotes() {
        assert_eq!(
            GuestLine::parse("ferry-guest: cpus=1 ram=1 cmdline=\"a=\"b c\"\""),
            GuestLine::Banner {
                cpus: 1,
                ram: 1,
                cmdline: "a=\"b c\"".into()
            }
        );
    }

    #[test]
    fn malformed_lines_are_other() {
        for text in [
            "",
            "tick",
            "tick x cpu=0",
            "tick 1 cpu=0 extra=1",
            "tick 1 core=0",
            "slice cpu=0 start=100 end=0x200",
            "cpu 0 online",
            "ferry-guest: cpus=2 ram=1",
            "readyish",
            "SeaBIOS (version 1.16.2)",
            "tsc khz=",
            "tsc khz=12 extra=1",
            "fill pages=1 start=0x1000",
            "fill pages=x start=0x1000 end=0x2000",
            "fill pages=1 start=4096 end=0x2000",
            "gap cpu=0",
            "gap cpu=0 us=-5",
            "gap us=5 cpu=0",
            "gap cpu=0 us=5 stopped=1",
            "gap cpu=0 us=5",
            "gap cpu=0 us=5 ago=x",
            "gap cpu=0 stopped",
        ] {
            assert_eq!(
                GuestLine::parse(text),
                GuestLine::Other(text.into()),
                "{text}"
            );
        }
    }

    #[test]
    fn groups_slices_by_cpu_in_order() {
        let lines: Vec<GuestLine> = [
            "slice cpu=0 start=0x400000 end=0x7ffe0000",
            "slice cpu=0 start=0x100000000 end=0x100210000",
            "slice cpu=1 start=0x100210000 end=0x180000000",
            "ready",
        ]
        .into_iter()
        .map(GuestLine::parse)
        .collect();
        let slices = slices_by_cpu(&lines);
        assert_eq!(
            slices[&0],
            vec![0x40_0000..0x7ffe_0000, 0x1_0000_0000..0x1_0021_0000]
        );
        assert_eq!(slices[&1], vec![0x1_0021_0000..0x1_8000_0000]);
        assert_eq!(slices.len(), 2);
    }

    #[test]
    fn collects_fill_ranges() {
        let lines: Vec<GuestLine> = [
            "tsc khz=2599989",
            "fill pages=523264 start=0x400000 end=0x80000000",
            "fill pages=1024 start=0x100000000 end=0x100400000",
            "slice cpu=0 start=0x100400000 end=0x140000000",
            "ready",
            "tick 1 cpu=0",
        ]
        .into_iter()
        .map(GuestLine::parse)
        .collect();
        assert_eq!(
            fill_ranges(&lines),
            vec![0x40_0000..0x8000_0000, 0x1_0000_0000..0x1_0040_0000]
        );
    }
}
