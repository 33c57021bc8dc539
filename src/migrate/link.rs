//! The source's end of the connection: it knows whether a frame was cut short, so that a
//! cancelled source can still tell the destination why it hangs up.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::ranges::{push_page, MAX_IOVECS};
use super::splice::PagePipe;
use super::transport::BoxedStream;
use super::wire::{self, Message, WireError};
use crate::machine::memory::PAGE_SIZE;

/// How long the source waits for any of the destination's answers (to the configuration, a
/// SYNC, the state).
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(60);
/// How long a source that gives up tries to tell the destination before hanging up.
const NOTICE_DEADLINE: Duration = Duration::from_millis(50);
/// How long a source whose write failed waits for the destination's reason.
const REASON_DEADLINE: Duration = Duration::from_secs(1);
/// How long one frame may take to write. A destination that does not take a whole frame in this
/// time (its process frozen or stuck in the kernel: over a UNIX socket nothing else would
/// notice) is given up on; a 4 MiB frame needs about 3 s on a 10 Mbit/s link, and a link under
/// 0.6 Mbit/s could not carry one in time. Over TCP, the connection's own user timeout (shorter)
/// tells of a peer that takes nothing at all first.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(60);

/// What the destination answered, when it is not what the source wanted.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("{0}")]
    Wire(#[from] WireError),
    /// The destination sent ERROR with this reason.
    #[error("{0}")]
    Refused(String),
    #[error("the destination did not answer within {} s", ANSWER_DEADLINE.as_secs())]
    Timeout,
}

/// The connection, unsplit: the source never reads and writes at the same time, and sending
/// pages by reference needs the socket itself.
pub struct Link {
    stream: BoxedStream,
    /// The way guest pages go to the socket without a copy; `None` for TCP (see
    /// `splices_pages`) or where the host gives no pipe, and pages are copied with writev.
    pipe: Option<PagePipe>,
    /// Set while a frame is being written; still set if that write was abandoned midway.
    torn: bool,
}

impl Link {
    pub fn new(stream: BoxedStream) -> Self {
        let pipe = stream
            .splices_pages()
            .then(|| {
                PagePipe::new()
                    .map_err(|e| tracing::debug!(error = %e, "no pipe; guest pages are copied"))
                    .ok()
            })
            .flatten();
        Self {
            stream,
            pipe,
            torn: false,
        }
    }

    /// The address of the peer of a TCP link; `None` over a UNIX socket.
    pub fn tcp_peer(&self) -> Option<SocketAddr> {
        self.stream.tcp_peer()
    }

    /// Writes bytes that form whole frames.
    pub async fn write_frames(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let stream = &mut self.stream;
        whole_frame(&mut self.torn, async { Ok(stream.write_all(bytes).await?) }).await
    }

    /// Writes a frame made of `head` and the guest pages at host addresses `pages`, which must
    /// be whole pages of mapped guest RAM that stay mapped until this returns.
    pub async fn write_pages_frame(
        &mut self,
        head: &[u8],
        pages: &[usize],
    ) -> Result<(), WireError> {
        let page_size = PAGE_SIZE as usize;
        let Some(pipe) = self.pipe.as_mut() else {
            let parts: Vec<&[u8]> = std::iter::once(head)
                .chain(pages.iter().map(|&host| {
                    // SAFETY: a whole page of mapped guest RAM (our caller's promise).
                    unsafe { std::slice::from_raw_parts(host as *const u8, page_size) }
                }))
                .collect();
            return self.write_frame_vectored(&parts).await;
        };
        let mut ranges = Vec::with_capacity(pages.len());
        for &host in pages {
            push_page(&mut ranges, host);
        }
        let stream = &mut self.stream;
        whole_frame(&mut self.torn, async {
            stream.write_all(head).await?;
            Ok(pipe.send(stream, &ranges).await?)
        })
        .await
    }

    /// Writes a frame given as many buffers (guest pages, say) with as few system calls as the
    /// kernel allows, without copying them together first.
    async fn write_frame_vectored(&mut self, parts: &[&[u8]]) -> Result<(), WireError> {
        let stream = &mut self.stream;
        whole_frame(&mut self.torn, async {
            let mut slices: Vec<IoSlice<'_>> =
                parts.iter().map(|part| IoSlice::new(part)).collect();
            let mut pending = &mut slices[..];
            while !pending.is_empty() {
                let batch = pending.len().min(MAX_IOVECS);
                let written = stream.write_vectored(&pending[..batch]).await?;
                if written == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                }
                IoSlice::advance_slices(&mut pending, written);
            }
            Ok(())
        })
        .await
    }

    pub async fn send(&mut self, message: &Message) -> Result<(), WireError> {
        let frame = wire::encode_message(message)?;
        self.write_frames(&frame).await
    }

    /// Waits for the destination's next message; its ERROR becomes [`AnswerError::Refused`].
    pub async fn answer(&mut self) -> Result<Message, AnswerError> {
        match tokio::time::timeout(ANSWER_DEADLINE, wire::read_message(&mut self.stream)).await {
            Ok(Ok(Message::Error(reason))) => Err(AnswerError::Refused(reason)),
            Ok(result) => Ok(result?),
            Err(_) => Err(AnswerError::Timeout),
        }
    }

    /// After a failed write: the reason the destination gave before it hung up, if any.
    pub async fn destination_reason(&mut self) -> Option<String> {
        let read = async {
            loop {
                match wire::read_message(&mut self.stream).await {
                    Ok(Message::Error(reason)) => return Some(reason),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(REASON_DEADLINE, read)
            .await
            .ok()
            .flatten()
    }

    /// Tells the destination the source gives up (CANCEL or ERROR), unless a cut-short frame
    /// makes the stream unreadable anyway; then hangs up.
    pub async fn hang_up(mut self, notice: Message) {
        if !self.torn {
            let _ = tokio::time::timeout(NOTICE_DEADLINE, self.send(&notice)).await;
        }
        let _ = tokio::time::timeout(NOTICE_DEADLINE, self.stream.shutdown()).await;
    }

    /// Closes the connection after the last message.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(NOTICE_DEADLINE, self.stream.shutdown()).await;
    }
}

/// Runs one frame's write, failing it if it takes longer than [`WRITE_DEADLINE`]. `torn` stays
/// set unless the whole frame went out: after a failed or abandoned write the peer would read
/// the next frame from the middle of this one.
async fn whole_frame(
    torn: &mut bool,
    write: impl std::future::Future<Output = Result<(), WireError>>,
) -> Result<(), WireError> {
    *torn = true;
    tokio::time::timeout(WRITE_DEADLINE, write)
        .await
        .unwrap_or(Err(WireError::Stalled(WRITE_DEADLINE)))?;
    *torn = false;
    Ok(())
}
