//! The transport driven the way a guest driver drives it, on a real VM (for its irqchip, GSI
//! routes and ioeventfds): feature negotiation, queue setup, a request, and a save/restore that
//! leaves a request in the ring for the restored device.

use std::io::Read;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::block::{DiskImage, LockMode};
use crate::cli::{BlockDeviceConfig, DriveConfig, DriveFormat, PciAddress};
use crate::machine::devices::lock;
use crate::machine::devices::virtio::block::BlockDevice;
use crate::machine::interrupts::router_on_a_test_vm;
use crate::machine::pci::config::{BAR0, COMMAND_MEMORY};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QUEUE_SIZE: u16 = 16;
const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_BLK_T_OUT: u32 = 1;

struct Fixture {
    device: VirtioDevice<BlockDevice>,
    memory: GuestMemory,
    image: tempfile::NamedTempFile,
}

fn test_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

/// A function for `backend` on a fresh VM, or `None` without /dev/kvm outside CI.
fn function<B: VirtioBackend>(backend: B, memory: GuestMemory) -> Option<VirtioDevice<B>> {
    let router = router_on_a_test_vm()?;
    let mut bars = BarAllocator::new((0xc000_0000, 0xc100_0000), (1 << 36, 1 << 37));
    let transport = VirtioPci::new("disk0", backend, false, &mut bars, router, memory).unwrap();
    Some(VirtioDevice::new(transport))
}

/// A virtio-blk function on a fresh VM, or `None` without /dev/kvm outside CI.
fn fixture(memory: Option<GuestMemory>, image: Option<tempfile::NamedTempFile>) -> Option<Fixture> {
    let memory = memory.unwrap_or_else(test_memory);
    let image = image.unwrap_or_else(|| {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        file
    });
    let drive = DriveConfig {
        id: "d0".into(),
        file: image.path().to_owned(),
        readonly: false,
        direct: false,
        format: DriveFormat::Raw,
    };
    let config = BlockDeviceConfig {
        id: "disk0".into(),
        drive: "d0".into(),
        addr: PciAddress {
            slot: 3,
            function: 0,
        },
        serial: None,
        num_queues: 1,
    };
    // Each fixture stands for its own process, so the images do not lock each other out.
    let disk = DiskImage::open(&drive, LockMode::Inactive).unwrap();
    let device = function(BlockDevice::new(disk, &config), memory.clone())?;
    Some(Fixture {
        device,
        memory,
        image,
    })
}

/// A vCPU's write to BAR4.
fn write<B: VirtioBackend>(device: &VirtioDevice<B>, offset: u64, value: u64, len: usize) {
    lock(device.transport()).bar_write(VIRTIO_BAR, offset, &value.to_le_bytes()[..len]);
}

/// A vCPU's read of BAR4.
fn read<B: VirtioBackend>(device: &VirtioDevice<B>, offset: u64, len: usize) -> u64 {
    let mut data = [0u8; 8];
    lock(device.transport()).bar_read(VIRTIO_BAR, offset, &mut data[..len]);
    u64::from_le_bytes(data)
}

fn status<B: VirtioBackend>(device: &VirtioDevice<B>) -> u8 {
    read(device, 0x14, 1) as u8
}

/// What a driver does to reset the device, with the test standing in for the I/O thread.
fn reset<B: VirtioBackend>(device: &VirtioDevice<B>) {
    write(device, 0x14, 0, 1);
    device.complete_reset();
    assert_eq!(status(device), 0, "reset done");
}

/// What a driver does up to FEATURES_OK; returns whether the device kept FEATURES_OK.
fn negotiate<B: VirtioBackend>(device: &VirtioDevice<B>, features: u64) -> bool {
    lock(device.transport()).config_write(0x04, &COMMAND_MEMORY.to_le_bytes());
    reset(device);
    write(device, 0x14, 1 | 2, 1);
    for select in 0..2 {
        write(device, 0x08, select, 4);
        write(device, 0x0c, (features >> (32 * select)) & 0xffff_ffff, 4);
    }
    write(device, 0x14, 1 | 2 | 8, 1);
    status(device) & 8 != 0
}

fn set_up_queue<B: VirtioBackend>(device: &VirtioDevice<B>) {
    write(device, 0x16, 0, 2);
    write(device, 0x18, QUEUE_SIZE.into(), 2);
    write(device, 0x1a, 0, 2);
    assert_eq!(read(device, 0x1a, 2), 0, "vector 0 accepted");
    write(device, 0x20, DESC, 8);
    write(device, 0x28, AVAIL, 8);
    write(device, 0x30, USED, 8);
    write(device, 0x1c, 1, 2);
    write(device, 0x14, 1 | 2 | 8 | 4, 1);
}

