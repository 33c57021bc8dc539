//! KVM's GSI routing table: the in-kernel PIC and IOAPIC pins every x86 machine has, plus one
//! MSI route per device interrupt vector, each fed by an irqfd.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the irqchip routes KVM installs by default
//! are rebuilt here every time, exactly as KVM's own defaults lay them out (ISA IRQ n, 0-15, on
//! PIC pin n % 8 and IOAPIC pin n; GSIs 16-23 on the IOAPIC only). The MP table and the MADT describe that
//! same wiring.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// GSIs below this are the IOAPIC's pins.
const IOAPIC_PINS: u32 = 24;
const ISA_IRQS: u32 = 16;

/// Why the routing table could not change.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("KVM refused the interrupt routing table: {0}")]
    SetRouting(#[source] kvm_ioctls::Error),
    #[error("cannot build a routing table of {0} entries")]
    TooManyRoutes(usize),
    #[error("all {0} GSIs are in use; the VM has too many interrupt vectors")]
    OutOfGsis(u32),
    #[error("cannot create an eventfd for an interrupt: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("KVM refused an irqfd for GSI {gsi}: {source}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Where an MSI goes: the message a device would write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VM's GSI routes. Devices allocate a GSI per vector and point it at an MSI message; every
/// change rewrites KVM's table.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    inner: Mutex<Routes>,
}

struct Routes {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            inner: Mutex::new(Routes {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// A GSI of its own for one device vector; it routes nowhere until `set_msi`.
    pub fn allocate_gsi(&self) -> Result<u32, InterruptError> {
        let mut routes = crate::machine::devices::lock(&self.inner);
        let gsi = routes.next_gsi;
        if gsi as usize >= kvm_bindings::KVM_MAX_IRQ_ROUTES {
            return Err(InterruptError::OutOfGsis(gsi));
        }
        routes.next_gsi += 1;
        Ok(gsi)
    }

    /// Points `gsi` at `message`, or removes its route with `None`; KVM's table changes only if
    /// the route did.
    pub fn set_msi(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut routes = crate::machine::devices::lock(&self.inner);
        let changed = match message {
            Some(message) => routes.msi.insert(gsi, message) != Some(message),
            None => routes.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&routes)?;
        }
        Ok(())
    }

    fn commit(&self, routes: &Routes) -> Result<(), InterruptError> {
        let mut entries = irqchip_routes();
        entries.extend(
            routes
                .msi
                .iter()
                .map(|(&gsi, message)| msi_route(gsi, *message)),
        );
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| InterruptError::TooManyRoutes(entries.len()))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(InterruptError::SetRouting)
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

fn msi_route(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    let mut msi = kvm_irq_routing_msi {
        address_lo: message.address as u32,
        address_hi: (message.address >> 32) as u32,
        data: message.data,
        ..Default::default()
    };
    msi.__bindgen_anon_1.pad = 0;
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 { msi },
        ..Default::default()
    }
}

/// KVM's default irqchip wiring, which `KVM_SET_GSI_ROUTING` would otherwise erase.
fn irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    for gsi in 0..ISA_IRQS {
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        entries.push(irqchip_route(gsi, chip, gsi % 8));
    }
    entries.extend((0..IOAPIC_PINS).map(|gsi| irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi)));
    entries
}

/// A router on a fresh VM with an in-kernel irqchip, for tests of devices that raise MSIs; `None`
/// without /dev/kvm outside CI (under `CI=true` its absence fails the test).
#[cfg(test)]
pub(crate) fn router_on_a_test_vm() -> Option<Arc<GsiRouter>> {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(_) if std::env::var("CI").as_deref() != Ok("true") => return None,
        Err(error) => panic!("CI=true needs /dev/kvm: {error}"),
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    Some(Arc::new(GsiRouter::new(Arc::new(vm))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_wiring_matches_kvm() {
        let routes = irqchip_routes();
        // 16 PIC pins and 24 IOAPIC pins.
        assert_eq!(routes.len(), 16 + 24);
        let pins: Vec<(u32, u32, u32)> = routes
            .iter()
            .map(|e| {
                // SAFETY: every entry irqchip_routes builds holds the irqchip member of the union.
                let irqchip = unsafe { e.u.irqchip };
                (e.gsi, irqchip.irqchip, irqchip.pin)
            })
            .collect();
        assert!(pins.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(pins.contains(&(0, KVM_IRQCHIP_IOAPIC, 0)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(pins.contains(&(2, KVM_IRQCHIP_PIC_MASTER, 2)));
        assert!(!pins
            .iter()
            .any(|&(gsi, chip, _)| gsi >= 16 && chip != KVM_IRQCHIP_IOAPIC));
    }
}
