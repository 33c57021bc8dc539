//! A destination's wait for its source. The `-incoming` port is open to whatever reaches it: a
//! port scan, a load balancer's health check, a client that connects and says nothing. Only a
//! connection that starts with ferry's magic is the source; any other is dropped and the wait
//! goes on, so that a stranger neither ends the destination nor holds up the real source.

use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use super::transport::{BoxedStream, Listener};
use super::wire::{self, WireError};

/// How long a connection has to send its first bytes before it is taken for a stranger. Side
/// by side, so that one that says nothing holds up no other.
pub const INTRODUCE_DEADLINE: Duration = Duration::from_secs(10);
/// How many connections may be introducing themselves at once; more wait in the listen
/// backlog until one of those is settled.
const MAX_INTRODUCING: usize = 32;

/// A ferry source that connected.
pub struct Arrived {
    pub stream: BoxedStream,
    pub peer: String,
    /// `Err` for a source whose stream this ferry cannot read (another version): it is the
    /// source, and the migration fails with that reason.
    pub header: Result<(), WireError>,
}

/// Accepts connections until one starts with ferry's magic; fails only if accepting does.
pub async fn first_source(listener: &Listener) -> std::io::Result<Arrived> {
    let mut introducing = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = listener.accept(), if introducing.len() < MAX_INTRODUCING => {
                let (mut stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) if gone_before_accepted(&error) => {
                        tracing::warn!(%error, "a connection failed before it was accepted");
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                introducing.push(async move {
                    let header =
                        tokio::time::timeout(INTRODUCE_DEADLINE, wire::read_header(&mut stream))
                            .await;
                    (stream, peer, header)
                });
            }
            Some((stream, peer, header)) = introducing.next() => match header {
                Ok(Ok(())) => return Ok(Arrived { stream, peer, header: Ok(()) }),
                Ok(Err(error @ WireError::Version(_))) => {
                    return Ok(Arrived { stream, peer, header: Err(error) })
                }
                Ok(Err(error)) => {
                    tracing::warn!(%peer, %error, "dropped a connection that is not a ferry source");
                }
                Err(_) => tracing::warn!(
                    %peer,
                    "dropped a connection that sent nothing within {} s",
                    INTRODUCE_DEADLINE.as_secs()
                ),
            },
        }
    }
}

/// Errors of accept(2) that belong to the connection being accepted, not to the listener:
/// Linux passes on the new connection's pending network error, and accept(2) says to retry.
fn gone_before_accepted(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    use super::*;
    use crate::migrate::uri::MigrationUri;

    async fn listener(dir: &std::path::Path) -> (Listener, std::path::PathBuf) {
        let path = dir.join("incoming.sock");
        let listener = Listener::bind(&MigrationUri::Unix(path.clone()))
            .await
            .unwrap();
        (listener, path)
    }

    #[tokio::test]
    async fn strangers_are_dropped_and_the_source_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = listener(dir.path()).await;
        // One that hangs up at once, one that says something else, one that stays silent.
        drop(UnixStream::connect(&path).await.unwrap());
        let mut http = UnixStream::connect(&path).await.unwrap();
        http.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _silent = UnixStream::connect(&path).await.unwrap();
        let mut source = UnixStream::connect(&path).await.unwrap();
        source.write_all(&wire::header()).await.unwrap();
        let arrived = tokio::time::timeout(Duration::from_secs(5), first_source(&listener))
            .await
            .expect("the source is taken while a stranger stays silent")
            .unwrap();
        assert!(arrived.header.is_ok());
    }

    #[tokio::test]
    async fn a_source_of_another_version_is_the_source_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = listener(dir.path()).await;
        let mut header = wire::header();
        header[8..12].copy_from_slice(&(wire::VERSION + 1).to_le_bytes());
        let mut source = UnixStream::connect(&path).await.unwrap();
        source.write_all(&header).await.unwrap();
        let arrived = tokio::time::timeout(Duration::from_secs(5), first_source(&listener))
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(arrived.header, Err(WireError::Version(v)) if v == wire::VERSION + 1),
            "{:?}",
            arrived.header
        );
    }
}
