use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::block::tests::{drive, image_file};
use crate::block::LockMode;
use crate::cli::PciAddress;
use crate::machine::memory::{create_guest_memory, ram_layout, take_vmm_dirty_bitmap};

const QUEUE_SIZE: u16 = 16;
const HEADER: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x20_0000;
const DISK_BYTES: usize = 64 * 1024;
const OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;

fn config(serial: Option<&str>, num_queues: u16) -> BlockDeviceConfig {
    BlockDeviceConfig {
        id: "blk0".into(),
        drive: "disk0".into(),
        addr: PciAddress {
            slot: 3,
            function: 0,
        },
        serial: serial.map(str::to_owned),
        num_queues,
    }
}

struct Setup {
    _file: tempfile::NamedTempFile,
    path: std::path::PathBuf,
    device: BlockDevice,
    mem: GuestMemory,
}

fn setup(readonly: bool, direct: bool) -> Setup {
    let file = image_file(DISK_BYTES);
    let path = file.path().to_owned();
    let image = DiskImage::open(&drive(&path, readonly, direct), LockMode::Active).unwrap();
    let mut device = BlockDevice::new(image, &config(Some("ferry-disk-0"), 1));
    device.set_acked_features(u64::MAX);
    Setup {
        _file: file,
        path,
        device,
        mem: create_guest_memory(&ram_layout(64 << 20)).unwrap(),
    }
}

/// One buffer of a request: guest address, length, device-writable.
type Buf = (u64, u32, bool);

/// The buffers of a request of `kind` at `sector` with `data`, header and status at their
/// usual places.
fn request(mem: &GuestMemory, kind: u32, sector: u64, data: &[Buf]) -> Vec<Buf> {
    request_at(mem, 0, kind, sector, data)
}

/// As [`request`], with header and status in their own `slot`, for several requests at once.
fn request_at(mem: &GuestMemory, slot: u64, kind: u32, sector: u64, data: &[Buf]) -> Vec<Buf> {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    let (header_at, status_at) = (HEADER + slot * 16, STATUS + slot);
    mem.write_slice(&header, GuestAddress(header_at)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status_at)).unwrap();
    let mut bufs = vec![(header_at, 16, false)];
    bufs.extend_from_slice(data);
    bufs.push((status_at, 1, true));
    bufs
}

/// Puts each request on a queue as one chain.
fn build<'a>(mem: &'a GuestMemory, requests: &[Vec<Buf>]) -> MockSplitQueue<'a, GuestMemory> {
    let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
    let mut next = 0u16;
    for bufs in requests {
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let link = next + i as u16 + 1;
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, link))
            })
            .collect();
        vq.add_desc_chains(&descs, next).unwrap();
        next += bufs.len() as u16;
    }
    vq
}

/// Runs the device over `vq` and returns the used lengths of its first `count` chains and
/// whether the device asked for an interrupt.
fn process(
    device: &mut BlockDevice,
    vq: &MockSplitQueue<'_, GuestMemory>,
    mem: &GuestMemory,
    count: usize,
    event_idx: bool,
) -> (Vec<u32>, bool) {
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.set_event_idx(event_idx);
    let notify = device.process_queue(mem, &mut queue).unwrap();
    let used = (0..count)
        .map(|i| vq.used().ring().ref_at(i).unwrap().load().len())
        .collect();
    (used, notify)
}

fn run(setup: &mut Setup, requests: &[Vec<Buf>]) -> (Vec<u32>, bool) {
    let vq = build(&setup.mem, requests);
    process(&mut setup.device, &vq, &setup.mem, requests.len(), false)
}

fn status(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

#[test]
fn write_then_read_back() {
    let mut s = setup(false, false);
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 253) as u8).collect();
    s.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    // Two data descriptors, split off a sector boundary, as scatter-gather lists are.
    let write = request(
        &s.mem,
        blk::VIRTIO_BLK_T_OUT,
        3,
        &[(DATA, 100, false), (DATA + 100, 924, false)],
    );
    let (used, notify) = run(&mut s, &[write]);
    assert_eq!((used, status(&s.mem), notify), (vec![1], OK, true));
    let file = std::fs::read(&s.path).unwrap();
    assert_eq!(&file[3 * 512..5 * 512], &data[..]);

    let read = request(
        &s.mem,
        blk::VIRTIO_BLK_T_IN,
        2,
        &[(DATA + 0x1_0000, 1000, true), (DATA + 0x2_0007, 536, true)],
    );
    let (used, _) = run(&mut s, &[read]);
    assert_eq!((used, status(&s.mem)), (vec![1536 + 1], OK));
    let mut got = guest_bytes(&s.mem, DATA + 0x1_0000, 1000);
    got.extend(guest_bytes(&s.mem, DATA + 0x2_0007, 536));
    assert_eq!(got, &file[1024..2560]);
}

