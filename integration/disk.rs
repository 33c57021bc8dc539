//! virtio-blk-pci disks on real KVM, driven by the built-in guest's own driver: I/O verified
//! buffered and with O_DIRECT, read-only disks, what the image holds after `quit`, live
//! migration with I/O in flight over TCP and UNIX, cancels and failures that leave the source's
//! disk working, attribute mismatches, and bad drives.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    kvm_turn, migrate_to_silent_destination, migration_uri, scratch, wait_switchover, Ferry,
    Transport,
};
use ferry::guest::disk::{
    check_image, last_disk_progress, write_image, DiskLine, DISK_AHEAD_BLOCKS,
};
use ferry::guest::{DiskProgress, GuestLine};
use serde_json::{json, Value};

const MEM_MIB: &str = "128";
/// 4 MiB: 1024 blocks of 4 KiB, a pass every few hundred milliseconds.
const IMAGE_BYTES: u64 = 4 << 20;
const BLOCKS: u64 = IMAGE_BYTES / 4096;
const APPEND: &str = "ferry.run=tick,disk ferry.tick_ms=100";
const SERIAL: &str = "ferry-disk-7";
const WAIT: Duration = Duration::from_secs(60);

/// How a test's disk is set up; `drive` and `device` give the extra properties.
struct Disk<'a> {
    image: &'a Path,
    drive: &'a str,
    device: &'a str,
}

impl Disk<'_> {
    /// The device sits at 03.0 unless `device` gives its own `addr=`.
    fn args(&self) -> Vec<String> {
        let addr = if self.device.contains("addr=") {
            ""
        } else {
            ",addr=0x3"
        };
        vec![
            "-drive".into(),
            format!("file={},id=d0,if=none{}", self.image.display(), self.drive),
            "-device".into(),
            format!(
                "virtio-blk-pci,drive=d0,id=disk0,bus=pcie.0{addr}{}",
                self.device
            ),
        ]
    }
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(IMAGE_BYTES).unwrap();
    path
}

fn start(name: &str, disk: &Disk, extra: &[&str], qmp: &Path) -> Ferry {
    let disk_args = disk.args();
    let mut args: Vec<&str> = vec!["-m", MEM_MIB];
    args.extend(extra);
    args.extend(disk_args.iter().map(String::as_str));
    common::start(name, &args, Some(qmp))
}

fn start_guest(name: &str, disk: &Disk, qmp: &Path) -> Ferry {
    let vm = start(name, disk, &["-append", APPEND], qmp);
    vm.wait_ready();
    vm
}

fn disk_lines(vm: &Ferry) -> Vec<DiskLine> {
    vm.guest_lines()
        .into_iter()
        .filter_map(|line| match line {
            GuestLine::Disk(disk) => Some(disk),
            _ => None,
        })
        .collect()
}

fn progress(vm: &Ferry) -> Option<DiskProgress> {
    last_disk_progress(&vm.guest_lines())
}

/// No mismatch and no error in what the guest printed.
fn assert_clean(vm: &Ferry) {
    let bad: Vec<DiskLine> = disk_lines(vm)
        .into_iter()
        .filter(|l| matches!(l, DiskLine::Mismatch { .. } | DiskLine::Error { .. }))
        .collect();
    assert!(bad.is_empty(), "{}: {bad:?}\n{}", vm.name, vm.context());
    assert!(
        !vm.lines().iter().any(|l| l.starts_with("warning: disk")),
        "{}",
        vm.context()
    );
}

