//! `-device`: the devices the guest sees. Only `virtio-blk-pci` exists so far.

use std::fmt;

use super::props::{check_id, split, Props};
use super::{usage, UsageError};

const OPTION: &str = "-device";

/// The `-device` types ferry implements.
pub const SUPPORTED_DEVICES: &[&str] = &["virtio-blk-pci"];

const BLOCK_KEYS: &[&str] = &[
    "drive",
    "id",
    "bus",
    "addr",
    "serial",
    "num-queues",
    "multifunction",
];

/// What VIRTIO_BLK_T_GET_ID can return: VIRTIO_BLK_ID_BYTES in the virtio spec.
pub const MAX_SERIAL_BYTES: usize = 20;

/// The most queues a virtio-blk-pci disk may have. One I/O thread serves all of a disk's queues,
/// so more queues add no host parallelism; they only spare guest vCPUs from sharing a queue.
/// Each costs an MSI-X vector and an ioeventfd/irqfd pair, and 16 covers the vCPU counts ferry
/// runs with.
pub const MAX_NUM_QUEUES: u16 = 16;

/// Where a PCI function sits on `pcie.0`: `addr=SLOT[.FUNCTION]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// 1..=31; 0 is the host bridge.
    pub slot: u8,
    /// 0..=7.
    pub function: u8,
}

impl fmt::Display for PciAddress {
    /// As lspci shows it: `03.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}.{:x}", self.slot, self.function)
    }
}

/// One `-device virtio-blk-pci,drive=ID,addr=N[.F][,id=ID][,bus=pcie.0][,serial=S]
/// [,num-queues=N][,multifunction=on|off]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDeviceConfig {
    /// `id=`, or `virtio-blk-SS.F` from the address when absent, so that it is the same on both
    /// ends of a migration that use the same addresses.
    pub id: String,
    /// The id of the `-drive` this device exposes.
    pub drive: String,
    pub addr: PciAddress,
    /// What VIRTIO_BLK_T_GET_ID returns (at most 20 bytes).
    pub serial: Option<String>,
    pub num_queues: u16,
}

/// One `-device` as parsed, before the checks across all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeviceArg {
    /// `-device help` or `-device TYPE,help`.
    Help,
    Block(BlockDeviceArg),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BlockDeviceArg {
    pub config: BlockDeviceConfig,
    /// Whether `id=` was given (the checks explain a clash with a default id).
    pub id_given: bool,
    /// `multifunction=`. The header's multifunction bit follows from how many functions the
    /// slot holds; an explicit `off` on a shared slot's function 0 is a contradiction to refuse.
    pub multifunction: Option<bool>,
}

fn hint(key: &str) -> Option<&'static str> {
    match key {
        "bootindex" => Some("ferry boots -kernel directly; no firmware reads a boot order"),
        "iothread" => Some("every disk already has its own I/O thread"),
        _ => None,
    }
}

/// Parses the value of one `-device`.
pub(super) fn parse_device(value: &str) -> Result<DeviceArg, UsageError> {
    let mut elements = split(value);
    let driver = elements.remove(0);
    if driver == "help" || elements == ["help"] {
        return Ok(DeviceArg::Help);
    }
    if !SUPPORTED_DEVICES.contains(&driver.as_str()) {
        let problem = if driver.contains('=') {
            "the device type comes first, as in -device virtio-blk-pci,drive=ID,addr=0x3".into()
        } else {
            format!(
                "unsupported device '{driver}' (supported: {})",
                SUPPORTED_DEVICES.join(", ")
            )
        };
        return Err(usage(OPTION, problem));
    }
    let props = Props::new(OPTION, elements, BLOCK_KEYS, hint)?;
    let drive = props.require("drive", "the id of the -drive this disk exposes")?;
    check_id(OPTION, drive)?;
    if let Some(bus) = props.get("bus") {
        if bus != "pcie.0" {
            return Err(usage(
                OPTION,
                format!("bus={bus} does not exist: ferry has one PCI bus, pcie.0 (the default)"),
            ));
        }
    }
    // Required rather than picked, so that the source and destination of a migration, started
    // with the same options, agree on every device's address.
    let addr = parse_addr(props.require("addr", "the PCI slot, e.g. addr=0x3")?)?;
    let id = match props.get("id") {
        Some(id) => {
            check_id(OPTION, id)?;
            id.to_owned()
        }
        None => format!("virtio-blk-{addr}"),
    };
    let serial = props.get("serial").map(parse_serial).transpose()?;
    let num_queues = props
        .get("num-queues")
        .map(parse_num_queues)
        .transpose()?
        .unwrap_or(1);
    Ok(DeviceArg::Block(BlockDeviceArg {
        config: BlockDeviceConfig {
            id,
            drive: drive.to_owned(),
            addr,
            serial,
            num_queues,
        },
        id_given: props.get("id").is_some(),
        multifunction: props.bool("multifunction")?,
    }))
}

