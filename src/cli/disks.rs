//! The checks across all `-drive` and `-device` options, once every one has been parsed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use super::addr::PciAddress;
use super::device::BlockDeviceArg;
use super::drive::DriveConfig;
use super::{usage, UsageError};

/// Refuses a set of drives and devices that cannot form a machine, saying what to change.
pub(super) fn check(drives: &[DriveConfig], devices: &[BlockDeviceArg]) -> Result<(), UsageError> {
    check_drives(drives)?;
    check_device_ids(devices)?;
    check_drive_use(drives, devices)?;
    check_addresses(devices)
}

fn check_drives(drives: &[DriveConfig]) -> Result<(), UsageError> {
    let mut ids = HashSet::new();
    let mut files: HashMap<PathBuf, &str> = HashMap::new();
    for drive in drives {
        if !ids.insert(drive.id.as_str()) {
            return Err(usage(
                "-drive",
                format!(
                    "id '{}' is used by two drives; give each -drive its own id=",
                    drive.id
                ),
            ));
        }
        if let Some(first) = files.insert(lexical(&drive.file), &drive.id) {
            return Err(usage(
                "-drive",
                format!(
                    "drives '{first}' and '{}' both use {}; ferry locks each image it opens, so \
                     the second open would fail: use one drive per image",
                    drive.id,
                    drive.file.display()
                ),
            ));
        }
    }
    Ok(())
}

fn check_device_ids(devices: &[BlockDeviceArg]) -> Result<(), UsageError> {
    let mut ids = HashSet::new();
    for device in devices {
        if !ids.insert(device.config.id.as_str()) {
            let defaulted = if device.id_given {
                ""
            } else {
                " (a device without id= takes virtio-blk-SS.F from its address)"
            };
            return Err(usage(
                "-device",
                format!(
                    "id '{}' is used by two devices{defaulted}; give each -device its own id=",
                    device.config.id
                ),
            ));
        }
    }
    Ok(())
}

fn check_drive_use(drives: &[DriveConfig], devices: &[BlockDeviceArg]) -> Result<(), UsageError> {
    let mut users: HashMap<&str, &str> = HashMap::new();
    for device in devices {
        let config = &device.config;
        if !drives.iter().any(|drive| drive.id == config.drive) {
            let known = if drives.is_empty() {
                "there is no -drive".to_owned()
            } else {
                let ids: Vec<&str> = drives.iter().map(|drive| drive.id.as_str()).collect();
                format!("drives: {}", ids.join(", "))
            };
            return Err(usage(
                "-device",
                format!(
                    "device '{}': drive={} names no -drive ({known}); add -drive file=PATH,id={} \
                     or fix drive=",
                    config.id, config.drive, config.drive
                ),
            ));
        }
        if let Some(first) = users.insert(&config.drive, &config.id) {
            return Err(usage(
                "-device",
                format!(
                    "drive '{}' is used by devices '{first}' and '{}'; a drive backs one device, \
                     so give the second its own -drive",
                    config.drive, config.id
                ),
            ));
        }
    }
    if let Some(unused) = drives
        .iter()
        .find(|drive| !users.contains_key(drive.id.as_str()))
    {
        return Err(usage(
            "-drive",
            format!(
                "drive '{id}' is not used by any device; add -device virtio-blk-pci,drive={id},\
                 addr=SLOT or remove the -drive",
                id = unused.id
            ),
        ));
    }
    Ok(())
}

