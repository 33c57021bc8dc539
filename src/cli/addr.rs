//! `addr=SLOT[.FUNCTION]`: where a `-device` sits on `pcie.0`, spelled so that QEMU's and
//! StratoVirt's command lines both mean the same slot here.

use std::fmt;

use super::{usage, UsageError};

const OPTION: &str = "-device";

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

/// `SLOT[.FUNCTION]`. QEMU reads both numbers as hex with or without `0x`; StratoVirt reads them
/// as hex with `0x` and as decimal without. Where the two readings differ (`addr=10`) the value is
/// refused rather than silently read one way.
pub(super) fn parse_addr(text: &str) -> Result<PciAddress, UsageError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(slot: u8, function: u8) -> PciAddress {
        PciAddress { slot, function }
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
}
