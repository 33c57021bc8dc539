//! Image locking that QEMU understands, so that ferry and QEMU refuse to write one image at once.
//!
//! QEMU's file-posix driver expresses the permissions a user holds on an image as open file
//! description (OFD) read locks on single bytes: byte `100 + perm` while it holds `perm`, and
//! byte `200 + perm` while it forbids others to hold `perm`. Before taking new permissions it
//! locks the new bytes first and then tests, with a write-lock probe, whether anybody else locks
//! the byte that conflicts; if so it drops what it just took. Taking before testing means two
//! users racing for the same image may both fail, but can never both succeed.
//!
//! OFD locks belong to the open file description, not the process, so two opens of one image in
//! one process conflict exactly as two processes do, and closing the file drops them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// QEMU's `BLK_PERM_*` bits by bit index, named as its lock errors name them.
const PERM_NAMES: [&str; 5] = [
    "consistent read",
    "write",
    "write unchanged",
    "resize",
    "change children",
];
const PERM_COUNT: u32 = PERM_NAMES.len() as u32;
const PERM_CONSISTENT_READ: u32 = 0;
const PERM_WRITE: u32 = 1;

/// The byte locked while a permission is held.
const HELD_BASE: i64 = 100;
/// The byte locked while a permission is forbidden to others.
const UNSHARED_BASE: i64 = 200;

/// How a drive holds its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// In use by a running guest: a writable drive holds write and forbids others to write; a
    /// read-only one holds consistent-read and forbids writers, as QEMU's virtio-blk does.
    Active,
    /// Opened but not in use, as on a migration destination before it takes over: holds and
    /// forbids nothing, like QEMU's inactive images at `-incoming`.
    Inactive,
}

/// A set of permission bits (bit `n` is permission `n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Perms(u32);

impl Perms {
    fn contains(self, perm: u32) -> bool {
        self.0 & (1 << perm) != 0
    }
}

/// The lock bytes one open of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct LockState {
    held: Perms,
    unshared: Perms,
}

impl LockState {
    /// What QEMU's virtio-blk takes on a raw image, for a drive in `mode`.
    pub(crate) fn for_mode(mode: LockMode, readonly: bool) -> Self {
        match mode {
            LockMode::Inactive => Self::default(),
            LockMode::Active => {
                let mut held = 1 << PERM_CONSISTENT_READ;
                if !readonly {
                    held |= 1 << PERM_WRITE;
                }
                Self {
                    held: Perms(held),
                    // QEMU's block devices share everything but write, even when read-only.
                    unshared: Perms(1 << PERM_WRITE),
                }
            }
        }
    }
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub(crate) enum LockFailure {
    /// Another user holds, or forbids, the named permission.
    Conflict {
        permission: &'static str,
        forbidden: bool,
    },
    /// The lock system call failed.
    Os(io::Error),
}

/// Moves `file`'s lock bytes from `from` to `to`. On failure the locks are back to `from`.
pub(crate) fn switch(file: &File, from: LockState, to: LockState) -> Result<(), LockFailure> {
    let union = LockState {
        held: Perms(from.held.0 | to.held.0),
        unshared: Perms(from.unshared.0 | to.unshared.0),
    };
    let taken = apply(file, from, union)
        .map_err(LockFailure::Os)
        .and_then(|()| check(file, to));
    match taken {
        Ok(()) => apply(file, union, to).map_err(LockFailure::Os),
        Err(failure) => {
            if let Err(err) = apply(file, union, from) {
                tracing::warn!(%err, "could not restore the image's previous lock bytes");
            }
            Err(failure)
        }
    }
}

/// Locks the bytes in `to` that `from` does not have and unlocks those `to` lacks.
fn apply(file: &File, from: LockState, to: LockState) -> io::Result<()> {
    for perm in 0..PERM_COUNT {
        for (base, old, new) in [
            (HELD_BASE, from.held, to.held),
            (UNSHARED_BASE, from.unshared, to.unshared),
        ] {
            let byte = base + i64::from(perm);
            match (old.contains(perm), new.contains(perm)) {
                (false, true) => set_lock(file, byte, libc::F_RDLCK)?,
                (true, false) => set_lock(file, byte, libc::F_UNLCK)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// Fails if another open of the file forbids what `state` holds or holds what it forbids.
fn check(file: &File, state: LockState) -> Result<(), LockFailure> {
    for perm in 0..PERM_COUNT {
        let forbidden = state.held.contains(perm) && locked_elsewhere(file, UNSHARED_BASE, perm)?;
        let held = state.unshared.contains(perm) && locked_elsewhere(file, HELD_BASE, perm)?;
        if forbidden || held {
            return Err(LockFailure::Conflict {
                permission: PERM_NAMES[perm as usize],
                forbidden,
            });
        }
    }
    Ok(())
}

fn locked_elsewhere(file: &File, base: i64, perm: u32) -> Result<bool, LockFailure> {
    let mut probe = flock(base + i64::from(perm), libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and writes one `struct flock`, which `probe` is, and the fd is
    // open for the duration of the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    if ret < 0 {
        return Err(LockFailure::Os(io::Error::last_os_error()));
    }
    Ok(i32::from(probe.l_type) != libc::F_UNLCK)
}

fn set_lock(file: &File, byte: i64, kind: i32) -> io::Result<()> {
    let lock = flock(byte, kind);
    // SAFETY: F_OFD_SETLK only reads the `struct flock` it is given, and the fd is open.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn flock(byte: i64, kind: i32) -> libc::flock {
    // SAFETY: `flock` is plain integers, for which all zeroes is valid; OFD locks require l_pid 0.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    lock
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::NamedTempFile, File, File) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let a = File::options()
            .read(true)
            .write(true)
            .open(tmp.path())
            .unwrap();
        let b = File::options()
            .read(true)
            .write(true)
            .open(tmp.path())
            .unwrap();
        (tmp, a, b)
    }

    #[test]
    fn two_writers_conflict_and_a_failed_switch_keeps_the_old_locks() {
        let (_tmp, a, b) = image();
        let active = LockState::for_mode(LockMode::Active, false);
        switch(&a, LockState::default(), active).unwrap();
        match switch(&b, LockState::default(), active) {
            Err(LockFailure::Conflict { permission, .. }) => assert_eq!(permission, "write"),
            other => panic!("second writer was not refused: {other:?}"),
        }
        // `b` must hold nothing after its failed switch, so `a` can still re-check its own lock.
        assert!(!locked_elsewhere(&a, HELD_BASE, PERM_CONSISTENT_READ).unwrap());
        switch(&a, active, LockState::default()).unwrap();
        switch(&b, LockState::default(), active).unwrap();
    }

    #[test]
    fn readers_share_but_exclude_writers() {
        let (_tmp, a, b) = image();
        let reader = LockState::for_mode(LockMode::Active, true);
        switch(&a, LockState::default(), reader).unwrap();
        switch(&b, LockState::default(), reader).unwrap();
        let writer = LockState::for_mode(LockMode::Active, false);
        assert!(matches!(
            switch(&b, reader, writer),
            Err(LockFailure::Conflict {
                permission: "write",
                forbidden: true
            })
        ));
    }
}
