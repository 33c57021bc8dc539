//! `-drive`: a disk image that a `-device` exposes to the guest.
//!
//! The file itself is not looked at here: the block layer opens (and locks) it when the machine
//! is built, and reports a missing or unreadable image then.

use std::path::PathBuf;

use super::props::{check_id, split, Props};
use super::{usage, UsageError};

const OPTION: &str = "-drive";

const KEYS: &[&str] = &["file", "id", "readonly", "direct", "format", "if", "aio"];

/// The image formats `-drive format=` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveFormat {
    Raw,
}

/// One `-drive file=PATH,id=ID[,readonly=on|off][,direct=on|off][,format=raw][,if=none]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    pub id: String,
    pub file: PathBuf,
    pub readonly: bool,
    /// `direct=on`: open the image with O_DIRECT, bypassing the host's page cache.
    pub direct: bool,
    pub format: DriveFormat,
}

fn hint(key: &str) -> Option<&'static str> {
    match key {
        "cache" => Some("cache=none is direct=on; the default, direct=off, is cache=writeback"),
        _ => None,
    }
}

/// Parses the value of one `-drive`.
pub(super) fn parse_drive(value: &str) -> Result<DriveConfig, UsageError> {
    let props = Props::new(OPTION, split(value), KEYS, hint)?;
    let id = props.require("id", "a -device names its drive by it (drive=ID)")?;
    check_id(OPTION, id)?;
    let file = props.require("file", "the path of the disk image")?;
    if file.is_empty() {
        return Err(usage(OPTION, format!("drive '{id}': file= is empty")));
    }
    if let Some(interface) = props.get("if") {
        if interface != "none" {
            return Err(usage(
                OPTION,
                format!(
                    "drive '{id}': if={interface} is not supported: ferry attaches disks only \
                     through -device virtio-blk-pci,drive={id}; use if=none (the default)"
                ),
            ));
        }
    }
    let format = match props.get("format").unwrap_or("raw") {
        "raw" => DriveFormat::Raw,
        other => {
            return Err(usage(
                OPTION,
                format!(
                    "drive '{id}': format={other} is not supported: ferry reads raw images only \
                     (format=raw)"
                ),
            ))
        }
    };
    check_aio(&props, id)?;
    Ok(DriveConfig {
        id: id.to_owned(),
        file: PathBuf::from(file),
        readonly: props.bool("readonly")?.unwrap_or(false),
        // Off by default, unlike StratoVirt (direct=true): QEMU's default cache=writeback goes
        // through the host page cache, and O_DIRECT also needs sector-aligned buffers and a
        // filesystem that supports it (tmpfs does not).
        direct: props.bool("direct")?.unwrap_or(false),
        format,
    })
}

/// `aio=` says how image I/O is issued. Ferry issues blocking reads and writes from each disk's
/// own I/O thread, which is what QEMU's `aio=threads` and StratoVirt's `aio=off` describe, so
/// those are accepted and change nothing; asynchronous engines are refused, not faked.
fn check_aio(props: &Props<'_>, id: &str) -> Result<(), UsageError> {
    match props.get("aio") {
        None | Some("threads" | "off") => Ok(()),
        Some(other) => Err(usage(
            props.option(),
            format!(
                "drive '{id}': aio={other} is not supported: ferry does blocking I/O on each \
                 disk's own thread (aio=threads or aio=off, the default)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, file: &str) -> DriveConfig {
        DriveConfig {
            id: id.to_owned(),
            file: PathBuf::from(file),
            readonly: false,
            direct: false,
            format: DriveFormat::Raw,
        }
    }

    #[test]
    fn minimal_drive_takes_the_defaults() {
        assert_eq!(
            parse_drive("file=/img/a.raw,id=d0").unwrap(),
            drive("d0", "/img/a.raw")
        );
        assert_eq!(
            parse_drive("id=d0,file=a.raw").unwrap(),
            drive("d0", "a.raw")
        );
    }

    #[test]
    fn every_accepted_property() {
        let parsed = parse_drive(
            "file=/img/a.raw,id=d0,readonly=on,direct=true,format=raw,if=none,aio=threads",
        )
        .unwrap();
        assert_eq!(
            parsed,
            DriveConfig {
                readonly: true,
                direct: true,
                ..drive("d0", "/img/a.raw")
            }
        );
        let parsed = parse_drive("file=a,id=d,readonly=no,direct=off,aio=off").unwrap();
        assert_eq!(parsed, drive("d", "a"));
        let parsed = parse_drive("file=a,id=d,readonly=yes,direct=false").unwrap();
        assert!(parsed.readonly && !parsed.direct);
    }

    #[test]
    fn commas_in_paths() {
        assert_eq!(
            parse_drive("file=/img/a,,b.raw,id=d0").unwrap().file,
            PathBuf::from("/img/a,b.raw")
        );
        assert_eq!(
            parse_drive("id=d0,file=trailing,,").unwrap().file,
            PathBuf::from("trailing,")
        );
    }

    #[test]
    fn refusals() {
        let cases = [
            (
                "file=a",
                "-drive: id= is required: a -device names its drive by it",
            ),
            (
                "id=d0",
                "-drive: file= is required: the path of the disk image",
            ),
            ("id=d0,file=", "-drive: drive 'd0': file= is empty"),
            ("id=0d,file=a", "-drive: id '0d' is not valid"),
            (
                "id=d0,file=a,if=virtio",
                "-drive: drive 'd0': if=virtio is not supported: ferry attaches disks only \
                 through -device virtio-blk-pci,drive=d0; use if=none (the default)",
            ),
            (
                "id=d0,file=a,format=qcow2",
                "-drive: drive 'd0': format=qcow2 is not supported: ferry reads raw images only \
                 (format=raw)",
            ),
            (
                "id=d0,file=a,aio=io_uring",
                "-drive: drive 'd0': aio=io_uring is not supported: ferry does blocking I/O on \
                 each disk's own thread (aio=threads or aio=off, the default)",
            ),
            (
                "id=d0,file=a,aio=native",
                "-drive: drive 'd0': aio=native is not",
            ),
            (
                "id=d0,file=a,readonly=maybe",
                "-drive: readonly=maybe: expected on or off",
            ),
            (
                "id=d0,file=a,direct=1",
                "-drive: direct=1: expected on or off",
            ),
            (
                "id=d0,file=a,media=disk",
                "-drive: unknown property 'media'; accepted: file, id, readonly, direct, format, \
                 if, aio",
            ),
            (
                "id=d0,file=a,cache=none",
                "-drive: unknown property 'cache' (cache=none is direct=on; the default, \
                 direct=off, is cache=writeback); accepted: file, id,",
            ),
            ("id=d0,file=a,readonly", "-drive: 'readonly' has no value"),
            ("id=d0,file=a,id=d1", "-drive: 'id' is given twice"),
        ];
        for (text, expected) in cases {
            let error = parse_drive(text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{text}: {error}");
        }
    }
}
