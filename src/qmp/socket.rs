//! Binding the QMP socket file, and removing it again.
//!
//! The socket is bound, made mode 0600 and only then listened on. Until `listen(2)` a
//! connect is refused, so there is no window in which another user could connect through
//! the umask's looser mode (what `UnixListener::bind`, which binds and listens at once,
//! would leave open). The process umask is not touched: it is shared by all threads.

use std::fs::{self, Permissions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::QmpError;

/// Connections the kernel queues before `accept`; QMP clients are few.
const BACKLOG: libc::c_int = 64;

/// A bound and listening QMP socket, and the guard that removes its file.
#[derive(Debug)]
pub struct QmpSocket {
    listener: UnixListener,
    guard: SocketFileGuard,
}

impl QmpSocket {
    /// Where the socket file is.
    pub fn path(&self) -> &Path {
        &self.guard.path
    }

    /// The non-blocking listener and the guard; dropping the guard removes the file.
    pub fn into_parts(self) -> (UnixListener, SocketFileGuard) {
        (self.listener, self.guard)
    }
}

/// Removes the socket file on drop, if it is still the one this process bound.
///
/// The identity check keeps a late drop from deleting the socket of a newer ferry that
/// replaced ours as stale. The inode alone is not enough (a freed inode number is reused at
/// once); with the change time it is, unless both sockets were made in the same clock tick.
#[derive(Debug)]
pub struct SocketFileGuard {
    path: PathBuf,
    identity: FileIdentity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileIdentity {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if FileIdentity::of(&meta) == self.identity => {
                if let Err(err) = fs::remove_file(&self.path) {
                    tracing::warn!(path = ?self.path, %err, "cannot remove the QMP socket");
                }
            }
            Ok(_) => tracing::debug!(path = ?self.path, "QMP socket was replaced; left alone"),
            Err(_) => {}
        }
    }
}

/// Binds the QMP socket at `path` with mode 0600, replacing a stale socket left there by a
/// process that died. Refuses a path that holds anything but a socket, or a socket that a
/// live process still listens on. Needs no tokio runtime; [`serve`](super::serve) registers
/// the listener with the runtime.
pub fn bind(path: impl AsRef<Path>) -> Result<QmpSocket, QmpError> {
    let path = path.as_ref();
    let address = socket_address(path)?;
    remove_stale(path)?;
    let listener = listen(path, &address).map_err(|source| QmpError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let meta = fs::symlink_metadata(path).map_err(|source| QmpError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // An absolute path keeps the guard right even if the working directory changes.
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let guard = SocketFileGuard {
        path: absolute,
        identity: FileIdentity::of(&meta),
    };
    tracing::info!(path = ?guard.path, "QMP socket listening");
    Ok(QmpSocket { listener, guard })
}

/// Clears `path` for binding: nothing there, or a socket nobody listens on any more.
fn remove_stale(path: &Path) -> Result<(), QmpError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(QmpError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(QmpError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(QmpError::InUse {
            path: path.to_owned(),
        }),
        // Refused: the file outlived its listener (a crash, a kill -9).
        Err(err) if err.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!(?path, "replacing a stale QMP socket");
            match fs::remove_file(path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => Err(QmpError::RemoveStale {
                    path: path.to_owned(),
                    source: err,
                }),
                _ => Ok(()),
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(QmpError::Inspect {
            path: path.to_owned(),
            source,
        }),
    }
}

/// `socket` + `bind` + `chmod 0600` + `listen`, in that order (see the module comment).
fn listen(path: &Path, address: &libc::sockaddr_un) -> io::Result<UnixListener> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let length = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `address` is a fully initialised sockaddr_un and `length` is its size.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (address as *const libc::sockaddr_un).cast(),
            length,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    let listening = fs::set_permissions(path, Permissions::from_mode(0o600)).and_then(|()| {
        // SAFETY: listen(2) on a bound socket this function owns; takes no pointers.
        if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    });
    if let Err(err) = listening {
        let _ = fs::remove_file(path);
        return Err(err);
    }
    Ok(UnixListener::from(fd))
}

/// The `sockaddr_un` for `path`, or why the kernel would refuse it.
fn socket_address(path: &Path) -> Result<libc::sockaddr_un, QmpError> {
    use std::os::unix::ffi::OsStrExt;

    // SAFETY: sockaddr_un is plain old data for which all-zero bytes are a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) {
        return Err(QmpError::PathHasNul {
            path: path.to_owned(),
        });
    }
    // One byte stays zero: the terminating NUL.
    let max = address.sun_path.len() - 1;
    if bytes.len() > max || bytes.is_empty() {
        return Err(QmpError::PathTooLong {
            path: path.to_owned(),
            len: bytes.len(),
            max,
        });
    }
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_with_mode_0600_and_removes_the_file_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let socket = bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&path).expect("listening");
        drop(socket);
        assert!(!path.exists());
    }

    #[test]
    fn replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        drop(UnixListener::bind(&path).unwrap());
        let socket = bind(&path).expect("stale socket replaced");
        let again = bind(&path).expect_err("live socket");
        assert!(matches!(again, QmpError::InUse { .. }), "{again}");
        drop(socket);

        fs::write(&path, b"precious").unwrap();
        let err = bind(&path).expect_err("regular file");
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn a_replaced_socket_is_not_removed_by_the_old_guard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let (listener, guard) = bind(&path).unwrap().into_parts();
        drop(listener);
        // Past the coarse clock's tick, so the change times differ (see `SocketFileGuard`).
        std::thread::sleep(std::time::Duration::from_millis(30));
        let newer = bind(&path).unwrap();
        drop(guard);
        assert!(path.exists(), "the newer socket survives the old guard");
        drop(newer);
        assert!(!path.exists());
    }

    #[test]
    fn unbindable_paths_say_why() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert!(matches!(bind(&long), Err(QmpError::PathTooLong { .. })));
        let missing = bind("/nonexistent-dir/qmp.sock").expect_err("no such directory");
        assert!(matches!(missing, QmpError::Bind { .. }), "{missing}");
    }
}