fn check_addresses(devices: &[BlockDeviceArg]) -> Result<(), UsageError> {
    let mut taken: BTreeMap<PciAddress, &BlockDeviceArg> = BTreeMap::new();
    for device in devices {
        if let Some(first) = taken.insert(device.config.addr, device) {
            return Err(usage(
                "-device",
                format!(
                    "device '{}': addr={} is already taken by device '{}'; give each device its \
                     own slot or function",
                    device.config.id, device.config.addr, first.config.id
                ),
            ));
        }
    }
    for device in taken.values() {
        let addr = device.config.addr;
        let function0 = PciAddress {
            slot: addr.slot,
            function: 0,
        };
        match taken.get(&function0) {
            None => {
                return Err(usage(
                    "-device",
                    format!(
                        "device '{}': addr={addr} but slot {:02x} has no function 0, and the \
                         guest looks for functions 1-7 only after finding function 0: put a \
                         device at addr={:#x}.0",
                        device.config.id, addr.slot, addr.slot
                    ),
                ))
            }
            Some(first) if addr.function != 0 && first.multifunction == Some(false) => {
                return Err(usage(
                    "-device",
                    format!(
                        "device '{}' at {function0} says multifunction=off, but device '{}' \
                         shares its slot at {addr}: use multifunction=on (or leave it out)",
                        first.config.id, device.config.id
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// `path` without `.` components or doubled slashes, so that `./a` and `a` compare equal. Only
/// the spelling is compared: the same image reached through a symlink or `..` is caught by the
/// image lock when the block layer opens it.
fn lexical(path: &Path) -> PathBuf {
    path.components()
        .filter(|part| *part != Component::CurDir)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::device::{parse_device, DeviceArg};
    use super::super::drive::parse_drive;
    use super::*;

    fn drives(texts: &[&str]) -> Vec<DriveConfig> {
        texts
            .iter()
            .map(|text| parse_drive(text).unwrap())
            .collect()
    }

    fn devices(texts: &[&str]) -> Vec<BlockDeviceArg> {
        texts
            .iter()
            .map(|text| match parse_device(text).unwrap() {
                DeviceArg::Block(arg) => arg,
                DeviceArg::Help => panic!("{text}"),
            })
            .collect()
    }

    fn error(drive_texts: &[&str], device_texts: &[&str]) -> String {
        check(&drives(drive_texts), &devices(device_texts))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn consistent_sets() {
        check(&[], &[]).unwrap();
        check(
            &drives(&["id=a,file=a.img", "id=b,file=b.img", "id=c,file=./c.img"]),
            &devices(&[
                "virtio-blk-pci,drive=a,addr=3",
                "virtio-blk-pci,drive=b,addr=4.1,id=b",
                "virtio-blk-pci,drive=c,addr=4,multifunction=on",
            ]),
        )
        .unwrap();
        // multifunction=on on a lone function is what QEMU does too: harmless.
        check(
            &drives(&["id=a,file=a"]),
            &devices(&["virtio-blk-pci,drive=a,addr=5,multifunction=on"]),
        )
        .unwrap();
        // Function 0 may come after the other functions of its slot.
        check(
            &drives(&["id=a,file=a", "id=b,file=b"]),
            &devices(&[
                "virtio-blk-pci,drive=a,addr=5.2",
                "virtio-blk-pci,drive=b,addr=5",
            ]),
        )
        .unwrap();
    }

    #[test]
    fn drive_refusals() {
        assert_eq!(
            error(&["id=a,file=x", "id=a,file=y"], &[]),
            "-drive: id 'a' is used by two drives; give each -drive its own id="
        );
        assert_eq!(
            error(&["id=a,file=/img/x", "id=b,file=/img//./x"], &[]),
            "-drive: drives 'a' and 'b' both use /img//./x; ferry locks each image it opens, so \
             the second open would fail: use one drive per image"
        );
        assert_eq!(
            error(&["id=a,file=./x", "id=b,file=x"], &[]),
            "-drive: drives 'a' and 'b' both use x; ferry locks each image it opens, so the \
             second open would fail: use one drive per image"
        );
        // Only the spelling is compared: these may or may not be one file.
        check(
            &drives(&["id=a,file=/x", "id=b,file=x"]),
            &devices(&[
                "virtio-blk-pci,drive=a,addr=3",
                "virtio-blk-pci,drive=b,addr=4",
            ]),
        )
        .unwrap();
        assert_eq!(
            error(&["id=a,file=x"], &[]),
            "-drive: drive 'a' is not used by any device; add -device virtio-blk-pci,drive=a,\
             addr=SLOT or remove the -drive"
        );
    }

    #[test]
    fn device_refusals() {
        let cases: &[(&[&str], &[&str], &str)] = &[
            (
                &["id=a,file=a"],
                &["virtio-blk-pci,drive=b,addr=3"],
                "-device: device 'virtio-blk-03.0': drive=b names no -drive (drives: a); add \
                 -drive file=PATH,id=b or fix drive=",
            ),
            (
                &[],
                &["virtio-blk-pci,drive=b,addr=3"],
                "-device: device 'virtio-blk-03.0': drive=b names no -drive (there is no -drive); \
                 add -drive file=PATH,id=b or fix drive=",
            ),
            (
                &["id=a,file=a"],
                &[
                    "virtio-blk-pci,drive=a,addr=3,id=x",
                    "virtio-blk-pci,drive=a,addr=4,id=y",
                ],
                "-device: drive 'a' is used by devices 'x' and 'y'; a drive backs one device, so \
                 give the second its own -drive",
            ),
            (
                &["id=a,file=a", "id=b,file=b"],
                &[
                    "virtio-blk-pci,drive=a,addr=3,id=x",
                    "virtio-blk-pci,drive=b,addr=4,id=x",
                ],
                "-device: id 'x' is used by two devices; give each -device its own id=",
            ),
            (
                &["id=a,file=a", "id=b,file=b"],
                &[
                    "virtio-blk-pci,drive=a,addr=3,id=virtio-blk-04.0",
                    "virtio-blk-pci,drive=b,addr=4",
                ],
                "-device: id 'virtio-blk-04.0' is used by two devices (a device without id= \
                 takes virtio-blk-SS.F from its address); give each -device its own id=",
            ),
            (
                &["id=a,file=a", "id=b,file=b"],
                &[
                    "virtio-blk-pci,drive=a,addr=3,id=x",
                    "virtio-blk-pci,drive=b,addr=0x3.0,id=y",
                ],
                "-device: device 'y': addr=03.0 is already taken by device 'x'; give each device \
                 its own slot or function",
            ),
            (
                &["id=a,file=a"],
                &["virtio-blk-pci,drive=a,addr=3.1,id=x"],
                "-device: device 'x': addr=03.1 but slot 03 has no function 0, and the guest \
                 looks for functions 1-7 only after finding function 0: put a device at \
                 addr=0x3.0",
            ),
            (
                &["id=a,file=a", "id=b,file=b"],
                &[
                    "virtio-blk-pci,drive=a,addr=3,id=x,multifunction=off",
                    "virtio-blk-pci,drive=b,addr=3.1,id=y",
                ],
                "-device: device 'x' at 03.0 says multifunction=off, but device 'y' shares its \
                 slot at 03.1: use multifunction=on (or leave it out)",
            ),
            (
                &["id=a,file=a", "id=b,file=b"],
                &[
                    "virtio-blk-pci,drive=a,addr=5.2,id=y",
                    "virtio-blk-pci,drive=b,addr=5,id=x,multifunction=no",
                ],
                "-device: device 'x' at 05.0 says multifunction=off, but device 'y' shares its \
                 slot at 05.2: use multifunction=on (or leave it out)",
            ),
        ];
        for (drive_texts, device_texts, expected) in cases {
            assert_eq!(error(drive_texts, device_texts), *expected);
        }
    }
}