/// Puts an OUT request of one sector of `fill` at `sector` in descriptors `3n..3n+3` and makes
/// it available as the `n`th request.
fn queue_write(memory: &GuestMemory, n: u16, sector: u64, fill: u8) {
    let base = 0x10_000 + u64::from(n) * 0x1000;
    let (header, data, status) = (base, base + 0x100, base + 0x400);
    memory
        .write_obj(VIRTIO_BLK_T_OUT, GuestAddress(header))
        .unwrap();
    memory.write_obj(0u32, GuestAddress(header + 4)).unwrap();
    memory.write_obj(sector, GuestAddress(header + 8)).unwrap();
    memory
        .write_slice(&[fill; 512], GuestAddress(data))
        .unwrap();
    memory.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let first = 3 * n;
    let descriptors = [
        (header, 16u32, 1u16, first + 1),
        (data, 512, 1, first + 2),
        (status, 1, 2, 0),
    ];
    for (i, (addr, len, flags, next)) in descriptors.into_iter().enumerate() {
        let at = DESC + (u64::from(first) + i as u64) * 16;
        memory.write_obj(addr, GuestAddress(at)).unwrap();
        memory.write_obj(len, GuestAddress(at + 8)).unwrap();
        memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
        memory.write_obj(next, GuestAddress(at + 14)).unwrap();
    }
    memory
        .write_obj(
            first,
            GuestAddress(AVAIL + 4 + 2 * u64::from(n % QUEUE_SIZE)),
        )
        .unwrap();
    memory.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
}

fn used_index(memory: &GuestMemory) -> u16 {
    memory.read_obj(GuestAddress(USED + 2)).unwrap()
}

fn sector_of(image: &tempfile::NamedTempFile, sector: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.reopen().unwrap().read_to_end(&mut bytes).unwrap();
    bytes[sector as usize * 512..][..512].to_vec()
}

#[test]
fn features_settle_at_features_ok() {
    let Some(fixture) = fixture(None, None) else {
        return;
    };
    let device = &fixture.device;
    assert!(!negotiate(device, 1 << 63), "a feature the device lacks");
    assert!(!negotiate(device, 0), "no VERSION_1");
    assert!(negotiate(device, VIRTIO_F_VERSION_1));
    // Once settled, features do not change behind the device's back.
    write(device, 0x08, 1, 4);
    write(device, 0x0c, 0, 4);
    assert_eq!(read(device, 0x0c, 4), 1, "VERSION_1 stays acked");
    // An out-of-range MSI-X vector reads back as NO_VECTOR.
    write(device, 0x10, 99, 2);
    assert_eq!(read(device, 0x10, 2), u64::from(NO_VECTOR));
    // Reset clears everything the driver set, once the I/O thread has done its part; until
    // then status reads as it was and the driver's writes are dropped.
    write(device, 0x14, 0, 1);
    assert_eq!(status(device), 1 | 2 | 8);
    write(device, 0x14, 1, 1);
    assert_eq!(status(device), 1 | 2 | 8);
    device.complete_reset();
    assert_eq!(status(device), 0);
    assert_eq!(read(device, 0x0c, 4), 0);
}

#[test]
fn requests_left_in_the_ring_are_handled_by_the_restored_device() {
    let Some(source) = fixture(None, None) else {
        return;
    };
    assert!(negotiate(
        &source.device,
        VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
    ));
    set_up_queue(&source.device);
    queue_write(&source.memory, 0, 1, 0xa1);
    source.device.process(0);
    assert_eq!(used_index(&source.memory), 1);
    assert_eq!(sector_of(&source.image, 1), vec![0xa1; 512]);

    // The drain: a request that arrives now stays in the ring.
    source.device.quiesce();
    queue_write(&source.memory, 1, 2, 0xb2);
    source.device.process(0);
    assert_eq!(
        used_index(&source.memory),
        1,
        "a quiesced device takes nothing"
    );

    let state = lock(source.device.transport()).save();
    let bytes = postcard::to_stdvec(&state).unwrap();
    let state: VirtioPciState = postcard::from_bytes(&bytes).unwrap();
    // The destination: the same guest memory (as migrated) and the same image, a fresh device.
    let Some(destination) = fixture(Some(source.memory.clone()), Some(source.image)) else {
        return;
    };
    destination.device.quiesce();
    let mut transport = lock(destination.device.transport());
    transport.restore(state.clone()).unwrap();
    assert_eq!(transport.save(), state);
    let notify_bar = transport.config().read_u32(BAR0 + 16);
    drop(transport);
    assert_ne!(notify_bar, 0, "BAR4 restored");
    destination.device.unquiesce();
    destination.device.process(0);
    assert_eq!(used_index(&destination.memory), 2);
    assert_eq!(sector_of(&destination.image, 2), vec![0xb2; 512]);
    assert_eq!(
        destination
            .memory
            .read_obj::<u8>(GuestAddress(0x11_400))
            .unwrap(),
        0
    );
}

