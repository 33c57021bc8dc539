//! The command line, spelled as QEMU and StratoVirt spell it (single dash, `-opt value`).
//!
//! Parsing is pure: it turns arguments into a [`Config`] or a [`UsageError`] that names the option
//! and the problem. Checks that need the host (files, `/dev/kvm` limits) happen when the machine
//! is built.

use std::fmt;
use std::path::PathBuf;

use crate::machine::MachineType;
use crate::migrate::uri::Incoming;

mod device;
mod disks;
mod drive;
mod props;

use device::DeviceArg;
pub use device::{
    BlockDeviceConfig, PciAddress, MAX_NUM_QUEUES, MAX_SERIAL_BYTES, SUPPORTED_DEVICES,
};
pub use drive::{DriveConfig, DriveFormat};

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

fn parse_machine(option: &str, value: &str) -> Result<MachineType, UsageError> {
    // `-machine q35,accel=kvm` is common in QEMU scripts: accept KVM, the only accelerator.
    let mut parts = value.split(',');
    let mut machine = None;
    for part in parts.by_ref() {
        match part.split_once('=') {
            None | Some(("type", _)) => {
                let name = part.strip_prefix("type=").unwrap_or(part);
                machine = Some(MachineType::from_name(name).ok_or_else(|| {
                    usage(
                        option,
                        format!(
                            "unsupported machine type '{name}' (supported: {})",
                            MachineType::supported_names()
                        ),
                    )
                })?);
            }
            Some(("accel", "kvm")) => {}
            Some((key, val)) => {
                return Err(usage(option, format!("unsupported property '{key}={val}'")));
            }
        }
    }
    machine.ok_or_else(|| usage(option, "no machine type given (supported: q35)"))
}

/// `-m 512`, `-m 512M`, `-m 2G`, `-m size=1G`: MiB unless a suffix says otherwise.
pub fn parse_memory(option: &str, value: &str) -> Result<u64, UsageError> {
    let text = value.strip_prefix("size=").unwrap_or(value).trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(usage(
                        option,
                        format!("bad size '{value}': the suffix must be K, M, G or T"),
                    ))
                }
            };
            (&text[..at], shift)
        }
        _ => (text, 20),
    };
    let number: u64 = digits.parse().map_err(|_| {
        usage(
            option,
            format!("bad size '{value}': expected a number of MiB, or with M/G suffix"),
        )
    })?;
    let bytes = number
        .checked_mul(1 << shift)
        .ok_or_else(|| usage(option, format!("size '{value}' is too large")))?;
    if bytes < MIN_MEM_MIB << 20 {
        return Err(usage(
            option,
            format!("{value} is too small: at least {MIN_MEM_MIB} MiB"),
        ));
    }
    if bytes % 4096 != 0 {
        return Err(usage(
            option,
            format!("{value} is not a multiple of the 4 KiB page size"),
        ));
    }
    Ok(bytes)
}

/// `-smp 2` or `-smp cpus=2`. The upper bound comes from KVM and is checked at start-up.
fn parse_smp(option: &str, value: &str) -> Result<u32, UsageError> {
    let text = value.strip_prefix("cpus=").unwrap_or(value);
    let count: u32 = text.parse().map_err(|_| {
        usage(
            option,
            format!("bad vCPU count '{value}': expected a positive integer"),
        )
    })?;
    if count == 0 {
        return Err(usage(option, "the vCPU count must be at least 1"));
    }
    Ok(count)
}

fn parse_path(option: &str, value: String) -> Result<PathBuf, UsageError> {
    if value.is_empty() {
        return Err(usage(option, "empty path"));
    }
    Ok(PathBuf::from(value))
}

fn parse_serial(option: &str, value: &str) -> Result<SerialTarget, UsageError> {
    match value {
        "stdio" => Ok(SerialTarget::Stdio),
        "none" | "null" => Ok(SerialTarget::None),
        _ => match value.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialTarget::File(PathBuf::from(path))),
            _ => Err(usage(
                option,
                format!("unsupported serial backend '{value}' (use stdio, file:PATH or none)"),
            )),
        },
    }
}

