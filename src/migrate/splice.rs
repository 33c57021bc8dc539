//! On the source: guest pages go to the socket by reference instead of by copy. vmsplice(2)
//! puts the pages themselves into a pipe and splice(2) hands them on to the socket, so the
//! only copy of a page is the destination's read out of it. A writev would copy every page
//! into the socket first: on a host where both ends share two cores, that copy was the
//! largest cost on the source's side.
//!
//! The socket holds the pages, not their contents at the time of sending: a page the guest
//! writes while it is in flight arrives with the newer data. That is harmless for the same
//! reason a writev racing the guest is: KVM logged the write, so the page goes again in a later
//! round, and in the last round the guest is paused.

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use super::ranges::Cursor;
use super::transport::BoxedStream;

/// The pipe's size; the kernel caps it at fs.pipe-max-size (1 MiB by default).
const PIPE_BYTES: libc::c_int = 1 << 20;

/// The pipe that pages pass through on their way to the socket.
pub struct PagePipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl PagePipe {
    pub fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ takes an int and changes only the pipe's capacity. A smaller
        // pipe than asked for (the kernel's cap) only means more system calls.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
        Ok(Self { read, write })
    }

    /// Sends `ranges` ((host address, length) of whole guest pages, which must stay mapped)
    /// through the pipe into `stream`.
    pub async fn send(
        &mut self,
        stream: &BoxedStream,
        ranges: &[(usize, usize)],
    ) -> io::Result<()> {
        let mut cursor = Cursor::new(ranges);
        let mut in_pipe = 0usize;
        while !cursor.is_done() || in_pipe > 0 {
            if !cursor.is_done() {
                let moved = self.fill(&cursor.iovecs())?;
                cursor.advance(moved);
                in_pipe += moved;
            }
            if in_pipe == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            poll_fn(|cx| stream.poll_write_ready(cx)).await?;
            match stream.try_splice_from(self.read.as_fd(), in_pipe) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(sent) => in_pipe -= sent,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// vmsplices as much of `iovecs` as the pipe takes; 0 when it is full.
    fn fill(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs describe mapped guest RAM (the caller's promise), which vmsplice
        // only reads, by taking references to its pages.
        let moved = unsafe {
            libc::vmsplice(
                self.write.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len(),
                libc::SPLICE_F_NONBLOCK,
            )
        };
        match usize::try_from(moved) {
            Ok(moved) => Ok(moved),
            Err(_) => match io::Error::last_os_error() {
                error if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
                error => Err(error),
            },
        }
    }
}