/// `SLOT[.FUNCTION]`. QEMU reads both numbers as hex with or without `0x`; StratoVirt reads them
/// as hex with `0x` and as decimal without. Where the two readings differ (`addr=10`) the value is
/// refused rather than silently read one way.
fn parse_addr(text: &str) -> Result<PciAddress, UsageError> {
    let (slot, function) = match text.split_once('.') {
        Some((slot, function)) => (slot, Some(function)),
        None => (text, None),
    };
    let slot = parse_addr_number(text, slot)?;
    let function = function.map_or(Ok(0), |function| parse_addr_number(text, function))?;
    if slot > 0x1f {
        return Err(usage(
            OPTION,
            format!("addr={text}: slot {slot:#x} is out of range: pcie.0 has slots 0x1 to 0x1f"),
        ));
    }
    if function > 7 {
        return Err(usage(
            OPTION,
            format!(
                "addr={text}: function {function} is out of range: a slot has functions 0 to 7"
            ),
        ));
    }
    if slot == 0 {
        return Err(usage(
            OPTION,
            format!(
                "addr={text}: slot 0 belongs to the q35 host bridge (00.0 is pcie.0 itself); use \
                 addr=1 or above (StratoVirt's docs show addr=0, which collides with it)"
            ),
        ));
    }
    Ok(PciAddress {
        slot: slot as u8,
        function: function as u8,
    })
}

fn parse_addr_number(addr: &str, text: &str) -> Result<u32, UsageError> {
    let bad = || {
        usage(
            OPTION,
            format!("addr={addr}: expected SLOT[.FUNCTION] in hex, e.g. addr=0x3 or addr=0x3.1"),
        )
    };
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u32::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let as_hex = u32::from_str_radix(text, 16).map_err(|_| bad())?;
    if text.bytes().all(|b| b.is_ascii_digit()) {
        let as_decimal: u32 = text.parse().map_err(|_| bad())?;
        if as_decimal != as_hex {
            return Err(usage(
                OPTION,
                format!(
                    "addr={addr}: '{text}' is ambiguous: QEMU reads it as hex ({as_hex:#x}), \
                     StratoVirt as decimal ({as_decimal}); write {as_hex:#x} or {as_decimal:#x}"
                ),
            ));
        }
    }
    Ok(as_hex)
}

fn parse_serial(serial: &str) -> Result<String, UsageError> {
    if serial.is_empty() {
        return Err(usage(
            OPTION,
            "serial= is empty; leave it out for a disk without a serial",
        ));
    }
    if serial.len() > MAX_SERIAL_BYTES {
        return Err(usage(
            OPTION,
            format!(
                "serial '{serial}' is {} bytes; virtio-blk carries at most {MAX_SERIAL_BYTES} \
                 (VIRTIO_BLK_ID_BYTES)",
                serial.len()
            ),
        ));
    }
    Ok(serial.to_owned())
}

