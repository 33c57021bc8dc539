//! virtio devices. The PCI transport hands each device its queues and calls into the device
//! models here.

pub mod block;
