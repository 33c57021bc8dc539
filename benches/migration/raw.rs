//! The raw transports: a socket pair moving the same bytes as a migration, the reference
//! ferry's bandwidth is compared with.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::case::{Options, Transport};
use crate::probe::CpuProbe;
use crate::stats::{stats_json, Stats};
use crate::GIB;

/// Raw socket runs per transport at least (they take about a second each).
const RAW_MIN_RUNS: usize = 5;
/// Bytes each raw socket measurement moves.
const RAW_BYTES: u64 = 2 << 30;
/// Bytes each raw measurement into fresh memory moves (it takes seconds on this host).
const FRESH_RAW_BYTES: u64 = 1 << 30;
/// The size of every write and read of the raw measurement: about one frame of ferry's (1024
/// pages).
const RAW_IO_SIZE: usize = 4 << 20;

/// The raw throughput of one transport, in GiB/s.
pub(crate) struct RawFigures {
    pub(crate) transport: Transport,
    pub(crate) runs: Vec<f64>,
    /// With the reader landing the bytes in memory it never touched before, as a destination
    /// does with guest RAM: what first-touching memory costs on this host comes on top.
    fresh_runs: Vec<f64>,
    /// Cores' worth of CPU other processes used while the runs went on.
    pub(crate) other_cores: Option<f64>,
}

impl RawFigures {
    pub(crate) fn medians(&self) -> Raw {
        Raw {
            socket: Stats::of(&self.runs).map(|s| s.median),
            fresh: Stats::of(&self.fresh_runs).map(|s| s.median),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "transport": self.transport.name(),
            "bytes": RAW_BYTES,
            "io_size": RAW_IO_SIZE,
            "gib_per_s": stats_json(Stats::of(&self.runs)),
            "runs_gib_per_s": self.runs,
            "fresh_memory": {
                "bytes": FRESH_RAW_BYTES,
                "gib_per_s": stats_json(Stats::of(&self.fresh_runs)),
                "runs_gib_per_s": self.fresh_runs,
            },
            "other_cpu_cores": self.other_cores,
        })
    }
}

/// The raw medians of a case's transport, GiB/s.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Raw {
    pub(crate) socket: Option<f64>,
    pub(crate) fresh: Option<f64>,
}

/// Where the raw measurement's reader puts the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    /// One buffer, read into again and again (always resident).
    Reused,
    /// Memory the process never touched: each page is first touched by the read.
    Fresh,
}

/// Moves `bytes` from a memory buffer through a connected socket pair, with writes of
/// [`RAW_IO_SIZE`] on this thread and the reader on another, which reads into `landing`;
/// returns GiB/s.
fn raw_throughput(transport: Transport, bytes: u64, landing: Landing) -> anyhow::Result<f64> {
    let timeout = Some(Duration::from_secs(30));
    let (mut writer, reader): (Box<dyn Write>, Box<dyn Read + Send>) = match transport {
        Transport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let writer = TcpStream::connect(listener.local_addr()?)?;
            let (reader, _) = listener.accept()?;
            writer.set_write_timeout(timeout)?;
            reader.set_read_timeout(timeout)?;
            (Box::new(writer), Box::new(reader))
        }
        Transport::Unix => {
            let (writer, reader) = UnixStream::pair()?;
            writer.set_write_timeout(timeout)?;
            reader.set_read_timeout(timeout)?;
            (Box::new(writer), Box::new(reader))
        }
    };
    // Made before the clock starts; a zeroed allocation this large is fresh anonymous memory.
    let mut target = match landing {
        Landing::Reused => vec![1u8; RAW_IO_SIZE],
        Landing::Fresh => {
            let fresh = vec![0u8; bytes as usize];
            // Backed as ferry backs guest RAM, so that landing in it costs what landing in a
            // destination's RAM does; a host without THP leaves it on small pages, as ferry.
            let _ = ferry::machine::memory::advise_huge_pages(&fresh);
            fresh
        }
    };
    let receiver = std::thread::spawn(move || -> std::io::Result<Instant> {
        let mut reader = reader;
        let mut received = 0usize;
        while received < bytes as usize {
            let at = match landing {
                Landing::Reused => 0,
                Landing::Fresh => received,
            };
            let end = (at + RAW_IO_SIZE).min(target.len());
            match reader.read(&mut target[at..end])? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => received += n,
            }
        }
        Ok(Instant::now())
    });
    let buffer = vec![0x5au8; RAW_IO_SIZE];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(RAW_IO_SIZE as u64) as usize;
        writer.write_all(&buffer[..n])?;
        sent += n as u64;
    }
    let finished = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    Ok(bytes as f64 / GIB / (finished - started).as_secs_f64())
}

pub(crate) fn raw_section(options: &Options) -> anyhow::Result<Vec<RawFigures>> {
    println!(
        "== raw socket throughput: {} GiB from memory in {} MiB writes, reader on another thread \
         (fresh: {} GiB read into memory never touched before, on huge pages, as a \
         destination's guest RAM)",
        RAW_BYTES >> 30,
        RAW_IO_SIZE >> 20,
        FRESH_RAW_BYTES >> 30
    );
    let raw_runs = options.runs.max(RAW_MIN_RUNS);
    println!(
        "{:<9} {:>10} {:>10} {:>10}   ({raw_runs} runs; other processes' CPU in cores)",
        "GiB/s", "median", "min", "max"
    );
    let mut raw = Vec::new();
    for transport in Transport::ALL {
        let probe = CpuProbe::start(vec![std::process::id()]);
        let measure = |bytes, landing, runs| {
            (0..runs)
                .map(|_| raw_throughput(transport, bytes, landing))
                .collect::<anyhow::Result<Vec<f64>>>()
                .with_context(|| format!("raw {} throughput", transport.name()))
        };
        let runs = measure(RAW_BYTES, Landing::Reused, raw_runs)?;
        let fresh_runs = measure(FRESH_RAW_BYTES, Landing::Fresh, options.runs)?;
        let other_cores = probe.and_then(|p| p.other_cores());
        for (name, runs) in [("", &runs), (" fresh", &fresh_runs)] {
            let s = Stats::of(runs).expect("at least one run");
            println!(
                "{:<9} {:>10.2} {:>10.2} {:>10.2}   others {}",
                format!("{}{name}", transport.name()),
                s.median,
                s.min,
                s.max,
                other_cores.map_or("?".into(), |c| format!("{c:.2}")),
            );
        }
        raw.push(RawFigures {
            transport,
            runs,
            fresh_runs,
            other_cores,
        });
    }
    println!();
    Ok(raw)
}