fn parse_num_queues(text: &str) -> Result<u16, UsageError> {
    match text.parse::<u16>() {
        Ok(count) if (1..=MAX_NUM_QUEUES).contains(&count) => Ok(count),
        _ => Err(usage(
            OPTION,
            format!(
                "num-queues={text}: expected 1 to {MAX_NUM_QUEUES} (one I/O thread serves all of \
                 a disk's queues, so more would add MSI-X vectors without adding throughput)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(text: &str) -> BlockDeviceArg {
        match parse_device(text).unwrap() {
            DeviceArg::Block(arg) => arg,
            DeviceArg::Help => panic!("{text}: parsed as help"),
        }
    }

    fn at(slot: u8, function: u8) -> PciAddress {
        PciAddress { slot, function }
    }

    #[test]
    fn minimal_device_takes_the_defaults() {
        let arg = block("virtio-blk-pci,drive=d0,addr=0x3");
        assert_eq!(
            arg,
            BlockDeviceArg {
                config: BlockDeviceConfig {
                    id: "virtio-blk-03.0".into(),
                    drive: "d0".into(),
                    addr: at(3, 0),
                    serial: None,
                    num_queues: 1,
                },
                id_given: false,
                multifunction: None,
            }
        );
        assert_eq!(
            block("virtio-blk-pci,drive=d0,addr=0x1f.7").config.id,
            "virtio-blk-1f.7"
        );
    }

    #[test]
    fn every_accepted_property() {
        let arg = block(
            "virtio-blk-pci,drive=d0,id=disk0,bus=pcie.0,addr=0x4.0,serial=SN,,1,num-queues=16,\
             multifunction=on",
        );
        assert_eq!(
            arg,
            BlockDeviceArg {
                config: BlockDeviceConfig {
                    id: "disk0".into(),
                    drive: "d0".into(),
                    addr: at(4, 0),
                    serial: Some("SN,1".into()),
                    num_queues: 16,
                },
                id_given: true,
                multifunction: Some(true),
            }
        );
        assert_eq!(
            block("virtio-blk-pci,drive=d,addr=2,multifunction=false").multifunction,
            Some(false)
        );
        let twenty = "a".repeat(MAX_SERIAL_BYTES);
        let text = format!("virtio-blk-pci,drive=d,addr=2,serial={twenty}");
        assert_eq!(block(&text).config.serial, Some(twenty));
    }

    #[test]
    fn address_spellings() {
        for (text, expected) in [
            ("0x3", at(3, 0)),
            ("0X3", at(3, 0)),
            ("3", at(3, 0)),
            ("03", at(3, 0)),
            ("3.1", at(3, 1)),
            ("0x3.0x1", at(3, 1)),
            ("0x10", at(16, 0)),
            ("1f", at(31, 0)),
            ("0x1F.7", at(31, 7)),
            ("9.07", at(9, 7)),
        ] {
            assert_eq!(parse_addr(text).unwrap(), expected, "{text}");
        }
        assert_eq!(at(0x1a, 3).to_string(), "1a.3");
    }

    #[test]
    fn address_refusals() {
        let cases = [
            (
                "0",
                "-device: addr=0: slot 0 belongs to the q35 host bridge (00.0 is pcie.0 itself); \
                 use addr=1 or above (StratoVirt's docs show addr=0, which collides with it)",
            ),
            (
                "0x0.1",
                "-device: addr=0x0.1: slot 0 belongs to the q35 host bridge",
            ),
            (
                "0x20",
                "-device: addr=0x20: slot 0x20 is out of range: pcie.0 has slots 0x1 to 0x1f",
            ),
            (
                "3.8",
                "-device: addr=3.8: function 8 is out of range: a slot has functions 0 to 7",
            ),
            (
                "10",
                "-device: addr=10: '10' is ambiguous: QEMU reads it as hex (0x10), StratoVirt as \
                 decimal (10); write 0x10 or 0xa",
            ),
            ("3.010", "-device: addr=3.010: '010' is ambiguous"),
            ("", "-device: addr=: expected SLOT[.FUNCTION] in hex"),
            ("0x", "-device: addr=0x: expected SLOT[.FUNCTION]"),
            ("3.", "-device: addr=3.: expected SLOT[.FUNCTION]"),
            ("3.1.2", "-device: addr=3.1.2: expected SLOT[.FUNCTION]"),
            ("slot3", "-device: addr=slot3: expected SLOT[.FUNCTION]"),
            (
                "0x100000000",
                "-device: addr=0x100000000: expected SLOT[.FUNCTION]",
            ),
        ];
        for (text, expected) in cases {
            let error = parse_addr(text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{text}: {error}");
        }
    }

    #[test]
    fn help() {
        assert_eq!(parse_device("help").unwrap(), DeviceArg::Help);
        assert_eq!(
            parse_device("virtio-blk-pci,help").unwrap(),
            DeviceArg::Help
        );
    }

    #[test]
    fn refusals() {
        let long = "a".repeat(MAX_SERIAL_BYTES + 1);
        let too_long = format!("virtio-blk-pci,drive=d,addr=3,serial={long}");
        let cases = [
            (
                "virtio-net-pci,netdev=n",
                "-device: unsupported device 'virtio-net-pci' (supported: virtio-blk-pci)",
            ),
            ("virtio-blk-device,drive=d", "-device: unsupported device"),
            (
                "drive=d,addr=3",
                "-device: the device type comes first, as in -device virtio-blk-pci,",
            ),
            (
                "virtio-blk-pci,addr=3",
                "-device: drive= is required: the id of the -drive this disk exposes",
            ),
            (
                "virtio-blk-pci,drive=d",
                "-device: addr= is required: the PCI slot, e.g. addr=0x3",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,bus=pcie.1",
                "-device: bus=pcie.1 does not exist: ferry has one PCI bus, pcie.0 (the default)",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,id=1x",
                "-device: id '1x' is not valid",
            ),
            (
                "virtio-blk-pci,drive=d d,addr=3",
                "-device: id 'd d' is not valid",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,serial=",
                "-device: serial= is empty; leave it out",
            ),
            (
                too_long.as_str(),
                "-device: serial 'aaaaaaaaaaaaaaaaaaaaa' is 21 bytes; virtio-blk carries at most \
                 20 (VIRTIO_BLK_ID_BYTES)",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,num-queues=0",
                "-device: num-queues=0: expected 1 to 16 (one I/O thread serves",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,num-queues=17",
                "-device: num-queues=17: expected",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,num-queues=x",
                "-device: num-queues=x: expected",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,multifunction=2",
                "-device: multifunction=2: expected on or off",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,bootindex=1",
                "-device: unknown property 'bootindex' (ferry boots -kernel directly; no firmware \
                 reads a boot order); accepted: drive, id, bus, addr, serial, num-queues, \
                 multifunction",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,iothread=io0",
                "-device: unknown property 'iothread' (every disk already has its own I/O thread)",
            ),
            (
                "virtio-blk-pci,drive=d,addr=3,scsi=off",
                "-device: unknown property 'scsi'",
            ),
        ];
        for (text, expected) in cases {
            let error = parse_device(text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{text}: {error}");
        }
    }
}
