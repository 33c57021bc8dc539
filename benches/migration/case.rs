//! The bench's cases (transport, workload, guest size) and its command line.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use crate::blackout_ms;

const DEFAULT_RUNS: usize = 3;
/// The `max-bandwidth` of the capped case, MiB/s.
const CAPPED_MIB_PER_S: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    pub(crate) const ALL: [Self; 2] = [Self::Tcp, Self::Unix];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
        }
    }
}

/// A free TCP port on 127.0.0.1, or a socket in `dir`.
pub(crate) fn migration_uri(transport: Transport, dir: &Path) -> anyhow::Result<String> {
    Ok(match transport {
        Transport::Tcp => {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            format!("tcp:127.0.0.1:{port}")
        }
        Transport::Unix => format!("unix:{}", dir.join("migration.sock").display()),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// `ferry.run=tick`: the guest leaves its RAM alone.
    Idle,
    /// The default workloads: both vCPUs sweep all of RAM as fast as they can, QEMU's
    /// migration-test pattern.
    Sweep,
    /// `ferry.run=tick ferry.fill=PERCENT`: that share of RAM filled with non-zero data at boot,
    /// then left alone.
    Fill(u32),
    /// `ferry.dirty_mbps=N`: the sweep paced to N MiB/s over both vCPUs.
    Dirty(u32),
}

impl Workload {
    pub(crate) fn name(self) -> String {
        match self {
            Self::Idle => "idle".into(),
            Self::Sweep => "sweep".into(),
            Self::Fill(percent) => format!("fill{percent}"),
            Self::Dirty(mbps) => format!("dirty{mbps}"),
        }
    }

    /// The guest's command line.
    pub(crate) fn append(self) -> String {
        let workload = match self {
            // An idle guest halts its vCPUs, as an idle OS does, rather than spinning.
            Self::Idle => "ferry.run=tick ferry.idle=hlt ".into(),
            Self::Sweep => String::new(),
            Self::Fill(percent) => format!("ferry.run=tick ferry.idle=hlt ferry.fill={percent} "),
            Self::Dirty(mbps) => format!("ferry.dirty_mbps={mbps} "),
        };
        format!("{workload}ferry.blackout={}", blackout_ms())
    }

    /// The guest option the workload needs, which older guests do not know.
    pub(crate) fn option(self) -> Option<&'static str> {
        match self {
            Self::Idle | Self::Sweep => None,
            Self::Fill(_) => Some("ferry.fill"),
            Self::Dirty(_) => Some("ferry.dirty_mbps"),
        }
    }

    /// Whether the vCPUs sweep, so that the bench waits for their first pass (every page
    /// written once: round 0 has no zero pages to skip). They run through the switchover too,
    /// so the guest measures its blackout; the other workloads halt their vCPUs between ticks.
    pub(crate) fn sweeps(self) -> bool {
        matches!(self, Self::Sweep | Self::Dirty(_))
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Case {
    pub(crate) transport: Transport,
    pub(crate) workload: Workload,
    pub(crate) mem_mib: u64,
    /// `max-bandwidth` in MiB/s, if the case sets one.
    cap_mib_per_s: Option<u64>,
    /// The `multifd` capability off: every page over the control connection.
    pub(crate) one_connection: bool,
    /// The destination started with `-mem-prealloc`.
    prealloc: bool,
}

impl Case {
    /// A case as the defaults have it: no `max-bandwidth`, page connections on, and a
    /// destination that backs RAM as pages arrive.
    fn plain(transport: Transport, workload: Workload, mem_mib: u64) -> Self {
        Self {
            transport,
            workload,
            mem_mib,
            cap_mib_per_s: None,
            one_connection: false,
            prealloc: false,
        }
    }

    pub(crate) fn name(&self) -> String {
        format!(
            "{}-{}-{}g{}",
            self.transport.name(),
            self.workload.name(),
            self.mem_mib >> 10,
            self.suffix()
        )
    }

    pub(crate) fn label(&self) -> String {
        format!(
            "{:<4} {:<9} {} GiB{}",
            self.transport.name(),
            self.workload.name(),
            self.mem_mib >> 10,
            self.suffix()
        )
    }

    fn suffix(&self) -> String {
        let cap = self.cap_mib_per_s.map(|cap| format!("-cap{cap}m"));
        let one = self.one_connection.then(|| "-1conn".to_owned());
        let prealloc = self.prealloc.then(|| "-prealloc".to_owned());
        cap.into_iter().chain(one).chain(prealloc).collect()
    }

    /// What the destination is started with beyond the source's machine.
    pub(crate) fn destination_options(&self) -> &'static [&'static str] {
        if self.prealloc {
            &["-mem-prealloc"]
        } else {
            &[]
        }
    }

    pub(crate) fn max_bandwidth(&self) -> Option<u64> {
        self.cap_mib_per_s.map(|cap| cap << 20)
    }

    /// The whole migration, including 30 dirty rounds of a guest that never converges.
    pub(crate) fn migration_timeout(&self) -> Duration {
        Duration::from_secs(120 + 120 * (self.mem_mib >> 10))
    }

    /// The sweeping guest's first pass, which touches every page of its slices (at the paced
    /// rate, if there is one).
    pub(crate) fn first_pass_timeout(&self) -> Duration {
        let paced = match self.workload {
            Workload::Dirty(mbps) => 2 * self.mem_mib / u64::from(mbps.max(1)),
            _ => 0,
        };
        Duration::from_secs(60 + 60 * (self.mem_mib >> 10) + paced)
    }
}

/// What the command line and the environment ask for.
pub(crate) struct Options {
    pub(crate) runs: usize,
    pub(crate) quick: bool,
    filters: Vec<String>,
    pub(crate) out: PathBuf,
}

impl Options {
    pub(crate) fn parse() -> anyhow::Result<Self> {
        let mut quick = matches!(
            std::env::var("FERRY_BENCH_QUICK").as_deref(),
            Ok("1" | "true" | "yes")
        );
        let mut filters = Vec::new();
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--quick" => quick = true,
                // cargo bench passes --bench to benchmarks without libtest's harness.
                "--bench" => {}
                flag if flag.starts_with('-') => {
                    eprintln!("migration bench: ignoring the unknown option {flag}");
                }
                word => filters.push(word.to_owned()),
            }
        }
        let runs = match std::env::var("FERRY_BENCH_RUNS") {
            _ if quick => 1,
            Ok(runs) => match runs.parse() {
                Ok(runs) if runs > 0 => runs,
                _ => bail!("FERRY_BENCH_RUNS must be a positive number, not {runs:?}"),
            },
            Err(_) => DEFAULT_RUNS,
        };
        let out = std::env::var_os("FERRY_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                // CARGO_TARGET_TMPDIR is TARGET/tmp, wherever CARGO_TARGET_DIR puts TARGET.
                Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .parent()
                    .unwrap_or(Path::new("target"))
                    .join("ferry-bench")
                    .join("migration.json")
            });
        Ok(Self {
            runs,
            quick,
            filters,
            out,
        })
    }

    /// Where a case's plot goes: next to the JSON.
    pub(crate) fn plot_path(&self, case: &Case) -> PathBuf {
        self.out
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("{}.png", case.name()))
    }

    fn wanted(&self, name: &str) -> bool {
        self.filters.iter().all(|word| name.contains(word.as_str()))
    }

    pub(crate) fn cases(&self) -> Vec<Case> {
        let (all_sizes, one_size): (&[u64], &[u64]) = if self.quick {
            (&[1024], &[1024])
        } else {
            (&[1024, 4096], &[1024])
        };
        let workloads: &[(Workload, &[u64])] = if self.quick {
            &[(Workload::Idle, all_sizes), (Workload::Sweep, all_sizes)]
        } else {
            &[
                (Workload::Idle, all_sizes),
                (Workload::Sweep, all_sizes),
                (Workload::Fill(50), all_sizes),
                (Workload::Dirty(100), one_size),
                (Workload::Dirty(1000), one_size),
            ]
        };
        let mut cases = Vec::new();
        for &(workload, sizes) in workloads {
            for &mem_mib in sizes {
                for transport in Transport::ALL {
                    cases.push(Case::plain(transport, workload, mem_mib));
                }
            }
        }
        if !self.quick {
            // Whether `max-bandwidth` holds: half of 1 GiB to move at a rate far below the
            // socket's.
            for transport in Transport::ALL {
                cases.push(Case {
                    cap_mib_per_s: Some(CAPPED_MIB_PER_S),
                    ..Case::plain(transport, Workload::Fill(50), 1024)
                });
            }
            let variants: [fn(Case) -> Case; 2] = [
                // What the page connections (multifd, on by default) gain over one connection.
                |case| Case {
                    one_connection: true,
                    ..case
                },
                // The transfer alone: the destination's RAM backed before the migration
                // starts, as the raw figures' reader has its buffer.
                |case| Case {
                    prealloc: true,
                    ..case
                },
            ];
            for variant in variants {
                for &mem_mib in all_sizes {
                    for transport in Transport::ALL {
                        cases.push(variant(Case::plain(transport, Workload::Fill(50), mem_mib)));
                    }
                }
            }
        }
        cases.retain(|case| self.wanted(&case.name()));
        cases
    }

    /// The transports whose `migrate_cancel` is timed: the cancel runs are named
    /// `tcp-cancel` and `unix-cancel` for the filters.
    pub(crate) fn cancel_transports(&self) -> Vec<Transport> {
        Transport::ALL
            .into_iter()
            .filter(|t| self.wanted(&format!("{}-cancel", t.name())))
            .collect()
    }
}
