//! Threads that must not take a core from the guest or the switchover: a VMM left with no
//! guest to run, and work that only uses what is idle.

/// The nice value a VMM with no guest left takes: the lowest priority that still runs.
const GIVEN_WAY_NICE: libc::c_int = 19;

/// Lowers every thread of this process to the lowest CPU priority. A destination whose
/// incoming migration failed frees its guest RAM, gigabytes of it, while on the same host the
/// source has just taken its guest back: the source's vCPUs must not wait for that teardown.
pub fn give_way() {
    match std::fs::read_dir("/proc/self/task") {
        Ok(tasks) => lower(
            tasks
                .flatten()
                .filter_map(|task| task.file_name().to_str()?.parse().ok()),
        ),
        Err(error) => {
            tracing::debug!(%error, "cannot list this process's threads to lower their priority")
        }
    }
}

fn lower(threads: impl IntoIterator<Item = libc::id_t>) {
    for tid in threads {
        // SAFETY: setpriority takes plain integers; on Linux PRIO_PROCESS with a thread id
        // sets that thread's nice value, which any thread may raise.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, GIVEN_WAY_NICE) } != 0 {
            let error = std::io::Error::last_os_error();
            tracing::debug!(tid, %error, "cannot lower a thread's priority");
        }
    }
}

/// Runs thread `tid` of this process only on a core nothing else wants (`SCHED_IDLE`): any
/// other thread that wakes on its core takes it at once. On a kernel without preemption, a
/// thread of normal priority inside a long system call keeps a woken one waiting for the next
/// tick (4 ms here). The caller makes sure `tid` is still the thread it means.
pub fn only_when_idle(tid: libc::pid_t) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; on Linux the id names one thread.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::debug!(tid, %error, "cannot give a thread the idle scheduling policy");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_runs_only_when_idle_has_the_idle_policy() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (idle_tx, idle_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = idle_rx.recv();
            // SAFETY: pid 0 is the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        });
        only_when_idle(tid_rx.recv().unwrap());
        idle_tx.send(()).unwrap();
        assert_eq!(thread.join().unwrap(), libc::SCHED_IDLE);
    }

    #[test]
    fn a_thread_given_way_runs_at_the_lowest_priority() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (lowered_tx, lowered_rx) = std::sync::mpsc::channel::<()>();
        // Another thread than the test's, so that the rest of the tests keep their priority.
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = lowered_rx.recv();
            // SAFETY: getpriority takes plain integers; 0 is the calling thread.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        });
        let tid = tid_rx.recv().unwrap();
        lower([tid as libc::id_t]);
        lowered_tx.send(()).unwrap();
        assert_eq!(thread.join().unwrap(), GIVEN_WAY_NICE);
    }
}