#[test]
fn a_restore_refuses_features_this_side_lacks() {
    let Some(fixture) = fixture(None, None) else {
        return;
    };
    let mut transport = lock(fixture.device.transport());
    let mut state = transport.save();
    state.common.driver_features = VIRTIO_F_VERSION_1 | 1 << 63;
    let error = transport.restore(state).unwrap_err();
    assert!(
        matches!(error, RestoreError::Features { unknown, .. } if unknown == 1 << 63),
        "{error}"
    );
    assert!(error.to_string().contains("does not offer"), "{error}");
}

/// A migration checks the transport's state before it tells the source it has it, so every
/// refusal the restore would make must show in the check already.
#[test]
fn the_check_refuses_what_the_restore_would() {
    let Some(source) = fixture(None, None) else {
        return;
    };
    assert!(negotiate(&source.device, VIRTIO_F_VERSION_1));
    set_up_queue(&source.device);
    let state = lock(source.device.transport()).save();
    let Some(destination) = fixture(None, None) else {
        return;
    };
    destination.device.quiesce();
    let mut transport = lock(destination.device.transport());
    let fresh = transport.save();
    transport.check(&state).unwrap();

    let mut altered: Vec<(&str, VirtioPciState)> = Vec::new();
    let mut queue = |what, change: fn(&mut QueueState)| {
        let mut bad = state.clone();
        change(&mut bad.queues[0]);
        altered.push((what, bad));
    };
    queue("MSI-X vector", |q| q.vector = 7);
    queue("size", |q| q.size = QUEUE_SIZE - 1);
    queue("size", |q| q.size = u16::MAX);
    queue("descriptor table address", |q| q.desc_table = DESC + 1);
    queue("used ring address", |q| q.used_ring = USED + 1);
    let mut other_device = state.clone();
    other_device.config_space[2] ^= 1;
    altered.push(("read-only config byte 0x2", other_device));
    let mut more_vectors = state.clone();
    more_vectors.msix.entries.push(Default::default());
    altered.push(("MSI-X vectors", more_vectors));

    for (what, bad) in altered {
        let checked = transport.check(&bad).unwrap_err().to_string();
        assert!(checked.contains(what), "{what}: {checked}");
        let restored = transport.restore(bad).unwrap_err().to_string();
        assert_eq!(restored, checked);
        assert_eq!(
            transport.save(),
            fresh,
            "a refused {what} changed the device"
        );
    }
}

#[test]
fn the_pci_cfg_window_reaches_the_common_configuration() {
    let Some(fixture) = fixture(None, None) else {
        return;
    };
    let mut device = lock(fixture.device.transport());
    let cap = device.pci_cfg;
    let mut header = [0u8; 4];
    device.config_read(cap, &mut header);
    assert_eq!(
        (header[0], header[2], header[3]),
        (VENDOR_CAPABILITY, 20, CAP_PCI_CFG)
    );
    device.config_write(cap + PCI_CFG_BAR, &[VIRTIO_BAR as u8]);
    device.config_write(cap + PCI_CFG_OFFSET, &0x12u32.to_le_bytes());
    device.config_write(cap + PCI_CFG_LENGTH, &2u32.to_le_bytes());
    let mut queues = [0u8; 4];
    device.config_read(cap + PCI_CFG_DATA, &mut queues);
    assert_eq!(
        u16::from_le_bytes([queues[0], queues[1]]),
        1,
        "num_queues through the window"
    );
    device.config_write(cap + PCI_CFG_OFFSET, &0x14u32.to_le_bytes());
    device.config_write(cap + PCI_CFG_LENGTH, &1u32.to_le_bytes());
    device.config_write(cap + PCI_CFG_DATA, &[1, 0, 0, 0]);
    drop(device);
    assert_eq!(
        status(&fixture.device),
        1,
        "ACKNOWLEDGE written through the window"
    );
}

mod busy_engine;
