//! The command line, spelled as QEMU and StratoVirt spell it (single dash, `-opt value`).
//!
//! Parsing is pure: it turns arguments into a [`Config`] or a [`UsageError`] that names the option
//! and the problem. Checks that need the host (files, `/dev/kvm` limits) happen when the machine
//! is built.

use std::fmt;
use std::path::PathBuf;

use crate::machine::MachineType;
use crate::migrate::uri::Incoming;

mod addr;
mod device;
mod disks;
mod drive;
mod help;
mod options;
mod props;

pub use addr::PciAddress;
use device::DeviceArg;
pub use device::{BlockDeviceConfig, MAX_NUM_QUEUES, MAX_SERIAL_BYTES, SUPPORTED_DEVICES};
pub use drive::{DriveConfig, DriveFormat};
pub use help::help_text;
pub use options::parse_memory;
use options::{parse_machine, parse_name, parse_path, parse_serial, parse_smp};

/// Default guest RAM, as QEMU's default for x86 (128 MiB is too small for a useful Linux).
pub const DEFAULT_MEM_MIB: u64 = 512;
/// Smallest guest RAM ferry accepts: the boot tables and the built-in guest need a few MiB.
pub const MIN_MEM_MIB: u64 = 16;

/// Where the guest's serial port goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    File(PathBuf),
    None,
}

/// Everything the command line says about the VM to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub machine: MachineType,
    pub mem_bytes: u64,
    /// `-mem-prealloc`: back all guest RAM with host memory before anything runs.
    pub mem_prealloc: bool,
    pub vcpus: u32,
    /// `None` boots the built-in guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub serial: SerialTarget,
    pub name: Option<String>,
    /// `-S`: create the vCPUs but do not run them until `cont`.
    pub start_paused: bool,
    pub qmp: Option<PathBuf>,
    /// `-incoming URI`: wait for a migration stream instead of booting.
    pub incoming: Option<Incoming>,
    /// `-drive`: disk images, referred to by devices through their ids.
    pub drives: Vec<DriveConfig>,
    /// `-device virtio-blk-pci`: the disks the guest sees, in command-line order.
    pub block_devices: Vec<BlockDeviceConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            machine: MachineType::Q35,
            mem_bytes: DEFAULT_MEM_MIB << 20,
            mem_prealloc: false,
            vcpus: 1,
            kernel: None,
            initrd: None,
            append: String::new(),
            serial: SerialTarget::Stdio,
            name: None,
            start_paused: false,
            qmp: None,
            incoming: None,
            drives: Vec::new(),
            block_devices: Vec::new(),
        }
    }
}

/// What the command line asks ferry to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run(Box<Config>),
    Help,
    Version,
}

/// A command line ferry cannot accept. Exit status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    pub option: String,
    pub problem: String,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.option.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.option, self.problem)
        }
    }
}

impl std::error::Error for UsageError {}

