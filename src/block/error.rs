//! What can go wrong opening and locking a disk image, said so the user knows what to change.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::lock::LockFailure;
use crate::cli::DriveConfig;

/// Why a disk image could not be opened or locked.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("-drive id={id}: image {} does not exist; check file=", path.display())]
    Missing { id: String, path: PathBuf },
    #[error("-drive id={id}: {} is a directory; file= must name an image file or block device", path.display())]
    Directory { id: String, path: PathBuf },
    #[error("-drive id={id}: no permission to read {}; check its permissions", path.display())]
    Unreadable { id: String, path: PathBuf },
    #[error("-drive id={id}: {} cannot be opened for writing; use readonly=on, or make it writable", path.display())]
    ReadOnlyFile { id: String, path: PathBuf },
    #[error("-drive id={id}: the file system of {} does not support direct=on; use direct=off", path.display())]
    DirectUnsupported { id: String, path: PathBuf },
    #[error("-drive id={id}: {} is {size} bytes, not a whole number of 512-byte sectors; resize it (e.g. truncate -s) to a multiple of 512", path.display())]
    UnalignedSize {
        id: String,
        path: PathBuf,
        size: u64,
    },
    #[error("-drive id={id}: {} is {size} bytes, not a multiple of the {align}-byte blocks direct=on needs here; resize it or use direct=off", path.display())]
    DirectSize {
        id: String,
        path: PathBuf,
        size: u64,
        align: u64,
    },
    #[error("-drive id={id}: another process is using {} ({}); stop it, or give this VM its own image", path.display(), conflict_text(permission, *forbidden))]
    InUse {
        id: String,
        path: PathBuf,
        permission: &'static str,
        forbidden: bool,
    },
    #[error("-drive id={id}: cannot lock {}; the file system may not support OFD locks", path.display())]
    Lock {
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("-drive id={id}: cannot {what} {}", path.display())]
    Io {
        id: String,
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn conflict_text(permission: &str, forbidden: bool) -> String {
    if forbidden {
        format!("it does not allow others the \"{permission}\" permission this drive needs")
    } else {
        format!("it holds the \"{permission}\" permission this drive does not share")
    }
}

impl BlockError {
    pub(crate) fn from_open(drive: &DriveConfig, source: io::Error) -> Self {
        let id = drive.id.clone();
        let path = drive.file.clone();
        match source.raw_os_error() {
            Some(libc::ENOENT) => Self::Missing { id, path },
            Some(libc::EISDIR) => Self::Directory { id, path },
            Some(libc::EACCES | libc::EPERM | libc::EROFS)
                if !drive.readonly && File::open(&path).is_ok() =>
            {
                Self::ReadOnlyFile { id, path }
            }
            Some(libc::EACCES | libc::EPERM) => Self::Unreadable { id, path },
            Some(libc::EINVAL) if drive.direct => Self::DirectUnsupported { id, path },
            _ => Self::Io {
                id,
                path,
                what: "open",
                source,
            },
        }
    }

    pub(crate) fn from_lock(id: &str, path: &Path, failure: LockFailure) -> Self {
        let id = id.to_owned();
        let path = path.to_owned();
        match failure {
            LockFailure::Conflict {
                permission,
                forbidden,
            } => Self::InUse {
                id,
                path,
                permission,
                forbidden,
            },
            LockFailure::Os(source) => Self::Lock { id, path, source },
        }
    }
}
