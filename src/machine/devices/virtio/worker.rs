//! The I/O thread of one virtio device: it waits on the queues' notifiers (ioeventfds) and
//! handles requests, so the vCPU that notified never waits for the disk.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::pci::{VirtioBackend, VirtioPci};
use crate::machine::devices::lock;

/// A running I/O thread; dropping it stops and joins the thread.
pub struct IoThread {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    pub fn spawn<B: VirtioBackend + 'static>(
        name: String,
        device: Arc<Mutex<VirtioPci<B>>>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let notifiers = lock(&device).notifiers()?;
        let thread_wake = wake.try_clone()?;
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&device, &notifiers, &thread_wake, &thread_stop))?;
        Ok(Self {
            stop,
            wake,
            handle: Some(handle),
        })
    }

    /// Has the thread look at every queue, as after a drain or a restore, when notifications
    /// may have been left unanswered.
    pub fn kick(&self) {
        let _ = self.wake.write(1);
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.kick();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn run<B: VirtioBackend>(
    device: &Mutex<VirtioPci<B>>,
    notifiers: &[EventFd],
    wake: &EventFd,
    stop: &AtomicBool,
) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(wake)
        .chain(notifiers)
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of pollfd of the given length for the whole call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(%error, "I/O thread cannot wait for notifications; it stops");
            return;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        let everything = fds[0].revents != 0;
        if everything {
            let _ = wake.read();
        }
        for (index, pollfd) in fds[1..].iter().enumerate() {
            if everything || pollfd.revents != 0 {
                // Reading resets the counter: the queue is looked at in full below.
                let _ = notifiers[index].read();
                lock(device).process(index);
            }
        }
    }
}
