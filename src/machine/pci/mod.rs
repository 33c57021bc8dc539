//! The q35 PCI Express root bus `pcie.0`: its host bridge at 00.0, configuration space through
//! ports 0xCF8/0xCFC and through the ECAM, and the decoding of every function's BARs.

pub mod config;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use self::config::{ConfigSpace, PciIds};
use super::devices::lock;
use super::layout::{PCIE_ECAM_SIZE, PCIE_ECAM_START};
use crate::cli::PciAddress;

pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
const CONFIG_ENABLE: u32 = 1 << 31;

/// q35's memory controller hub (Intel's 82G33 "MCH"), as QEMU presents it.
const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor: 0x8086,
    device: 0x29c0,
    class: 0x06_0000,
    revision: 0,
    subsystem_vendor: 0x1af4,
    subsystem: 0x1100,
};

/// A device function on the bus.
pub trait PciFunction: Send {
    fn config(&self) -> &ConfigSpace;
    /// A guest read of the configuration space; functions with registers that act on reads
    /// (a window into a BAR) override it.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A guest write to the configuration space; the function applies it and reacts (BARs
    /// moving, MSI-X being enabled, ...).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge: identity only.
struct HostBridge(ConfigSpace);

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Where one BAR decodes now.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: u64,
    end: u64,
    devfn: u8,
    bar: usize,
}

/// Bus 0 of the root complex.
pub struct PciRoot {
    /// The last dword written to 0xCF8. Two vCPUs racing an 0xCF8/0xCFC pair race as on real
    /// hardware; an atomic keeps each access free of a lock.
    config_address: AtomicU32,
    functions: BTreeMap<u8, SharedFunction>,
    windows: RwLock<Vec<Window>>,
}

fn devfn(address: PciAddress) -> u8 {
    (address.slot << 3) | address.function
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    pub fn new() -> Self {
        let bridge: SharedFunction =
            Arc::new(Mutex::new(HostBridge(ConfigSpace::new(HOST_BRIDGE_IDS))));
        Self {
            config_address: AtomicU32::new(0),
            functions: BTreeMap::from([(0, bridge)]),
            windows: RwLock::new(Vec::new()),
        }
    }

    /// Plugs a function in; the command line has already refused duplicate addresses.
    pub fn add(&mut self, address: PciAddress, function: SharedFunction) {
        let devfn = devfn(address);
        self.set_windows(devfn, lock(&function).config());
        let previous = self.functions.insert(devfn, function);
        assert!(previous.is_none(), "two functions at {address:?}");
    }

    /// Handles an access to 0xCF8..=0xCFF; false if the port is not the bus's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                data.copy_from_slice(&self.config_address.load(Ordering::Relaxed).to_le_bytes());
            }
            CONFIG_DATA_PORT..=0xcff => {
                let address = self.config_address.load(Ordering::Relaxed);
                match decode_config_address(address, port) {
                    Some((bus, devfn, offset)) => self.config_read(bus, devfn, offset, data),
                    None => data.fill(0xff),
                }
            }
            _ => return false,
        }
        true
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                let mut word = [0; 4];
                word.copy_from_slice(data);
                self.config_address
                    .store(u32::from_le_bytes(word), Ordering::Relaxed);
            }
            CONFIG_DATA_PORT..=0xcff => {
                let address = self.config_address.load(Ordering::Relaxed);
                if let Some((bus, devfn, offset)) = decode_config_address(address, port) {
                    self.config_write(bus, devfn, offset, data);
                }
            }
            _ => return false,
        }
        true
    }

    /// Handles an MMIO access to the ECAM or a BAR; false if nothing on the bus decodes it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((bus, devfn, offset)) = decode_ecam(addr) {
            self.config_read(bus, devfn, offset, data);
            return true;
        }
        let Some(window) = self.window(addr) else {
            return false;
        };
        let function = &self.functions[&window.devfn];
        lock(function).bar_read(window.bar, addr - window.start, data);
        true
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((bus, devfn, offset)) = decode_ecam(addr) {
            self.config_write(bus, devfn, offset, data);
            return true;
        }
        let Some(window) = self.window(addr) else {
            return false;
        };
        let function = &self.functions[&window.devfn];
        lock(function).bar_write(window.bar, addr - window.start, data);
        true
    }

    fn window(&self, addr: u64) -> Option<Window> {
        let windows = self.windows.read().unwrap_or_else(|e| e.into_inner());
        windows
            .iter()
            .find(|w| (w.start..w.end).contains(&addr))
            .copied()
    }

    fn config_read(&self, bus: u8, devfn: u8, offset: usize, data: &mut [u8]) {
        match self.functions.get(&devfn) {
            Some(function) if bus == 0 => lock(function).config_read(offset, data),
            // Nothing there: all ones, which is how the guest learns the slot is empty.
            _ => data.fill(0xff),
        }
    }

    fn config_write(&self, bus: u8, devfn: u8, offset: usize, data: &[u8]) {
        if let Some(function) = self.functions.get(&devfn).filter(|_| bus == 0) {
            let mut function = lock(function);
            function.config_write(offset, data);
            // Only this function's BARs can have moved; the others stay unlocked (a disk's
            // lock may be held across its I/O).
            self.set_windows(devfn, function.config());
        }
    }

    /// Recomputes where every BAR decodes: after a restore, when all may have moved.
    pub fn update_windows(&self) {
        for (&devfn, function) in &self.functions {
            self.set_windows(devfn, lock(function).config());
        }
    }

    /// Replaces the windows of function `devfn` with where its BARs decode now.
    fn set_windows(&self, devfn: u8, config: &ConfigSpace) {
        let mut windows = self.windows.write().unwrap_or_else(|e| e.into_inner());
        windows.retain(|window| window.devfn != devfn);
        windows.extend(config.bars().iter().filter_map(|bar| {
            config.bar_address(bar.index).map(|start| Window {
                start,
                end: start + bar.size,
                devfn,
                bar: bar.index,
            })
        }));
    }
}

