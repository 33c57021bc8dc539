//! How long a thread has waited for a core: the kernel's run-queue delay of the thread (the
//! second field of `/proc/<pid>/task/<tid>/schedstat`, in ns).
//!
//! A pause stops the guest when its vCPU thread sees the kick, but on a busy host that thread
//! may already have been waiting for a core for milliseconds: the guest stopped then, not at
//! the pause. Reading a vCPU thread's delay before the kick and again as it handles the pause
//! says how long it had been off its core, so a migration's downtime can start where the
//! guest's blackout did.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// An open schedstat file of one thread, read again on each [`RunDelay::read`].
#[derive(Debug)]
pub struct RunDelay {
    file: File,
}

impl RunDelay {
    /// The thread `tid` of this process.
    pub fn of_thread(tid: i32) -> Option<Self> {
        Self::open(&format!("/proc/self/task/{tid}/schedstat"))
    }

    /// The calling thread.
    pub fn own() -> Option<Self> {
        Self::open("/proc/thread-self/schedstat")
    }

    fn open(path: &str) -> Option<Self> {
        match File::open(path) {
            Ok(file) => Some(Self { file }),
            Err(error) => {
                // Kernels without CONFIG_SCHED_INFO: the downtime then starts at the pause.
                tracing::debug!(path, %error, "no run-queue delay for this thread");
                None
            }
        }
    }

    /// The thread's run-queue delay so far (the kernel adds a wait when the thread gets its
    /// core back, not while it waits).
    pub fn read(&self) -> Option<Duration> {
        let mut text = [0u8; 96];
        let len = self.file.read_at(&mut text, 0).ok()?;
        parse(&text[..len])
    }
}

fn parse(text: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(text).ok()?;
    let waited_ns = text.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(waited_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_field_is_the_wait() {
        assert_eq!(
            parse(b"753351929 317490280 87\n"),
            Some(Duration::from_nanos(317_490_280))
        );
        assert_eq!(parse(b"753351929\n"), None);
        assert_eq!(parse(b"x y z\n"), None);
    }

    #[test]
    fn a_thread_reads_its_own_delay_and_another_reads_it_too() {
        let own = RunDelay::own().expect("schedstat of this thread");
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let other = RunDelay::of_thread(tid).expect("schedstat by thread id");
        let first = own.read().expect("a readable delay");
        // The same counter, and it never goes back.
        assert!(other.read().expect("a readable delay") >= first);
        assert!(own.read().expect("a readable delay") >= first);
    }
}
