use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::*;

pub(crate) fn drive(path: &Path, readonly: bool, direct: bool) -> DriveConfig {
    DriveConfig {
        id: "disk0".into(),
        file: path.to_owned(),
        readonly,
        direct,
        format: DriveFormat::Raw,
    }
}

/// A temporary image of `len` bytes holding a recognisable pattern.
pub(crate) fn image_file(len: usize) -> tempfile::NamedTempFile {
    let mut tmp = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..len)
        .map(|i| 1 + ((i * 7 + i / 512) % 255) as u8)
        .collect();
    tmp.write_all(&data).unwrap();
    tmp
}

fn open(path: &Path, readonly: bool, direct: bool, mode: LockMode) -> DiskImage {
    DiskImage::open(&drive(path, readonly, direct), mode).unwrap()
}

#[test]
fn user_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing = DiskImage::open(
        &drive(&dir.path().join("nope"), false, false),
        LockMode::Active,
    );
    assert!(matches!(missing, Err(BlockError::Missing { .. })));

    let err = DiskImage::open(&drive(dir.path(), true, false), LockMode::Active).unwrap_err();
    assert!(matches!(err, BlockError::Directory { .. }), "{err}");

    let odd = image_file(1000);
    let err = DiskImage::open(&drive(odd.path(), false, false), LockMode::Active).unwrap_err();
    assert!(err.to_string().contains("multiple of 512"), "{err}");
    assert!(err.to_string().contains(&odd.path().display().to_string()));

    // A file this process may read but not write; root writes through mode bits, sysfs's 0444
    // files stop even root.
    let ro = image_file(512);
    std::fs::set_permissions(ro.path(), std::fs::Permissions::from_mode(0o444)).unwrap();
    let ro_path = if File::options().write(true).open(ro.path()).is_ok() {
        Path::new("/sys/kernel/notes")
    } else {
        ro.path()
    };
    let err = DiskImage::open(&drive(ro_path, false, false), LockMode::Active).unwrap_err();
    assert!(matches!(err, BlockError::ReadOnlyFile { .. }), "{err}");
    assert!(err.to_string().contains("use readonly=on"), "{err}");
}

fn round_trip(direct: bool) {
    let tmp = image_file(64 * 1024);
    let image = open(tmp.path(), false, direct, LockMode::Active);
    assert_eq!(image.size(), 64 * 1024);
    let reference = std::fs::read(tmp.path()).unwrap();

    // Unaligned offsets, lengths and buffers exercise the O_DIRECT bounce path.
    let mut backing = vec![0u8; 5000];
    let buf = &mut backing[3..3 + 4000];
    image.read_at(100, buf).unwrap();
    assert_eq!(buf, &reference[100..4100]);

    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    image.write_at(700, &data[1..]).unwrap();
    let mut aligned = AlignedBuf::new(8192);
    image.write_at(8192, &aligned).unwrap();
    aligned[0] = 1;
    image.read_at(8192, &mut aligned).unwrap();
    assert!(aligned.iter().all(|&b| b == 0));
    image.flush().unwrap();

    let mut expected = reference;
    expected[700..700 + 2999].copy_from_slice(&data[1..]);
    expected[8192..16384].fill(0);
    assert_eq!(std::fs::read(tmp.path()).unwrap(), expected);
}

#[test]
fn buffered_round_trip() {
    round_trip(false);
}

#[test]
fn direct_round_trip_with_unaligned_buffers() {
    round_trip(true);
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let tmp = image_file(1 << 20);
    let image = open(tmp.path(), false, false, LockMode::Active);
    assert!(image.supports_discard(), "ext4 and tmpfs punch holes");
    assert!(image.supports_write_zeroes());
    image.discard(4096, 8192).unwrap();
    image.write_zeroes(65536, 4096, false).unwrap();
    image.write_zeroes(131072, 1024, true).unwrap();
    // The fallback for file systems without ZERO_RANGE.
    image.can_zero_range.store(false, Ordering::Relaxed);
    image.write_zeroes(200_000, 3 * 512, false).unwrap();

    let data = std::fs::read(tmp.path()).unwrap();
    assert_eq!(data.len(), 1 << 20, "KEEP_SIZE keeps the size");
    for (start, len) in [(4096, 8192), (65536, 4096), (131072, 1024), (200_000, 1536)] {
        assert!(data[start..start + len].iter().all(|&b| b == 0), "{start}");
        assert_ne!(data[start + len], 0, "zeroed past {start}+{len}");
        assert_ne!(data[start - 1], 0, "zeroed before {start}");
    }
}

#[test]
fn read_only_images_refuse_writes() {
    let tmp = image_file(4096);
    let image = open(tmp.path(), true, false, LockMode::Active);
    assert!(image.readonly());
    assert!(!image.supports_discard() && !image.supports_write_zeroes());
    let err = image.write_at(0, &[1; 512]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(image.write_zeroes(0, 512, true).is_err());
}

#[test]
fn two_active_writers_are_refused() {
    let tmp = image_file(4096);
    let _first = open(tmp.path(), false, false, LockMode::Active);
    let err = DiskImage::open(&drive(tmp.path(), false, false), LockMode::Active).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, BlockError::InUse { .. }), "{text}");
    assert!(text.contains(&tmp.path().display().to_string()), "{text}");
    assert!(text.contains("another process is using"), "{text}");
    // A reader is refused too: the writer holds the write it forbids.
    assert!(DiskImage::open(&drive(tmp.path(), true, false), LockMode::Active).is_err());
}

#[test]
fn migration_hands_the_image_over() {
    let tmp = image_file(4096);
    let mut source = open(tmp.path(), false, false, LockMode::Active);
    let mut destination = open(tmp.path(), false, true, LockMode::Inactive);

    // The destination cannot take over early, and a refused switch leaves it inactive.
    assert!(destination.set_lock_mode(LockMode::Active).is_err());
    source.set_lock_mode(LockMode::Inactive).unwrap();
    destination.set_lock_mode(LockMode::Active).unwrap();
    // Now the source cannot resume writing, and it must not have lost its open file.
    let err = source.set_lock_mode(LockMode::Active).unwrap_err();
    assert!(matches!(err, BlockError::InUse { .. }), "{err}");
    let mut byte = [0u8; 1];
    source.read_at(0, &mut byte).unwrap();
    // Going back (a failed migration) works the same way.
    destination.set_lock_mode(LockMode::Inactive).unwrap();
    source.set_lock_mode(LockMode::Active).unwrap();
}

#[test]
fn dropping_an_image_releases_its_locks() {
    let tmp = image_file(4096);
    drop(open(tmp.path(), false, false, LockMode::Active));
    open(tmp.path(), false, false, LockMode::Active);
}