/// Bus, devfn and register of a 0xCF8-style address, for a data port access.
fn decode_config_address(address: u32, port: u16) -> Option<(u8, u8, usize)> {
    if address & CONFIG_ENABLE == 0 {
        return None;
    }
    let bus = (address >> 16) as u8;
    let devfn = (address >> 8) as u8;
    let offset = (address & 0xfc) as usize + usize::from(port - CONFIG_DATA_PORT);
    Some((bus, devfn, offset))
}

fn decode_ecam(addr: u64) -> Option<(u8, u8, usize)> {
    let offset = addr.checked_sub(PCIE_ECAM_START)?;
    (offset < PCIE_ECAM_SIZE).then_some((
        (offset >> 20) as u8,
        (offset >> 12) as u8,
        (offset & 0xfff) as usize,
    ))
}

/// Hands out BAR addresses from the two MMIO windows, each naturally aligned.
#[derive(Debug)]
pub struct BarAllocator {
    next32: u64,
    end32: u64,
    next64: u64,
    end64: u64,
}

impl BarAllocator {
    pub fn new(window32: (u64, u64), window64: (u64, u64)) -> Self {
        Self {
            next32: window32.0,
            end32: window32.1,
            next64: window64.0,
            end64: window64.1,
        }
    }

    pub fn allocate(&mut self, kind: config::BarKind, size: u64) -> Option<u64> {
        let (next, end) = match kind {
            config::BarKind::Mem32 => (&mut self.next32, self.end32),
            config::BarKind::Mem64Prefetchable => (&mut self.next64, self.end64),
        };
        let start = next.next_multiple_of(size);
        (start + size <= end).then(|| {
            *next = start + size;
            start
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(bus: u32, slot: u32, function: u32, offset: u32) -> [u8; 4] {
        (CONFIG_ENABLE | bus << 16 | slot << 11 | function << 8 | offset).to_le_bytes()
    }

    #[test]
    fn host_bridge_answers_both_mechanisms() {
        let root = PciRoot::new();
        assert!(root.pio_write(CONFIG_ADDRESS_PORT, &address(0, 0, 0, 0)));
        let mut id = [0u8; 4];
        assert!(root.pio_read(CONFIG_DATA_PORT, &mut id));
        assert_eq!(u32::from_le_bytes(id), 0x29c0_8086);
        let mut device = [0u8; 2];
        root.pio_read(CONFIG_DATA_PORT + 2, &mut device);
        assert_eq!(u16::from_le_bytes(device), 0x29c0);

        let mut ecam = [0u8; 4];
        assert!(root.mmio_read(PCIE_ECAM_START, &mut ecam));
        assert_eq!(ecam, id);
        let mut class = [0u8; 4];
        root.mmio_read(PCIE_ECAM_START + 8, &mut class);
        assert_eq!(u32::from_le_bytes(class) >> 8, 0x06_0000);
    }

    #[test]
    fn empty_slots_and_other_buses_read_all_ones() {
        let root = PciRoot::new();
        let mut data = [0u8; 4];
        root.pio_write(CONFIG_ADDRESS_PORT, &address(0, 5, 0, 0));
        root.pio_read(CONFIG_DATA_PORT, &mut data);
        assert_eq!(data, [0xff; 4]);
        root.mmio_read(PCIE_ECAM_START + (1 << 20), &mut data);
        assert_eq!(data, [0xff; 4]);
        assert!(!root.mmio_read(0xc000_0000, &mut data), "no BAR there");
        assert!(!root.pio_read(0x3f8, &mut data[..1]));
    }

    #[test]
    fn bars_are_aligned_and_stay_in_their_windows() {
        let mut bars = BarAllocator::new((0xc000_0000, 0xc000_4000), (1 << 32, (1 << 32) + 0x8000));
        assert_eq!(
            bars.allocate(config::BarKind::Mem32, 0x1000),
            Some(0xc000_0000)
        );
        assert_eq!(
            bars.allocate(config::BarKind::Mem32, 0x2000),
            Some(0xc000_2000)
        );
        assert_eq!(bars.allocate(config::BarKind::Mem32, 0x1000), None);
        let kind = config::BarKind::Mem64Prefetchable;
        assert_eq!(bars.allocate(kind, 0x4000), Some(1 << 32));
        assert_eq!(bars.allocate(kind, 0x4000), Some((1 << 32) + 0x4000));
        assert_eq!(bars.allocate(kind, 0x4000), None);
    }
}