/// Waits until the guest has written generation `gen` past block `done`.
fn wait_progress(vm: &Ferry, gen: u64, done: u64) -> DiskProgress {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(p) = progress(vm).filter(|p| (p.gen, p.done) >= (gen, done)) {
            return p;
        }
        assert_clean(vm);
        assert!(
            Instant::now() < deadline,
            "{}: no disk progress to gen {gen} done {done}\n{}",
            vm.name,
            vm.context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends the VM through QMP and checks that the image holds what the guest last reported.
fn quit_and_check(mut vm: Ferry, image: &Path) {
    vm.qmp().execute("quit", None);
    assert!(vm.wait_exit(Duration::from_secs(10)).success());
    assert_clean(&vm);
    let last = progress(&vm).expect("the guest reported progress");
    let ahead = check_image(image, BLOCKS, last.gen, last.done)
        .unwrap_or_else(|e| panic!("{}: image does not hold what it reported: {e}", vm.name));
    assert!(
        ahead <= DISK_AHEAD_BLOCKS,
        "{ahead} blocks beyond the last report"
    );
}

fn found_line(vm: &Ferry) -> DiskLine {
    disk_lines(vm)
        .into_iter()
        .find(|l| matches!(l, DiskLine::Found { .. }))
        .unwrap_or_else(|| panic!("no 'disk found' line\n{}", vm.context()))
}

/// Reads and writes are verified by the guest with the host page cache and with O_DIRECT, every
/// completion raises an MSI-X interrupt, requests past the end fail, and after `quit` the image
/// holds what the guest says it wrote.
#[test]
fn io_is_verified_buffered_and_direct() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    for direct in ["off", "on"] {
        let path = image(dir.path(), &format!("direct-{direct}.img"));
        let drive = format!(",direct={direct},format=raw");
        let device = format!(",serial={SERIAL}");
        let disk = Disk {
            image: &path,
            drive: &drive,
            device: &device,
        };
        let vm = start_guest(&format!("direct={direct}"), &disk, &dir.path().join("q"));
        match found_line(&vm) {
            DiskLine::Found {
                slot,
                function,
                capacity,
                ro,
                blocks,
                serial,
                ..
            } => {
                assert_eq!((slot, function), (3, 0));
                assert_eq!(capacity, IMAGE_BYTES / 512);
                assert!(!ro);
                assert_eq!(blocks, BLOCKS);
                assert_eq!(serial, SERIAL);
            }
            _ => unreachable!(),
        }
        assert!(disk_lines(&vm).contains(&DiskLine::BeyondEnd { status: 1 }));
        let reached = wait_progress(&vm, 3, 0);
        // With EVENT_IDX the device interrupts when it runs out of requests, not per request.
        assert!(reached.irqs > 0, "{reached:?}: MSI-X interrupts missing");
        quit_and_check(vm, &path);
    }
}

/// A read-only disk: the guest reads what the host wrote, its write is refused with IOERR, and
/// the image is unchanged.
#[test]
fn readonly_disk_reads_and_refuses_writes() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    let path = image(dir.path(), "ro.img");
    write_image(&path, BLOCKS, 1).unwrap();
    let before = std::fs::read(&path).unwrap();
    let disk = Disk {
        image: &path,
        drive: ",readonly=on",
        device: "",
    };
    let mut vm = start_guest("readonly", &disk, &dir.path().join("q"));
    assert!(matches!(found_line(&vm), DiskLine::Found { ro: true, .. }));
    vm.wait_line("two verified passes", WAIT, |l| {
        l == "disk ro verified pass=2"
    });
    assert!(disk_lines(&vm).contains(&DiskLine::RoWrite { status: 1 }));
    assert_clean(&vm);
    vm.qmp().execute("quit", None);
    assert!(vm.wait_exit(Duration::from_secs(10)).success());
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a read-only image changed"
    );
}

fn migrate(source: &Ferry, uri: &str) -> Value {
    let mut qmp = source.qmp();
    qmp.ok("migrate", Some(json!({"uri": uri})));
    qmp.wait_migration(&["completed", "failed", "canceled"], WAIT)
}

