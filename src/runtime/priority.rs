//! A VMM left with no guest to run gives way to the rest of the host.

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

#[cfg(test)]
mod tests {
    use super::*;

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