fn parse_name(option: &str, value: &str) -> Result<String, UsageError> {
    // QEMU allows `-name guest=NAME,...`; only the name matters here.
    let name = value.strip_prefix("guest=").unwrap_or(value);
    let name = name.split(',').next().unwrap_or_default();
    if name.is_empty() {
        return Err(usage(option, "empty name"));
    }
    Ok(name.to_owned())
}

/// The text of `-help`.
pub fn help_text() -> String {
    format!(
        "\
ferry {version}: a KVM virtual machine monitor built around live migration

usage: ferry [options]

  -machine q35           machine type (q35 is the only one and the default)
  -m SIZE                guest RAM: MiB, or with a suffix (512, 512M, 2G); default {mem}
  -smp N                 number of vCPUs (1 up to what KVM allows); default 1
  -kernel PATH           ELF vmlinux (PVH entry used when present) or bzImage;
                         without it ferry boots its built-in test guest
  -initrd PATH           initial ramdisk for -kernel
  -append CMDLINE        kernel command line
  -serial stdio|file:PATH|none
                         where the guest's serial port (ttyS0) goes; default stdio
  -name NAME             VM name, reported by QMP query-name
  -S                     do not start the vCPUs until QMP 'cont'
  -qmp unix:PATH,server,nowait
                         QMP control socket
  -incoming tcp:IP:PORT|unix:PATH|defer
                         wait for a live migration instead of booting
  -drive file=PATH,id=ID[,readonly=on|off][,direct=on|off][,format=raw][,if=none]
                         a raw disk image for a -device (write a comma in PATH as ',,');
                         direct=on opens it O_DIRECT; the default, off, goes through the
                         host page cache like QEMU's cache=writeback. aio=threads|off is
                         accepted (each disk does blocking I/O on its own thread)
  -device virtio-blk-pci,drive=ID,addr=SLOT[.FN][,id=ID][,bus=pcie.0][,serial=S]
                       [,num-queues=N][,multifunction=on|off]
                         a virtio disk on pcie.0 at SLOT 0x1..0x1f, function 0..7, in hex
                         (0x3, 0x1f.1; write 0x10, not the ambiguous 10); id defaults to
                         virtio-blk-SS.F; serial up to {serial} bytes; num-queues 1..{queues},
                         default 1. -device help shows this text
  -h, -help              this text
  -version               the version

Booleans take on/off, true/false or yes/no.
Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=ferry=debug) to see more.
",
        version = env!("CARGO_PKG_VERSION"),
        mem = DEFAULT_MEM_MIB,
        serial = MAX_SERIAL_BYTES,
        queues = MAX_NUM_QUEUES,
    )
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
        ])
        .unwrap();
        assert_eq!(config.mem_bytes, 2 << 30);
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.kernel.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(config.initrd.as_deref(), Some(std::path::Path::new("/i")));
        assert_eq!(config.append, "console=ttyS0 quiet");
        assert_eq!(config.serial, SerialTarget::File("/tmp/s".into()));
        assert_eq!(config.name.as_deref(), Some("vm1"));
        assert!(config.start_paused);
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("-m", "512").unwrap(), 512 << 20);
        assert_eq!(parse_memory("-m", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("-m", "1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("-m", "size=64M").unwrap(), 64 << 20);
        assert_eq!(parse_memory("-m", "65536K").unwrap(), 64 << 20);
        for bad in ["", "abc", "12X", "1M", "-5", "99999999999999999999G"] {
            assert!(parse_memory("-m", bad).is_err(), "{bad} accepted");
        }
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

    #[test]
    fn machine_properties() {
        assert_eq!(
            parse_machine("-machine", "q35,accel=kvm").unwrap(),
            MachineType::Q35
        );
        assert_eq!(
            parse_machine("-machine", "type=q35").unwrap(),
            MachineType::Q35
        );
        assert!(parse_machine("-machine", "q35,accel=tcg").is_err());
    }
}