/// The guest writes and verifies continuously while it moves; on the destination it goes on
/// from where it was, its verification never fails, and the image holds every write it saw
/// completed.
fn migrate_during_io(transport: Transport) {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    let path = image(dir.path(), "shared.img");
    let device = format!(",serial={SERIAL}");
    let disk = Disk {
        image: &path,
        drive: "",
        device: &device,
    };
    let source = start_guest("source", &disk, &dir.path().join("src.qmp"));
    wait_progress(&source, 2, 0);
    let uri = migration_uri(transport, &dir.path().join("mig.sock"));
    let destination = start(
        "destination",
        &disk,
        &["-incoming", &uri],
        &dir.path().join("dst.qmp"),
    );
    let info = migrate(&source, &uri);
    assert_eq!(info["status"], "completed", "{info}\n{}", source.context());
    assert_eq!(destination.qmp().status(), "running");
    assert_eq!(source.qmp().status(), "postmigrate");
    let left = progress(&source).expect("the source reported progress");
    // A full pass on the destination reads back every block the source wrote, and more.
    let arrived = wait_progress(&destination, left.gen + 2, 0);
    assert!(arrived.irqs > 0);
    assert_clean(&source);
    // The guest kept several requests in flight up to the switchover and right after it (a
    // pass's last line is printed with none: the next pass waits for it).
    let mid_pass = |vm: &Ferry| -> Vec<DiskProgress> {
        vm.guest_lines()
            .into_iter()
            .filter_map(|line| match line {
                GuestLine::Disk(DiskLine::Progress(p)) if p.done < BLOCKS => Some(p),
                _ => None,
            })
            .collect()
    };
    let before = *mid_pass(&source).last().expect("source progress");
    let after = mid_pass(&destination)[0];
    eprintln!(
        "{transport:?}: requests in flight at the source's last line: {}, at the destination's \
         first: {}",
        before.inflight, after.inflight
    );
    assert!(
        before.inflight > 1 && after.inflight > 1,
        "{before:?} {after:?}"
    );
    assert!(
        !destination
            .guest_lines()
            .iter()
            .any(|l| matches!(l, GuestLine::Disk(DiskLine::Found { .. }))),
        "the destination's guest started over instead of continuing"
    );
    quit_and_check(destination, &path);
}

#[test]
fn migration_during_io_over_tcp() {
    migrate_during_io(Transport::Tcp);
}

#[test]
fn migration_during_io_over_unix() {
    migrate_during_io(Transport::Unix);
}

/// Waits for new disk progress on a VM that should be running its disk again.
fn assert_disk_runs(vm: &Ferry) {
    assert_eq!(vm.qmp().status(), "running", "{}", vm.context());
    let seen = vm.line_count();
    vm.wait_line_from(seen, "disk progress after the migration ended", WAIT, |l| {
        l.starts_with("disk gen=")
    });
    assert_clean(vm);
}

/// A cancel while the source is in its switchover (disks drained, waiting for a destination
/// that never says READY) gives the disk back to the guest, image lock included.
#[test]
fn cancel_at_the_switchover_keeps_the_disk_working() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    let path = image(dir.path(), "cancel.img");
    let disk = Disk {
        image: &path,
        drive: "",
        device: "",
    };
    let source = start_guest("source", &disk, &dir.path().join("src.qmp"));
    wait_progress(&source, 1, 128);
    let mut qmp = source.qmp();
    let _reader = migrate_to_silent_destination(&mut qmp, true);
    wait_switchover(&mut qmp, WAIT);
    qmp.ok("migrate_cancel", None);
    let info = qmp.wait_migration(&["canceled", "failed"], Duration::from_secs(10));
    assert_eq!(info["status"], "canceled", "{info}");
    assert_disk_runs(&source);
    // The source holds its image again: nobody else may write it.
    let disk_args = disk.args();
    let mut args = vec!["-m", MEM_MIB];
    args.extend(disk_args.iter().map(String::as_str));
    let mut intruder = common::start("intruder", &args, None);
    assert!(!intruder.wait_exit(Duration::from_secs(10)).success());
    assert!(
        intruder.stderr().contains("another process is using"),
        "{}",
        intruder.stderr()
    );
}

