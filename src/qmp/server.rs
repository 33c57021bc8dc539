//! The accept loop and the sessions, after mini-redis's `server.rs`.
//!
//! One task per client, tracked by a [`TaskTracker`] so that [`serve`] returns only once every
//! session has closed (or the grace period ran out). A session owns its [`Connection`] and its
//! event subscription and shares nothing else, so a client that stalls, disconnects mid-request
//! or sends garbage costs only its own task.

use std::io;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::command::{self, Command, CommandError};
use super::connection::Connection;
use super::message::{Greeting, Response};
use super::QmpError;
use crate::runtime::control::{Event, VmHandle};

/// After shutdown, how long a session may take to finish its command and write out the
/// events already queued (such as `SHUTDOWN` after `quit`) before it is dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A pause after a failed `accept` (say `EMFILE`), so that the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves QMP on `listener` (from [`QmpSocket::into_parts`]) until `shutdown` is cancelled,
/// then waits, at most `2 * SHUTDOWN_GRACE`, for the sessions to close. The socket file is
/// the caller's [`SocketFileGuard`](super::SocketFileGuard) to remove, after this returns.
///
/// [`QmpSocket::into_parts`]: super::QmpSocket::into_parts
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    vm: VmHandle,
    shutdown: CancellationToken,
) -> Result<(), QmpError> {
    // `bind` made it non-blocking, as tokio requires; setting it again costs nothing and
    // protects a listener made elsewhere.
    listener.set_nonblocking(true).map_err(QmpError::Register)?;
    let listener = UnixListener::from_std(listener).map_err(QmpError::Register)?;
    let tracker = TaskTracker::new();
    let mut sessions = 0u64;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                sessions += 1;
                let session = Session {
                    id: sessions,
                    vm: vm.clone(),
                    shutdown: shutdown.clone(),
                };
                tracker.spawn(session.run(stream));
            }
            Err(err) => {
                warn!(%err, "QMP accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    // Stop accepting first: a client arriving now is refused instead of greeted and dropped.
    drop(listener);
    tracker.close();
    // Sessions bound themselves by SHUTDOWN_GRACE; the margin covers the last writes.
    if tokio::time::timeout(SHUTDOWN_GRACE * 2, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = tracker.len(),
            "QMP sessions still open after the shutdown grace"
        );
    }
    info!(sessions, "QMP server stopped");
    Ok(())
}

/// One client's session.
struct Session {
    id: u64,
    vm: VmHandle,
    shutdown: CancellationToken,
}

impl Session {
    async fn run(self, stream: UnixStream) {
        let peer = stream.peer_cred().ok();
        info!(
            session = self.id,
            pid = peer.and_then(|cred| cred.pid()),
            uid = peer.map(|cred| cred.uid()),
            "QMP client connected"
        );
        let mut connection = Connection::new(stream);
        let grace_over = async {
            self.shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let ended = tokio::select! {
            ended = self.serve(&mut connection) => ended,
            () = grace_over => Ok(()),
        };
        match ended {
            Ok(()) => info!(session = self.id, "QMP client disconnected"),
            Err(err) => info!(session = self.id, %err, "QMP session ended"),
        }
    }

    /// Greets, then answers requests in order until the client leaves or shutdown.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        connection: &mut Connection<S>,
    ) -> io::Result<()> {
        connection.write_message(&Greeting::current()).await?;
        let mut events = Events {
            session: self.id,
            receiver: None,
        };
        loop {
            let frame = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return events.drain(connection).await,
                event = events.next() => {
                    connection.write_message(&event).await?;
                    continue;
                }
                frame = connection.read_frame() => match frame? {
                    Some(frame) => frame,
                    None => return Ok(()),
                },
            };
            // Events start with the first request, not at connect: QEMU sends none before
            // capabilities negotiation, and qemu.qmp fails its negotiation if an event comes
            // before the reply to `qmp_capabilities`. Subscribing before the command runs
            // means a `stop` sent as the first request still sees its STOP.
            events.subscribe(&self.vm);
            let (id, command) = command::decode(frame);
            let outcome = match command {
                Ok(command) => {
                    debug!(session = self.id, ?command, "QMP command");
                    self.apply(command, connection, &mut events).await?
                }
                Err(err) => Err(err),
            };
            if let Err(err) = &outcome {
                debug!(session = self.id, %err, "QMP request refused");
            }
            connection
                .write_message(&Response::new(id, outcome))
                .await?;
        }
    }

    /// Runs `command`, forwarding events while the VM owner works on it.
    async fn apply<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        command: Command,
        connection: &mut Connection<S>,
        events: &mut Events,
    ) -> io::Result<Result<Value, CommandError>> {
        let reaches_vm = matches!(command, Command::Vm(_));
        let outcome = command.apply(&self.vm);
        tokio::pin!(outcome);
        loop {
            tokio::select! {
                // The outcome first: a local command is ready at once, so its reply (say to
                // `qmp_capabilities`) always comes before any event.
                biased;
                outcome = &mut outcome => {
                    // The VM owner emits a command's events (STOP for `stop`) before it
                    // answers: send them first, as QEMU does.
                    if reaches_vm {
                        events.drain(connection).await?;
                    }
                    return Ok(outcome);
                }
                event = events.next() => connection.write_message(&event).await?,
            }
        }
    }
}

/// One session's view of the VM's events.
struct Events {
    session: u64,
    /// `None` until the first request, and after the VM dropped its sender.
    receiver: Option<Receiver<Event>>,
}

impl Events {
    fn subscribe(&mut self, vm: &VmHandle) {
        if self.receiver.is_none() {
            self.receiver = Some(vm.subscribe());
        }
    }

    /// The next event; never ready without a subscription. Cancel safe, as
    /// `broadcast::Receiver::recv` is.
    async fn next(&mut self) -> Event {
        loop {
            let Some(receiver) = self.receiver.as_mut() else {
                return std::future::pending().await;
            };
            match receiver.recv().await {
                Ok(event) => return event,
                // The VM never waits for a slow client: this one lost some events, and
                // says so, but its session goes on.
                Err(RecvError::Lagged(missed)) => {
                    warn!(
                        session = self.session,
                        missed, "QMP client too slow; events dropped"
                    );
                }
                Err(RecvError::Closed) => self.receiver = None,
            }
        }
    }

    /// Writes out the events already queued, at shutdown.
    async fn drain<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        connection: &mut Connection<S>,
    ) -> io::Result<()> {
        let Some(receiver) = self.receiver.as_mut() else {
            return Ok(());
        };
        loop {
            match receiver.try_recv() {
                Ok(event) => connection.write_message(&event).await?,
                Err(TryRecvError::Lagged(missed)) => {
                    warn!(
                        session = self.session,
                        missed, "QMP client too slow; events dropped"
                    );
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => return Ok(()),
            }
        }
    }
}
