//! Connections arriving at a destination's listener. The `-incoming` port is open to whatever
//! reaches it: a port scan, a load balancer's health check, a client that connects and says
//! nothing. Each connection must introduce itself (the source with ferry's magic, a page
//! connection with its LANE as well), side by side with the others, within a deadline; one that
//! does not is dropped and the wait goes on, so that a stranger neither ends the destination
//! nor holds up the real source or its page connections.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

use super::transport::{BoxedStream, Listener};
use super::wire::{self, WireError};

/// How long a connection has to send its first bytes before it is taken for a stranger, when
/// the source is awaited.
const STRANGER_DEADLINE: Duration = Duration::from_secs(10);
/// How many connections may be introducing themselves at once; more wait in the listen
/// backlog until one of those is settled.
const MAX_INTRODUCING: usize = 32;

/// How a connection introduces itself: what is read off it first.
pub type Introduce<T> = for<'s> fn(&'s mut BoxedStream) -> BoxFuture<'s, Result<T, WireError>>;

/// A connection and what it said first; `None` if it said nothing within the deadline.
pub struct Introduced<T> {
    pub stream: BoxedStream,
    pub peer: String,
    pub said: Option<Result<T, WireError>>,
}

/// Connections accepted on a listener, each given a deadline to introduce itself.
pub struct Introductions<'l, T> {
    listener: &'l Listener,
    introduce: Introduce<T>,
    deadline: Duration,
    introducing: FuturesUnordered<BoxFuture<'static, Introduced<T>>>,
}

impl<'l, T: Send + 'static> Introductions<'l, T> {
    pub fn new(listener: &'l Listener, introduce: Introduce<T>, deadline: Duration) -> Self {
        Self {
            listener,
            introduce,
            deadline,
            introducing: FuturesUnordered::new(),
        }
    }

    /// The next connection that introduced itself or ran out of time; fails only if the
    /// listener does. Dropped meanwhile, it loses no connection that was accepted.
    pub async fn next(&mut self) -> std::io::Result<Introduced<T>> {
        let listener = self.listener;
        loop {
            tokio::select! {
                accepted = listener.accept(), if self.introducing.len() < MAX_INTRODUCING => {
                    let (mut stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) if gone_before_accepted(&error) => {
                            tracing::warn!(%error, "a connection failed before it was accepted");
                            continue;
                        }
                        Err(error) => return Err(error),
                    };
                    let (introduce, deadline) = (self.introduce, self.deadline);
                    self.introducing.push(Box::pin(async move {
                        let said = tokio::time::timeout(deadline, introduce(&mut stream)).await;
                        Introduced { stream, peer, said: said.ok() }
                    }));
                }
                Some(introduced) = self.introducing.next() => return Ok(introduced),
            }
        }
    }
}

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
    let mut introductions = Introductions::new(listener, read_header, STRANGER_DEADLINE);
    loop {
        let Introduced { stream, peer, said } = introductions.next().await?;
        match said {
            Some(Ok(())) => {
                return Ok(Arrived {
                    stream,
                    peer,
                    header: Ok(()),
                })
            }
            Some(Err(error @ WireError::Version(_))) => {
                return Ok(Arrived {
                    stream,
                    peer,
                    header: Err(error),
                })
            }
            Some(Err(error)) => {
                tracing::warn!(%peer, %error, "dropped a connection that is not a ferry source");
            }
            None => tracing::warn!(
                %peer,
                "dropped a connection that sent nothing within {} s",
                STRANGER_DEADLINE.as_secs()
            ),
        }
    }
}

fn read_header(stream: &mut BoxedStream) -> BoxFuture<'_, Result<(), WireError>> {
    Box::pin(wire::read_header(stream))
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
