//! The options that take one plain value: `-machine`, `-m`, `-smp`, `-kernel`/`-initrd`,
//! `-serial` and `-name`.

use std::path::PathBuf;

use super::{usage, SerialTarget, UsageError, MIN_MEM_MIB};
use crate::machine::MachineType;

pub(super) fn parse_machine(option: &str, value: &str) -> Result<MachineType, UsageError> {
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
pub(super) fn parse_smp(option: &str, value: &str) -> Result<u32, UsageError> {
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

pub(super) fn parse_path(option: &str, value: String) -> Result<PathBuf, UsageError> {
    if value.is_empty() {
        return Err(usage(option, "empty path"));
    }
    Ok(PathBuf::from(value))
}

pub(super) fn parse_serial(option: &str, value: &str) -> Result<SerialTarget, UsageError> {
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

pub(super) fn parse_name(option: &str, value: &str) -> Result<String, UsageError> {
    // QEMU allows `-name guest=NAME,...`; only the name matters here.
    let name = value.strip_prefix("guest=").unwrap_or(value);
    let name = name.split(',').next().unwrap_or_default();
    if name.is_empty() {
        return Err(usage(option, "empty name"));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

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
