//! Byte streams between the two ferry processes: TCP (IPv4, IPv6, host names) or a UNIX socket.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::uri::MigrationUri;

/// A connected migration stream of either kind. Besides the byte stream, it reads straight
/// into many buffers at once (tokio's `AsyncRead` has no vectored read, its concrete sockets
/// do): the destination receives guest pages into guest RAM with one readv per frame.
pub trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// One readv into `buffers` if data is waiting; `WouldBlock` (and readiness cleared)
    /// otherwise.
    fn try_read_vectored(&self, buffers: &mut [IoSliceMut<'_>]) -> io::Result<usize>;

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The address a TCP stream is connected to; `None` for a UNIX socket.
    fn tcp_peer(&self) -> Option<SocketAddr> {
        None
    }

    /// Whether guest pages should go by reference ([`Stream::try_splice_from`]) rather than
    /// be copied by writev.
    fn splices_pages(&self) -> bool {
        false
    }

    /// One splice(2) of up to `len` bytes from `pipe` into the socket if it has room;
    /// `WouldBlock` (and readiness cleared) otherwise. Only streams that splice pages have it.
    fn try_splice_from(&self, _pipe: BorrowedFd<'_>, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// splice(2) from `pipe` to `socket`, neither side blocking.
fn splice(pipe: BorrowedFd<'_>, socket: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call; splice touches no memory of ours.
    let moved = unsafe {
        libc::splice(
            pipe.as_raw_fd(),
            std::ptr::null_mut(),
            socket.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(moved).map_err(|_| io::Error::last_os_error())
}

/// Over loopback TCP, splicing measured no faster than writev on this kind of host (the pages
/// go as skbs of at most 17 fragments), so TCP keeps the copy.
impl Stream for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }

    fn try_read_vectored(&self, buffers: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        TcpStream::try_read_vectored(self, buffers)
    }

    fn tcp_peer(&self) -> Option<SocketAddr> {
        self.peer_addr().ok()
    }
}

impl Stream for UnixStream {
    fn splices_pages(&self) -> bool {
        true
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_write_ready(self, cx)
    }

    fn try_splice_from(&self, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, || splice(pipe, self, len))
    }

    fn try_read_vectored(&self, buffers: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        UnixStream::try_read_vectored(self, buffers)
    }
}

pub type BoxedStream = Box<dyn Stream>;

/// Connects to a destination.
pub async fn connect(uri: &MigrationUri) -> io::Result<BoxedStream> {
    match uri {
        MigrationUri::Tcp { host, port } => Ok(tcp_stream(
            TcpStream::connect((host.as_str(), *port)).await?,
        )),
        MigrationUri::Unix(path) => {
            let stream = UnixStream::connect(path).await?;
            deepen_send_buffer(&stream);
            Ok(Box::new(stream))
        }
    }
}

/// Connects to the address a TCP connection already reached: a host name may resolve to
/// several, and each connect may pick another.
pub async fn connect_tcp(peer: SocketAddr) -> io::Result<BoxedStream> {
    Ok(tcp_stream(TcpStream::connect(peer).await?))
}

fn tcp_stream(stream: TcpStream) -> BoxedStream {
    tune_tcp(&stream);
    Box::new(stream)
}

/// How long the peer may leave what was sent unacknowledged, or a silent connection unanswered,
/// before the connection fails.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may be silent before TCP asks whether the peer is still there, and
/// then how often (until [`TCP_USER_TIMEOUT`], which decides when to give up).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Control messages are small and latency-bound (the commit handshake is downtime), so they go
/// out at once. A peer that is gone without a word (its host died, the network dropped it) must
/// not hold a migration up for the many minutes TCP takes by default: the source would stay
/// `active` with its writes stuck, the destination would wait for a stream that never comes.
/// A connection without these options still migrates: a refusal is logged, not fatal.
fn tune_tcp(stream: &TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    for (option, set) in [
        ("TCP_NODELAY", stream.set_nodelay(true)),
        (
            "TCP_USER_TIMEOUT",
            socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT)),
        ),
        ("keepalive", socket.set_tcp_keepalive(&keepalive)),
    ] {
        if let Err(error) = set {
            tracing::warn!(option, %error, "TCP option of a migration connection not set");
        }
    }
}

/// Lets a whole PAGES frame sit in the socket while the destination still copies the previous
/// one into guest memory, so that the two sides work at the same time instead of taking turns.
/// The kernel caps the size (net.core.wmem_max); a smaller buffer only costs speed.
const SEND_BUFFER_BYTES: usize = 4 << 20;

fn deepen_send_buffer(socket: &impl std::os::fd::AsFd) {
    if let Err(error) = socket2::SockRef::from(socket).set_send_buffer_size(SEND_BUFFER_BYTES) {
        tracing::debug!(%error, "socket send buffer left as it is");
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

    /// Takes the next connection: the source's control connection, then its page connections.
    pub async fn accept(&self) -> io::Result<(BoxedStream, String)> {
        match self {
            Self::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((tcp_stream(stream), peer.to_string()))
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