fn usage(option: &str, problem: impl Into<String>) -> UsageError {
    UsageError {
        option: option.to_owned(),
        problem: problem.into(),
    }
}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Action, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut config = Config::default();
    let mut devices = Vec::new();
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        // QEMU accepts both `-opt` and `--opt`.
        let option = match arg.strip_prefix("--") {
            Some(rest) if !rest.is_empty() => format!("-{rest}"),
            _ => arg.clone(),
        };
        let mut value = || {
            args.next()
                .ok_or_else(|| usage(&option, "missing value (see -help for the syntax)"))
        };
        match option.as_str() {
            "-h" | "-help" => return Ok(Action::Help),
            "-version" => return Ok(Action::Version),
            "-machine" | "-M" => config.machine = parse_machine(&option, &value()?)?,
            "-m" => config.mem_bytes = parse_memory(&option, &value()?)?,
            "-mem-prealloc" => config.mem_prealloc = true,
            "-smp" => config.vcpus = parse_smp(&option, &value()?)?,
            "-kernel" => config.kernel = Some(parse_path(&option, value()?)?),
            "-initrd" => config.initrd = Some(parse_path(&option, value()?)?),
            "-append" => config.append = value()?,
            "-serial" => config.serial = parse_serial(&option, &value()?)?,
            "-name" => config.name = Some(parse_name(&option, &value()?)?),
            "-S" => config.start_paused = true,
            "-qmp" => {
                config.qmp = Some(
                    crate::qmp::parse_qmp_arg(&value()?)
                        .map_err(|error| usage(&option, error.to_string()))?,
                )
            }
            "-drive" => config.drives.push(drive::parse_drive(&value()?)?),
            "-device" => match device::parse_device(&value()?)? {
                DeviceArg::Help => return Ok(Action::Help),
                DeviceArg::Block(device) => devices.push(device),
            },
            "-incoming" => {
                config.incoming = Some(
                    Incoming::parse(&value()?)
                        .map_err(|error| usage(&option, error.to_string()))?,
                )
            }
            other if other.starts_with('-') => {
                return Err(usage(
                    other,
                    "unknown option (see -help for the supported ones)",
                ))
            }
            other => {
                return Err(usage(
                    "",
                    format!("unexpected argument '{other}': options start with '-'"),
                ))
            }
        }
    }
    if config.initrd.is_some() && config.kernel.is_none() {
        return Err(usage(
            "-initrd",
            "needs -kernel (the built-in guest takes no initrd)",
        ));
    }
    disks::check(&config.drives, &devices)?;
    config.block_devices = devices.into_iter().map(|device| device.config).collect();
    Ok(Action::Run(Box::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, UsageError> {
        match parse(args.iter().copied())? {
            Action::Run(config) => Ok(*config),
            other => panic!("expected a run, got {other:?}"),
        }
    }

    #[test]
    fn defaults_boot_the_builtin_guest() {
        let config = run(&[]).unwrap();
        assert_eq!(config, Config::default());
        assert!(config.kernel.is_none());
    }

    #[test]
    fn full_qemu_style_line() {
        let config = run(&[
            "-machine",
            "q35",
            "-m",
            "2G",
            "-smp",
            "2",
            "-kernel",
            "/k",
            "-initrd",
            "/i",
            "-append",
            "console=ttyS0 quiet",
            "-serial",
            "file:/tmp/s",
            "-name",
            "vm1",
            "-S",
            "-mem-prealloc",
        ])
        .unwrap();
        assert_eq!(config.mem_bytes, 2 << 30);
        assert!(config.mem_prealloc);
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.kernel.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(config.initrd.as_deref(), Some(std::path::Path::new("/i")));
        assert_eq!(config.append, "console=ttyS0 quiet");
        assert_eq!(config.serial, SerialTarget::File("/tmp/s".into()));
        assert_eq!(config.name.as_deref(), Some("vm1"));
        assert!(config.start_paused);
    }

    #[test]
    fn errors_name_the_option() {
        let cases: &[(&[&str], &str)] = &[
            (&["-smp", "0"], "-smp: the vCPU count must be at least 1"),
            (&["-smp", "two"], "-smp: bad vCPU count 'two'"),
            (&["-m"], "-m: missing value"),
            (
                &["-machine", "pc"],
                "-machine: unsupported machine type 'pc' (supported: q35)",
            ),
            (&["-bogus"], "-bogus: unknown option"),
            (
                &["-serial", "tcp:1"],
                "-serial: unsupported serial backend 'tcp:1'",
            ),
            (&["-initrd", "/i"], "-initrd: needs -kernel"),
            (&["stray"], "unexpected argument 'stray'"),
            (
                &["-incoming", "tcp:1.2.3.4"],
                "-incoming: invalid migration URI 'tcp:1.2.3.4': missing :PORT",
            ),
        ];
        for (args, expected) in cases {
            let error = run(args).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{args:?}: {error}");
        }
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(["-h"]).unwrap(), Action::Help);
        assert_eq!(parse(["--help"]).unwrap(), Action::Help);
        assert_eq!(parse(["-version"]).unwrap(), Action::Version);
        assert_eq!(parse(["--version"]).unwrap(), Action::Version);
    }

    #[test]
    fn disks() {
        let config = run(&[
            "-drive",
            "file=/img/root,,1.raw,id=root,readonly=on",
            "--drive",
            "id=data,file=/img/data.raw,direct=on",
            "-device",
            "virtio-blk-pci,drive=data,addr=0x4,serial=D1,num-queues=2",
            "--device",
            "virtio-blk-pci,id=vda,drive=root,bus=pcie.0,addr=3",
        ])
        .unwrap();
        assert_eq!(
            config.drives,
            [
                DriveConfig {
                    id: "root".into(),
                    file: "/img/root,1.raw".into(),
                    readonly: true,
                    direct: false,
                    format: DriveFormat::Raw,
                },
                DriveConfig {
                    id: "data".into(),
                    file: "/img/data.raw".into(),
                    readonly: false,
                    direct: true,
                    format: DriveFormat::Raw,
                },
            ]
        );
        // Command-line order, not address order.
        assert_eq!(
            config.block_devices,
            [
                BlockDeviceConfig {
                    id: "virtio-blk-04.0".into(),
                    drive: "data".into(),
                    addr: PciAddress {
                        slot: 4,
                        function: 0
                    },
                    serial: Some("D1".into()),
                    num_queues: 2,
                },
                BlockDeviceConfig {
                    id: "vda".into(),
                    drive: "root".into(),
                    addr: PciAddress {
                        slot: 3,
                        function: 0
                    },
                    serial: None,
                    num_queues: 1,
                },
            ]
        );
    }

    #[test]
    fn disk_errors_reach_the_caller() {
        let cases: &[(&[&str], &str)] = &[
            (&["-drive"], "-drive: missing value"),
            (&["-drive", "id=a"], "-drive: file= is required"),
            (&["-device", "e1000"], "-device: unsupported device 'e1000'"),
            (
                &["-drive", "id=a,file=a"],
                "-drive: drive 'a' is not used by any device",
            ),
            (
                &["-device", "virtio-blk-pci,drive=a,addr=0"],
                "-device: addr=0: slot 0 belongs to the q35 host bridge",
            ),
            (
                &["-device", "virtio-blk-pci,drive=a,addr=3"],
                "-device: device 'virtio-blk-03.0': drive=a names no -drive",
            ),
        ];
        for (args, expected) in cases {
            let error = run(args).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{args:?}: {error}");
        }
    }

    #[test]
    fn device_help_is_help() {
        assert_eq!(parse(["-device", "help"]).unwrap(), Action::Help);
        assert_eq!(
            parse(["-device", "virtio-blk-pci,help"]).unwrap(),
            Action::Help
        );
        let text = help_text();
        for option in ["-drive file=PATH,id=ID", "-device virtio-blk-pci,drive=ID"] {
            assert!(text.contains(option), "help lacks {option}");
        }
    }
}