#[test]
fn flush_and_get_id() {
    let mut s = setup(false, false);
    let flush = request(&s.mem, blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(run(&mut s, &[flush]).0, vec![1]);
    assert_eq!(status(&s.mem), OK);

    let get_id = request(&s.mem, blk::VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!(run(&mut s, &[get_id]).0, vec![21]);
    assert_eq!(status(&s.mem), OK);
    assert_eq!(
        guest_bytes(&s.mem, DATA, 20),
        b"ferry-disk-0\0\0\0\0\0\0\0\0"
    );
    s.device.flush().unwrap();
}

#[test]
fn requests_outside_the_disk_fail() {
    let mut s = setup(false, false);
    let last = DISK_BYTES as u64 / 512 - 1;
    for (sector, len) in [
        (last, 1024),
        (last + 1, 512),
        (u64::MAX / 256, 512),
        (0, 100),
    ] {
        let read = request(&s.mem, blk::VIRTIO_BLK_T_IN, sector, &[(DATA, len, true)]);
        assert_eq!(run(&mut s, &[read]).0, vec![1], "{sector} {len}");
        assert_eq!(status(&s.mem), IOERR, "{sector} {len}");
    }
    let read = request(&s.mem, blk::VIRTIO_BLK_T_IN, last, &[(DATA, 512, true)]);
    assert_eq!(run(&mut s, &[read]).0, vec![513]);
    assert_eq!(status(&s.mem), OK);
}

#[test]
fn malformed_chains_fail_without_stopping_the_queue() {
    let mut s = setup(false, false);
    let cases: [(u32, &[Buf], u8); 3] = [
        // Data in the wrong direction.
        (blk::VIRTIO_BLK_T_IN, &[(DATA, 512, false)], IOERR),
        (blk::VIRTIO_BLK_T_OUT, &[(DATA, 512, true)], IOERR),
        (99, &[], UNSUPP),
    ];
    for (kind, data, expected) in cases {
        let bufs = request(&s.mem, kind, 0, data);
        let (used, _) = run(&mut s, &[bufs]);
        assert_eq!((used, status(&s.mem)), (vec![1], expected), "type {kind}");
    }
    // A header too short to hold the sector.
    request(&s.mem, blk::VIRTIO_BLK_T_IN, 0, &[]);
    let (used, _) = run(&mut s, &[vec![(HEADER, 8, false), (STATUS, 1, true)]]);
    assert_eq!((used, status(&s.mem)), (vec![1], IOERR));

    // No writable status byte, or a buffer outside guest memory: nothing can be reported, but
    // the chain is returned and the next request still runs.
    let no_status = vec![(HEADER, 16, false), (STATUS, 1, false)];
    let outside = vec![(HEADER, 16, false), (1 << 40, 512, true), (STATUS, 1, true)];
    let good = request(&s.mem, blk::VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]);
    s.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let (used, _) = run(&mut s, &[no_status, outside, good]);
    assert_eq!(used, vec![0, 0, 513]);
    assert_eq!(status(&s.mem), OK);
}

#[test]
fn a_ring_the_queue_cannot_walk_is_an_error() {
    let mut s = setup(false, false);
    let vq = MockSplitQueue::create(&s.mem, GuestAddress(0), QUEUE_SIZE);
    // The driver claims more requests than the ring holds.
    s.mem
        .write_obj(QUEUE_SIZE + 1, vq.avail_addr().unchecked_add(2))
        .unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let err = s.device.process_queue(&s.mem, &mut queue).unwrap_err();
    assert!(err.to_string().contains("blk0"), "{err}");
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut s = setup(true, false);
    let features = s.device.device_features();
    assert_ne!(features & bit(blk::VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & bit(blk::VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(features & bit(blk::VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let before = std::fs::read(&s.path).unwrap();
    let write = request(&s.mem, blk::VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    let zero = request(
        &s.mem,
        blk::VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[(DATA, 16, false)],
    );
    for bufs in [write, zero] {
        run(&mut s, &[bufs]);
        assert_ne!(status(&s.mem), OK);
    }
    assert_eq!(std::fs::read(&s.path).unwrap(), before);
}

fn segment(mem: &GuestMemory, sector: u64, sectors: u32, flags: u32) -> Buf {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    (DATA, 16, false)
}

#[test]
fn discard_and_write_zeroes() {
    let mut s = setup(false, false);
    let unmap = blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let cases = [
        (blk::VIRTIO_BLK_T_DISCARD, 4, 2, 0, OK),
        (blk::VIRTIO_BLK_T_WRITE_ZEROES, 10, 1, 0, OK),
        (blk::VIRTIO_BLK_T_WRITE_ZEROES, 20, 3, unmap, OK),
        (blk::VIRTIO_BLK_T_DISCARD, 30, 1, unmap, UNSUPP),
        (blk::VIRTIO_BLK_T_DISCARD, 127, 2, 0, IOERR),
    ];
    for (kind, sector, sectors, flags, expected) in cases {
        let seg = segment(&s.mem, sector, sectors, flags);
        let bufs = request(&s.mem, kind, 0, &[seg]);
        run(&mut s, &[bufs]);
        assert_eq!(status(&s.mem), expected, "{kind} {sector}");
    }
    let file = std::fs::read(&s.path).unwrap();
    let zero = |from: usize, sectors: usize| {
        file[from * 512..(from + sectors) * 512]
            .iter()
            .all(|&b| b == 0)
    };
    assert!(zero(4, 2) && zero(10, 1) && zero(20, 3));
    assert!(!zero(3, 1) && !zero(6, 1) && !zero(30, 1) && !zero(127, 1));

    // Without the feature negotiated the device refuses the command.
    s.device.set_acked_features(bit(VIRTIO_F_VERSION_1));
    let seg = segment(&s.mem, 40, 1, 0);
    let bufs = request(&s.mem, blk::VIRTIO_BLK_T_DISCARD, 0, &[seg]);
    run(&mut s, &[bufs]);
    assert_eq!(status(&s.mem), UNSUPP);
}

#[test]
fn direct_io_with_unaligned_guest_buffers() {
    let mut s = setup(false, true);
    let data: Vec<u8> = (0..2048u32).map(|i| (i % 241) as u8 + 1).collect();
    s.mem.write_slice(&data, GuestAddress(DATA + 3)).unwrap();
    let write = request(&s.mem, blk::VIRTIO_BLK_T_OUT, 7, &[(DATA + 3, 2048, false)]);
    run(&mut s, &[write]);
    assert_eq!(status(&s.mem), OK);
    let read = request(
        &s.mem,
        blk::VIRTIO_BLK_T_IN,
        7,
        &[(DATA + 0x3_0001, 2048, true)],
    );
    run(&mut s, &[read]);
    assert_eq!(status(&s.mem), OK);
    assert_eq!(guest_bytes(&s.mem, DATA + 0x3_0001, 2048), data);
    assert_eq!(
        &std::fs::read(&s.path).unwrap()[7 * 512..11 * 512],
        &data[..]
    );
}

fn dirty_pages(mem: &GuestMemory) -> Vec<u64> {
    let bits = take_vmm_dirty_bitmap(mem.iter().next().unwrap());
    (0..bits.len() as u64 * 64)
        .filter(|i| bits[*i as usize / 64] & (1 << (i % 64)) != 0)
        .collect()
}

#[test]
fn guest_memory_writes_reach_the_dirty_bitmap() {
    let mut s = setup(false, false);
    let read = request_at(
        &s.mem,
        0,
        blk::VIRTIO_BLK_T_IN,
        0,
        &[(DATA + 0x5000, 8192, true)],
    );
    let write = request_at(
        &s.mem,
        1,
        blk::VIRTIO_BLK_T_OUT,
        0,
        &[(DATA + 0x9000, 512, false)],
    );
    let vq = build(&s.mem, &[read, write]);
    // Forget what building the requests and rings dirtied.
    dirty_pages(&s.mem);
    let (used, _) = process(&mut s.device, &vq, &s.mem, 2, false);
    assert_eq!(used, vec![8193, 1]);
    let used_ring_page = vq.used_addr().0 / 4096;
    let data_page = (DATA + 0x5000) / 4096;
    let dirty = dirty_pages(&s.mem);
    assert_eq!(
        dirty,
        vec![used_ring_page, STATUS / 4096, data_page, data_page + 1]
    );
    assert_eq!(guest_bytes(&s.mem, STATUS, 2), [OK, OK]);
}

#[test]
fn features_and_config_space() {
    let file = image_file(DISK_BYTES);
    let image = DiskImage::open(&drive(file.path(), false, false), LockMode::Active).unwrap();
    let device = BlockDevice::new(image, &config(None, 4));
    let features = device.device_features();
    for feature in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        blk::VIRTIO_BLK_F_FLUSH,
        blk::VIRTIO_BLK_F_MQ,
        blk::VIRTIO_BLK_F_SEG_MAX,
        blk::VIRTIO_BLK_F_BLK_SIZE,
        blk::VIRTIO_BLK_F_DISCARD,
        blk::VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(features & bit(feature), 0, "feature {feature}");
    }
    assert_eq!(features & bit(blk::VIRTIO_BLK_F_RO), 0);

    let mut config = [0u8; CONFIG_SIZE + 4];
    device.registers().read_config(0, &mut config);
    let u32_at = |at: usize| u32::from_le_bytes(config[at..at + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), 128);
    assert_eq!(u32_at(12), 254, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([config[34], config[35]]), 4);
    assert_eq!(u32_at(40), 1, "max_discard_seg");
    assert_eq!(config[56], 1, "write_zeroes_may_unmap");
    assert_eq!(&config[CONFIG_SIZE..], &[0; 4]);
    let mut capacity_high = [0xffu8; 4];
    device.registers().read_config(4, &mut capacity_high);
    assert_eq!(capacity_high, [0; 4]);
}

#[test]
fn config_writes_are_ignored() {
    let s = setup(false, false);
    let mut before = [0u8; CONFIG_SIZE];
    let mut registers = s.device.registers();
    registers.read_config(0, &mut before);
    registers.write_config(32, &[1]);
    registers.write_config(0, &[0xff; 8]);
    let mut after = [0u8; CONFIG_SIZE];
    registers.read_config(0, &mut after);
    assert_eq!(before, after);
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
    for (used_event, expected) in [(0u16, true), (5, false)] {
        let mut s = setup(false, false);
        let flush = request(&s.mem, blk::VIRTIO_BLK_T_FLUSH, 0, &[]);
        let vq = build(&s.mem, &[flush]);
        // used_event sits after the avail ring's flags, idx and ring entries.
        let used_event_addr = vq.avail_addr().unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
        s.mem.write_obj(used_event, used_event_addr).unwrap();
        let (used, notify) = process(&mut s.device, &vq, &s.mem, 1, true);
        assert_eq!(notify, expected, "used_event {used_event}");
        assert_eq!((used, status(&s.mem)), (vec![1], OK));
    }
}

#[test]
fn indirect_descriptor_tables() {
    let mut s = setup(false, false);
    let table = 0x30_0000;
    let entries = [
        (HEADER, 16, VRING_DESC_F_NEXT, 1),
        (DATA, 1024, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        (STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    for (i, (addr, len, flags, next)) in entries.into_iter().enumerate() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        raw[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        raw[14..16].copy_from_slice(&(next as u16).to_le_bytes());
        s.mem
            .write_slice(&raw, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    request(&s.mem, blk::VIRTIO_BLK_T_IN, 1, &[]);
    let vq = MockSplitQueue::create(&s.mem, GuestAddress(0), QUEUE_SIZE);
    let head = SplitDescriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0);
    vq.add_desc_chains(&[RawDescriptor::from(head)], 0).unwrap();
    let (used, _) = process(&mut s.device, &vq, &s.mem, 1, false);
    assert_eq!((used, status(&s.mem)), (vec![1025], OK));
    let file = std::fs::read(&s.path).unwrap();
    assert_eq!(guest_bytes(&s.mem, DATA, 1024), &file[512..1536]);
}
