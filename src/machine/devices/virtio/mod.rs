//! virtio devices. The PCI transport hands each device its queues and calls into the device
//! models here.

pub mod block;
pub mod pci;
pub mod worker;
