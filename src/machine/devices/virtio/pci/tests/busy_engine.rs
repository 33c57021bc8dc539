//! A vCPU's register accesses while a request is in progress that does not finish until the
//! test says so: none of them may wait for it, and a reset is left to the I/O thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use super::*;
use crate::machine::devices::virtio::worker::IoThread;

/// Far longer than any register access takes on a loaded host; a blocked one never finishes.
const PATIENCE: Duration = Duration::from_secs(5);
const CONFIG_BYTE: u8 = 0x5a;

struct GateRegisters;

impl DeviceRegisters for GateRegisters {
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(CONFIG_BYTE);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

/// A device whose requests wait at a gate: it says when one has started, and finishes it when
/// the gate opens. It counts its flushes.
struct Gate {
    started: Sender<()>,
    open: Receiver<()>,
    flushes: Arc<AtomicUsize>,
}

impl VirtioBackend for Gate {
    type Error = std::io::Error;
    type Registers = GateRegisters;

    fn device_type(&self) -> u16 {
        2
    }
    fn pci_class(&self) -> u32 {
        0x01_0000
    }
    fn queue_count(&self) -> u16 {
        1
    }
    fn queue_max_size(&self) -> u16 {
        256
    }
    fn registers(&self) -> GateRegisters {
        GateRegisters
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn process_queue(
        &mut self,
        _memory: &GuestMemory,
        _queue: &mut Queue,
    ) -> Result<bool, std::io::Error> {
        let _ = self.started.send(());
        let _ = self.open.recv();
        Ok(false)
    }
    fn flush(&mut self) -> Result<(), std::io::Error> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct GateFixture {
    device: VirtioDevice<Gate>,
    started: Receiver<()>,
    open: Sender<()>,
    flushes: Arc<AtomicUsize>,
}

/// A running device with a gated backend, or `None` without /dev/kvm outside CI.
fn gate_fixture() -> Option<GateFixture> {
    let (started_tx, started) = mpsc::channel();
    let (open, open_rx) = mpsc::channel();
    let flushes = Arc::new(AtomicUsize::new(0));
    let gate = Gate {
        started: started_tx,
        open: open_rx,
        flushes: flushes.clone(),
    };
    let device = function(gate, test_memory())?;
    assert!(negotiate(&device, VIRTIO_F_VERSION_1));
    set_up_queue(&device);
    Some(GateFixture {
        device,
        started,
        open,
        flushes,
    })
}

#[test]
fn register_accesses_do_not_wait_for_a_request_in_progress() {
    let Some(fixture) = gate_fixture() else {
        return;
    };
    let device = &fixture.device;
    let io = {
        let device = device.clone();
        std::thread::spawn(move || device.process(0))
    };
    fixture
        .started
        .recv_timeout(PATIENCE)
        .expect("the request started");

    let (done_tx, done) = mpsc::channel();
    let vcpu = {
        let device = device.clone();
        std::thread::spawn(move || {
            let isr = read(&device, ISR_OFFSET, 1);
            let config = read(&device, DEVICE_OFFSET, 4);
            write(&device, 0x00, 1, 4);
            let features = read(&device, 0x04, 4);
            let mut entry = [0u8; 4];
            lock(device.transport()).bar_read(MSIX_BAR, 0, &mut entry);
            write(&device, 0x14, 0, 1);
            let _ = done_tx.send((isr, config, features, status(&device)));
        })
    };
    let accesses = done.recv_timeout(PATIENCE);
    // The request finishes either way, so that a failure leaves no thread behind.
    fixture.open.send(()).unwrap();
    io.join().unwrap();
    vcpu.join().unwrap();
    let (isr, config, features, status_meanwhile) =
        accesses.expect("register accesses finished while a request was in progress");
    assert_eq!(isr, 0);
    assert_eq!(config, u64::from(u32::from_le_bytes([CONFIG_BYTE; 4])));
    assert_eq!(features, 1, "VERSION_1 in the high word");
    assert_ne!(status_meanwhile, 0, "the reset waits for the I/O thread");
    assert_eq!(
        fixture.flushes.load(Ordering::SeqCst),
        0,
        "no flush in a vCPU's exit"
    );

    device.complete_reset();
    assert_eq!(status(device), 0);
    assert_eq!(
        fixture.flushes.load(Ordering::SeqCst),
        1,
        "the reset flushed"
    );
}

#[test]
fn the_io_thread_finishes_a_reset() {
    let Some(fixture) = gate_fixture() else {
        return;
    };
    // With the gate gone requests pass straight through: the I/O thread handles the one
    // DRIVER_OK announced before the reset, and a failed test still joins it.
    drop(fixture.open);
    let _io = IoThread::spawn("iothread test".into(), fixture.device.clone()).unwrap();
    write(&fixture.device, 0x14, 0, 1);
    // What Linux's vp_reset does: read status until it is 0.
    let deadline = Instant::now() + PATIENCE;
    while status(&fixture.device) != 0 {
        assert!(Instant::now() < deadline, "the reset never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(fixture.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn a_drain_finishes_a_pending_reset() {
    let Some(fixture) = gate_fixture() else {
        return;
    };
    let device = &fixture.device;
    write(device, 0x14, 0, 1);
    device.quiesce();
    assert!(device.is_drained(), "the state can be saved");
    assert_eq!(lock(device.transport()).save().common.status, 0);
    assert_eq!(fixture.flushes.load(Ordering::SeqCst), 1);
}
