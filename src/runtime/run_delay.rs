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

/// The open schedstat (and, for another thread, stat) file of one thread, read again on each
/// call.
#[derive(Debug)]
pub struct RunDelay {
    schedstat: File,
    stat: Option<File>,
}

impl RunDelay {
    /// The thread `tid` of this process, as another thread sees it.
    pub fn of_thread(tid: i32) -> Option<Self> {
        let task = format!("/proc/self/task/{tid}");
        Some(Self {
            schedstat: open(&format!("{task}/schedstat"))?,
            stat: Some(open(&format!("{task}/stat"))?),
        })
    }

    /// The calling thread.
    pub fn own() -> Option<Self> {
        Some(Self {
            schedstat: open("/proc/thread-self/schedstat")?,
            stat: None,
        })
    }

    /// The thread's run-queue delay so far (the kernel adds a wait when the thread gets its
    /// core back, not while it waits).
    pub fn read(&self) -> Option<Duration> {
        let mut text = [0u8; 96];
        let len = self.schedstat.read_at(&mut text, 0).ok()?;
        parse_delay(&text[..len])
    }

    /// The delay so far if the thread is running or waiting for a core now (state `R`), `None`
    /// if it sleeps: a vCPU halted in the kernel left its guest idle, not preempted (and the
    /// kernel may count part of such a sleep as run-queue delay when the thread wakes).
    pub fn read_if_runnable(&self) -> Option<Duration> {
        let mut text = [0u8; 512];
        let len = self.stat.as_ref()?.read_at(&mut text, 0).ok()?;
        (parse_state(&text[..len])? == 'R').then(|| self.read())?
    }
}

fn open(path: &str) -> Option<File> {
    match File::open(path) {
        Ok(file) => Some(file),
        Err(error) => {
            // Kernels without CONFIG_SCHED_INFO: the downtime then starts at the pause.
            tracing::debug!(path, %error, "no run-queue delay for this thread");
            None
        }
    }
}

fn parse_delay(text: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(text).ok()?;
    let waited_ns = text.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(waited_ns))
}

/// The state letter of a `stat` line: `TID (COMM) S ...`, where COMM may hold spaces and
/// parentheses.
fn parse_state(text: &[u8]) -> Option<char> {
    let text = std::str::from_utf8(text).ok()?;
    let after_comm = &text[text.rfind(')')? + 1..];
    after_comm.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_field_is_the_wait() {
        assert_eq!(
            parse_delay(b"753351929 317490280 87\n"),
            Some(Duration::from_nanos(317_490_280))
        );
        assert_eq!(parse_delay(b"753351929\n"), None);
        assert_eq!(parse_delay(b"x y z\n"), None);
    }

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(parse_state(b"4242 (vcpu 0) R 1 2 3"), Some('R'));
        assert_eq!(parse_state(b"4242 (a) b) S 1 2 3"), Some('S'));
        assert_eq!(parse_state(b"4242 vcpu"), None);
    }

    #[test]
    fn a_thread_reads_its_own_delay_and_another_reads_it_too() {
        let own = RunDelay::own().expect("schedstat of this thread");
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let other = RunDelay::of_thread(tid).expect("schedstat by thread id");
        let first = own.read().expect("a readable delay");
        // The same counter, and it never goes back; a thread reading its own state runs.
        assert!(other.read_if_runnable().expect("a running thread") >= first);
        assert!(own.read().expect("a readable delay") >= first);
    }

    #[test]
    fn a_sleeping_thread_has_no_delay_to_count() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let other = RunDelay::of_thread(tid_rx.recv().unwrap()).expect("schedstat by thread id");
        // Blocked in recv: state S, once it got there.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while other.read_if_runnable().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread never slept"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(other.read().is_some());
        done_tx.send(()).unwrap();
        sleeper.join().unwrap();
    }
}
