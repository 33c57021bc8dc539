//! The I/O thread of one virtio device: it waits on the queues' notifiers (ioeventfds) and
//! handles requests, so the vCPU that notified never waits for the disk, and it carries out
//! the resets the driver asks for, which flush.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::pci::{VirtioBackend, VirtioDevice};
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
        device: VirtioDevice<B>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let (notifiers, reset) = {
            let transport = lock(device.transport());
            (transport.notifiers()?, transport.reset_event()?)
        };
        let thread_wake = wake.try_clone()?;
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&device, &notifiers, &reset, &thread_wake, &thread_stop))?;
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

/// Where the queues' notifiers start among the polled descriptors.
const FIRST_QUEUE: usize = 2;

fn run<B: VirtioBackend>(
    device: &VirtioDevice<B>,
    notifiers: &[EventFd],
    reset: &EventFd,
    wake: &EventFd,
    stop: &AtomicBool,
) {
    let mut fds: Vec<libc::pollfd> = [wake, reset]
        .into_iter()
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
        // Before the queues: requests after a reset wait for the driver to set it up again.
        if fds[1].revents != 0 {
            let _ = reset.read();
            device.complete_reset();
        }
        for (index, pollfd) in fds[FIRST_QUEUE..].iter().enumerate() {
            if everything || pollfd.revents != 0 {
                // Reading resets the counter: the queue is looked at in full below.
                let _ = notifiers[index].read();
                device.process(index);
            }
        }
    }
}