/// A destination that cannot take the disk at the commit (another process holds its copy of
/// the image) refuses the guest; the source takes it back and its disk goes on.
#[test]
fn a_destination_that_cannot_take_the_disk_leaves_the_source_running() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    let path = image(dir.path(), "src.img");
    let copy = image(dir.path(), "copy.img");
    let source_disk = Disk {
        image: &path,
        drive: "",
        device: "",
    };
    let copy_disk = Disk {
        image: &copy,
        drive: "",
        device: "",
    };
    let source = start_guest("source", &source_disk, &dir.path().join("src.qmp"));
    wait_progress(&source, 1, 128);
    let _holder = start(
        "holder",
        &copy_disk,
        &["-S"],
        &dir.path().join("holder.qmp"),
    );
    let uri = migration_uri(Transport::Unix, &dir.path().join("mig.sock"));
    let mut destination = start(
        "destination",
        &copy_disk,
        &["-incoming", &uri],
        &dir.path().join("dst.qmp"),
    );
    let info = migrate(&source, &uri);
    assert_eq!(info["status"], "failed", "{info}");
    let reason = info["error-desc"].as_str().unwrap_or_default();
    assert!(reason.contains("cannot take over the disks"), "{reason}");
    // The guest paused for the switchover but never ran elsewhere: as in QEMU, only a
    // completed migration has a downtime.
    assert!(info.get("downtime").is_none(), "{info}");
    assert_disk_runs(&source);
    assert!(!destination.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(destination.line_count(), 0, "the destination ran the guest");
}

/// What StratoVirt says must not change between the ends (bus/addr, serial, readonly, the
/// image's size) is compared before any RAM moves, and both sides name the difference.
#[test]
fn disk_attribute_mismatches_are_refused_naming_them() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    let path = image(dir.path(), "src.img");
    let source_disk = Disk {
        image: &path,
        drive: "",
        device: ",serial=one",
    };
    let source = start_guest("source", &source_disk, &dir.path().join("src.qmp"));
    let bigger = dir.path().join("bigger.img");
    std::fs::File::create(&bigger)
        .unwrap()
        .set_len(2 * IMAGE_BYTES)
        .unwrap();
    let copy = image(dir.path(), "copy.img");
    let cases: [(&str, &Path, &str, &str, &str); 4] = [
        (
            "serial",
            &copy,
            "",
            ",serial=two",
            "serial is \"one\" on the source, \"two\"",
        ),
        (
            "size",
            &bigger,
            "",
            ",serial=one",
            "size is \"4194304\" on the source, \"8388608\"",
        ),
        (
            "readonly",
            &copy,
            ",readonly=on",
            ",serial=one",
            "readonly is \"off\" on the source, \"on\"",
        ),
        (
            "addr",
            &copy,
            "",
            ",serial=one,addr=0x4",
            "addr is \"0x3.0\" on the source, \"0x4.0\"",
        ),
    ];
    for (what, image, drive, device, expected) in cases {
        let disk = Disk {
            image,
            drive,
            device,
        };
        let uri = migration_uri(Transport::Tcp, &dir.path().join("mig.sock"));
        let qmp = dir.path().join(format!("{what}.qmp"));
        let mut destination = start(
            &format!("destination ({what})"),
            &disk,
            &["-incoming", &uri],
            &qmp,
        );
        let info = migrate(&source, &uri);
        assert_eq!(info["status"], "failed", "{what}: {info}");
        let reason = info["error-desc"].as_str().unwrap_or_default();
        assert!(reason.contains(expected), "{what}: source says {reason}");
        assert!(!destination.wait_exit(Duration::from_secs(10)).success());
        assert!(
            destination.stderr().contains(expected),
            "{what}: destination says {}",
            destination.stderr()
        );
        assert_disk_runs(&source);
    }
}

/// Drives that cannot work are refused at start with a reason: a missing image (exit 1), a
/// device at the host bridge's address (exit 2, a command-line error).
#[test]
fn bad_drives_are_refused_at_start() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let dir = scratch();
    let missing = dir.path().join("missing.img");
    let cases = [
        (
            format!("file={},id=d0", missing.display()),
            "virtio-blk-pci,drive=d0,addr=3",
            1,
            "missing.img",
        ),
        (
            format!("file={},id=d0", image(dir.path(), "a.img").display()),
            "virtio-blk-pci,drive=d0,addr=0",
            2,
            "host bridge",
        ),
    ];
    for (drive, device, code, expected) in cases {
        let mut vm = common::start(
            "bad",
            &["-m", MEM_MIB, "-drive", &drive, "-device", device],
            None,
        );
        let status = vm.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(code), "{}", vm.stderr());
        assert!(vm.stderr().contains(expected), "{}", vm.stderr());
    }
}
