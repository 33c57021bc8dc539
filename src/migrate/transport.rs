//! Byte streams between the two ferry processes: TCP (IPv4, IPv6, host names) or a UNIX socket.

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::uri::MigrationUri;

/// A connected migration stream of either kind.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

pub type BoxedStream = Box<dyn Stream>;

/// Connects to a destination.
pub async fn connect(uri: &MigrationUri) -> io::Result<BoxedStream> {
    match uri {
        MigrationUri::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            // Control messages are small and latency-bound (the commit handshake is downtime).
            stream.set_nodelay(true)?;
            Ok(Box::new(stream))
        }
        MigrationUri::Unix(path) => {
            let stream = UnixStream::connect(path).await?;
            deepen_send_buffer(&stream);
            Ok(Box::new(stream))
        }
    }
}

/// Lets a whole PAGES frame sit in the socket while the destination still copies the previous
/// one into guest memory, so that the two sides work at the same time instead of taking turns.
/// The kernel caps the size (net.core.wmem_max); a smaller buffer only costs speed.
const SEND_BUFFER_BYTES: libc::c_int = 4 << 20;

fn deepen_send_buffer(socket: &impl std::os::fd::AsRawFd) {
    let size = SEND_BUFFER_BYTES;
    // SAFETY: the option value is a c_int that lives across the call, and its size is passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "socket send buffer left as it is");
    }
}

/// A destination waiting for its source.
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl Listener {
    /// Listens at `uri`; a stale UNIX socket file is replaced, any other file is left alone.
    pub async fn bind(uri: &MigrationUri) -> io::Result<Self> {
        match uri {
            MigrationUri::Tcp { host, port } => {
                Ok(Self::Tcp(TcpListener::bind((host.as_str(), *port)).await?))
            }
            MigrationUri::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(metadata) = std::fs::symlink_metadata(path) {
                    if metadata.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                let listener = UnixListener::bind(path)?;
                Ok(Self::Unix {
                    listener,
                    path: path.clone(),
                })
            }
        }
    }

    /// Takes the one source this destination serves.
    pub async fn accept(&self) -> io::Result<(BoxedStream, String)> {
        match self {
            Self::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok((Box::new(stream), peer.to_string()))
            }
            Self::Unix { listener, path } => {
                let (stream, _) = listener.accept().await?;
                Ok((Box::new(stream), path.display().to_string()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}
