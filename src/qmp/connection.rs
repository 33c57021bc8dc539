//! One client's byte stream: the read buffer and framer on one side, buffered writes of
//! one JSON message per line on the other.

use std::io;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

use super::frame::{Frame, Framer};

/// How much one read takes from the socket.
const READ_CHUNK: usize = 8 * 1024;

/// A QMP client's stream, generic so that tests can use an in-memory duplex.
#[derive(Debug)]
pub struct Connection<S> {
    stream: BufWriter<S>,
    framer: Framer,
    /// The peer closed its write side; what is still buffered is served first.
    eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream: BufWriter::new(stream),
            framer: Framer::default(),
            eof: false,
        }
    }

    /// The next frame, or `None` at the end of input. Frames already buffered come before the
    /// end, so a client that writes its requests and half-closes still gets every reply.
    ///
    /// Cancel safe (it is used in `select!`): bytes are only moved into the framer after a
    /// read completed, and `read` itself loses nothing when dropped.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.framer.next_frame() {
                return Ok(Some(frame));
            }
            if self.eof {
                return Ok(self.framer.finish());
            }
            let mut chunk = [0u8; READ_CHUNK];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                self.eof = true;
            } else {
                self.framer.push(&chunk[..read]);
            }
        }
    }

    /// Writes `message` as one line ending in `\r\n`, as QEMU does, and flushes it.
    pub async fn write_message(&mut self, message: &impl Serialize) -> io::Result<()> {
        let mut line = serde_json::to_vec(message)?;
        line.extend_from_slice(b"\r\n");
        self.stream.write_all(&line).await?;
        self.stream.flush().await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn frames_buffered_before_eof_are_served_then_the_remainder() {
        let (client, server) = tokio::io::duplex(1024);
        let mut connection = Connection::new(server);
        let (mut read_half, mut write_half) = tokio::io::split(client);
        write_half
            .write_all(b"{\"execute\":\"stop\"}\n{\"execute\":\"co")
            .await
            .unwrap();
        write_half.shutdown().await.unwrap();
        let first = connection.read_frame().await.unwrap();
        assert_eq!(first, Some(Frame::Value(br#"{"execute":"stop"}"#.to_vec())));
        let rest = connection.read_frame().await.unwrap();
        assert_eq!(rest, Some(Frame::Value(br#"{"execute":"co"#.to_vec())));
        assert_eq!(connection.read_frame().await.unwrap(), None);

        connection
            .write_message(&json!({"return": {}}))
            .await
            .unwrap();
        let mut line = [0u8; 15];
        read_half.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"{\"return\":{}}\r\n");
    }
}
