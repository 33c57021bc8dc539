//! A CPU of its own for each vCPU thread while a switchover runs.
//!
//! The pause has every vCPU save its state on its own thread, and the destination restores
//! and resumes them the same way: they overlap only on different CPUs. Schedulers do not always
//! spread them. On the PVM host this was measured on, the two vCPU threads the owner woke for
//! the pause ran one after the other on one CPU (134 µs, then 100 µs) while the other CPU idled,
//! and the downtime was their sum. So while the switchover runs (usually a few milliseconds,
//! at most the commit's deadline) each vCPU thread is held to one CPU, a different one for
//! each as far as the CPUs it may use allow, and then given back every CPU it had.

use std::mem::MaybeUninit;

/// Threads held each to one CPU; dropping it gives each back the CPUs it was allowed before.
#[derive(Debug)]
pub struct Spread {
    held: Vec<(libc::pid_t, libc::cpu_set_t)>,
}

impl Spread {
    /// Holds each of `threads` to a CPU no earlier one took, among those it may use: the one
    /// it ran on last if that is free, so that a thread running now need not move. A thread
    /// allowed a single CPU, or none left free, is left as it is.
    pub fn threads(threads: &[libc::pid_t]) -> Self {
        let mut taken = Vec::new();
        let mut held = Vec::new();
        for &tid in threads.iter().filter(|&&tid| tid > 0) {
            let Some(allowed) = affinity(tid) else {
                continue;
            };
            let cpus = cpus_in(&allowed);
            if cpus.len() < 2 {
                continue;
            }
            let free = |cpu: &usize| !taken.contains(cpu);
            let last = last_cpu(tid).filter(|cpu| cpus.contains(cpu) && free(cpu));
            let Some(cpu) = last.or_else(|| cpus.iter().copied().find(free)) else {
                continue;
            };
            match set_affinity(tid, &cpu_set(&[cpu])) {
                Ok(()) => {
                    taken.push(cpu);
                    held.push((tid, allowed));
                }
                Err(error) => {
                    tracing::debug!(tid, cpu, %error, "cannot hold a vCPU thread to a CPU")
                }
            }
        }
        Self { held }
    }

    /// The CPU each held thread is held to, in the order given.
    #[cfg(test)]
    fn held_to(&self) -> Vec<Vec<usize>> {
        self.held
            .iter()
            .filter_map(|&(tid, _)| affinity(tid).map(|set| cpus_in(&set)))
            .collect()
    }
}

impl Drop for Spread {
    fn drop(&mut self) {
        for (tid, allowed) in &self.held {
            if let Err(error) = set_affinity(*tid, allowed) {
                // A thread that ended has no affinity left to give back.
                tracing::debug!(tid, %error, "cannot give a vCPU thread its CPUs back");
            }
        }
    }
}

fn affinity(tid: libc::pid_t) -> Option<libc::cpu_set_t> {
    let mut set = MaybeUninit::<libc::cpu_set_t>::zeroed();
    // SAFETY: the kernel writes at most the size given into the set, which is that large.
    let read = unsafe {
        libc::sched_getaffinity(
            tid,
            std::mem::size_of::<libc::cpu_set_t>(),
            set.as_mut_ptr(),
        )
    };
    if read != 0 {
        let error = std::io::Error::last_os_error();
        tracing::debug!(tid, %error, "cannot read a thread's CPUs");
        return None;
    }
    // SAFETY: zeroed is a valid cpu_set_t, and the call above succeeded.
    Some(unsafe { set.assume_init() })
}

fn set_affinity(tid: libc::pid_t, set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: the kernel only reads the set, of the size given.
    let done = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(set), set) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn cpus_in(set: &libc::cpu_set_t) -> Vec<usize> {
    // SAFETY: CPU_ISSET reads a bit of the set, and every index below CPU_SETSIZE is in it.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, set) })
        .collect()
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET writes one bit of the set. Every CPU given here is one the kernel
        // reported (below CPU_SETSIZE); a larger index would make it panic, not write elsewhere.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

/// The CPU a thread of this process ran on last: field 39 of its stat, counted from the
/// state that follows the command name (which may hold spaces and parentheses).
fn last_cpu(tid: libc::pid_t) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(39 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Runs `check` with the ids of `count` parked threads, and ends them after.
    fn with_threads(count: usize, check: impl FnOnce(&[libc::pid_t])) {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (end_tx, end_rx) = mpsc::channel::<()>();
        let end_rx = std::sync::Arc::new(std::sync::Mutex::new(end_rx));
        let threads: Vec<_> = (0..count)
            .map(|_| {
                let tid_tx = tid_tx.clone();
                let end_rx = end_rx.clone();
                std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tid_tx.send(unsafe { libc::gettid() }).unwrap();
                    let _ = end_rx.lock().unwrap().recv();
                })
            })
            .collect();
        let tids: Vec<_> = (0..count).map(|_| tid_rx.recv().unwrap()).collect();
        check(&tids);
        drop(end_tx);
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn each_thread_gets_a_cpu_of_its_own_and_then_its_cpus_back() {
        let Some(own) = affinity(0) else {
            panic!("cannot read this thread's CPUs");
        };
        let cpus = cpus_in(&own);
        with_threads(cpus.len() + 1, |tids| {
            let before: Vec<_> = tids
                .iter()
                .map(|&tid| affinity(tid).map(|s| cpus_in(&s)))
                .collect();
            let spread = Spread::threads(tids);
            let held = spread.held_to();
            if cpus.len() < 2 {
                assert!(held.is_empty(), "a thread with one CPU was moved");
            } else {
                // One thread per CPU; the one left over runs wherever it may.
                assert_eq!(held.len(), cpus.len());
                let mut each: Vec<usize> = held
                    .iter()
                    .map(|h| {
                        assert_eq!(h.len(), 1, "held to {h:?}");
                        h[0]
                    })
                    .collect();
                each.sort_unstable();
                assert_eq!(each, cpus);
            }
            drop(spread);
            let after: Vec<_> = tids
                .iter()
                .map(|&tid| affinity(tid).map(|s| cpus_in(&s)))
                .collect();
            assert_eq!(after, before);
        });
    }

    #[test]
    fn a_thread_held_to_one_cpu_stays_there() {
        let Some(own) = affinity(0) else {
            panic!("cannot read this thread's CPUs");
        };
        let last = *cpus_in(&own).last().unwrap();
        with_threads(1, |tids| {
            set_affinity(tids[0], &cpu_set(&[last])).unwrap();
            let spread = Spread::threads(tids);
            assert!(spread.held_to().is_empty());
            drop(spread);
            assert_eq!(affinity(tids[0]).map(|s| cpus_in(&s)), Some(vec![last]));
        });
    }

    #[test]
    fn the_last_cpu_is_read_past_a_name_with_spaces() {
        let cpu = std::thread::Builder::new()
            .name("vcpu (0) 1 2 3".into())
            .spawn(|| {
                // SAFETY: gettid has no preconditions.
                last_cpu(unsafe { libc::gettid() })
            })
            .unwrap()
            .join()
            .unwrap()
            .expect("the thread's last CPU");
        let allowed = cpus_in(&affinity(0).unwrap());
        assert!(allowed.contains(&cpu), "cpu {cpu} not in {allowed:?}");
    }
}
