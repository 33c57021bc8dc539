//! `-device`: the devices the guest sees. Only `virtio-blk-pci` exists so far.

use super::addr::{parse_addr, PciAddress};
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
pub const MAX_SERIAL_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// The most queues a virtio-blk-pci disk may have. One I/O thread serves all of a disk's queues,
/// so more queues add no host parallelism; they only spare guest vCPUs from sharing a queue.
/// Each costs an MSI-X vector and an ioeventfd/irqfd pair, and 16 covers the vCPU counts ferry
/// runs with.
pub const MAX_NUM_QUEUES: u16 = 16;

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

    #[test]
    fn minimal_device_takes_the_defaults() {
        let arg = block("virtio-blk-pci,drive=d0,addr=0x3");
        assert_eq!(
            arg,
            BlockDeviceArg {
                config: BlockDeviceConfig {
                    id: "virtio-blk-03.0".into(),
                    drive: "d0".into(),
                    addr: PciAddress {
                        slot: 3,
                        function: 0,
                    },
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
                    addr: PciAddress {
                        slot: 4,
                        function: 0,
                    },
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
