//! A gate the vCPUs of a migration's destination pass into the guest: each vCPU arrives when
//! its own state is restored, the owner when the source has committed and everything else is
//! in place; the last to arrive opens it. A vCPU restored after the COMMIT came thus enters the
//! guest at once, on its own thread, instead of telling the owner and waiting to be told to
//! run: on the 2-CPU PVM host each of those hand-offs was seen to cost 40-70 µs of a downtime
//! of about 600 µs.
//!
//! Any party that cannot go on shuts the gate for all: no vCPU enters unless every vCPU and
//! the owner arrived ready.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Where a gate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for this many more parties.
    Waiting(usize),
    Open,
    Shut,
}

#[derive(Debug)]
pub struct StartGate {
    state: Mutex<State>,
    changed: Condvar,
}

impl StartGate {
    /// A gate that opens once `parties` have arrived ready.
    pub fn new(parties: usize) -> Self {
        let state = if parties == 0 {
            State::Open
        } else {
            State::Waiting(parties)
        };
        Self {
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    /// One party arrives, `ready` or not; returns whether the gate is open now. The last ready
    /// arrival opens it, and any arrival not ready shuts it.
    pub fn arrive(&self, ready: bool) -> bool {
        let mut state = self.lock();
        *state = match (*state, ready) {
            (State::Waiting(1), true) => State::Open,
            (State::Waiting(left), true) => State::Waiting(left - 1),
            (State::Waiting(_), false) => State::Shut,
            (settled, _) => settled,
        };
        let open = *state == State::Open;
        if !matches!(*state, State::Waiting(_)) {
            // One futex wake for every waiter: the vCPUs go in together.
            self.changed.notify_all();
        }
        open
    }

    /// Shuts the gate unless it opened already; returns whether it had opened.
    pub fn shut(&self) -> bool {
        self.arrive(false)
    }

    /// Waits until the gate opens or shuts, at most until `deadline`, past which it shuts;
    /// returns whether it opened.
    pub fn wait(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        loop {
            match *state {
                State::Open => return true,
                State::Shut => return false,
                State::Waiting(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *state = State::Shut;
                self.changed.notify_all();
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    pub fn is_open(&self) -> bool {
        *self.lock() == State::Open
    }

    /// The state is a plain value, valid whatever a panicking holder was doing.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A party's place at a gate. Dropped before it arrives (an error, a cancelled task, work a
/// vCPU thread refused or never ran), it shuts the gate: no way out of a switchover leaves
/// vCPUs waiting at it.
#[derive(Debug)]
pub struct Place {
    gate: Arc<StartGate>,
    arrived: bool,
}

impl Place {
    pub fn new(gate: Arc<StartGate>) -> Self {
        Self {
            gate,
            arrived: false,
        }
    }

    /// Arrives, `ready` or not; returns whether the gate is open now.
    pub fn arrive(mut self, ready: bool) -> bool {
        self.arrived = true;
        self.gate.arrive(ready)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.arrived {
            self.gate.shut();
        }
    }
}

/// How long a vCPU waits at the gate before it gives up and shuts it: longer than any owner
/// takes to arrive or shut it (the source's whole wait for the commit's answer), so that only an
/// owner that hangs runs into it.
pub const START_GATE_TIMEOUT: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_opens_on_the_last_ready_arrival() {
        let gate = StartGate::new(3);
        assert!(!gate.arrive(true));
        assert!(!gate.arrive(true));
        assert!(!gate.is_open());
        assert!(gate.arrive(true));
        assert!(gate.wait(Instant::now()));
    }

    #[test]
    fn one_party_not_ready_keeps_everyone_out() {
        let gate = StartGate::new(3);
        assert!(!gate.arrive(true));
        assert!(!gate.arrive(false));
        // The last one arrives ready, too late: the gate stays shut.
        assert!(!gate.arrive(true));
        assert!(!gate.wait(Instant::now() + Duration::from_secs(1)));
    }

    #[test]
    fn shutting_an_open_gate_leaves_it_open_and_says_so() {
        let gate = StartGate::new(1);
        assert!(gate.arrive(true));
        assert!(gate.shut());
        assert!(gate.is_open());
        let unopened = StartGate::new(2);
        assert!(!unopened.shut());
        assert!(!unopened.wait(Instant::now() + Duration::from_secs(1)));
    }

    #[test]
    fn waiters_on_other_threads_pass_when_the_last_party_arrives() {
        let gate = Arc::new(StartGate::new(3));
        let deadline = Instant::now() + Duration::from_secs(10);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || {
                    gate.arrive(true);
                    gate.wait(deadline)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        assert!(gate.arrive(true));
        for waiter in waiters {
            assert!(waiter.join().unwrap());
        }
    }

    #[test]
    fn a_party_gone_before_arriving_shuts_the_gate() {
        let gate = Arc::new(StartGate::new(2));
        gate.arrive(true);
        drop(Place::new(gate.clone()));
        assert!(!gate.wait(Instant::now() + Duration::from_secs(1)));
        let opened = Arc::new(StartGate::new(2));
        opened.arrive(true);
        assert!(Place::new(opened.clone()).arrive(true));
        assert!(opened.is_open());
    }

    #[test]
    fn a_wait_past_its_deadline_shuts_the_gate_for_all() {
        let gate = StartGate::new(2);
        gate.arrive(true);
        assert!(!gate.wait(Instant::now() + Duration::from_millis(5)));
        // The owner, arriving late, learns that nobody went in.
        assert!(!gate.arrive(true));
    }
}
