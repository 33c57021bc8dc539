//! Timings of the steps of a short critical stretch (the switchover, a vCPU's state save), kept
//! for one debug line: the downtime is made of them, and which one grew is the first question
//! when it does.

use std::fmt;
use std::time::{Duration, Instant};

/// Consecutive steps, each timed from the end of the one before.
#[derive(Debug)]
pub struct Phases {
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Phases {
    pub fn start() -> Self {
        Self {
            last: Instant::now(),
            steps: Vec::with_capacity(16),
        }
    }

    /// Ends the step `name` now.
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }
}

/// `name=µs` for every step, in order.
impl fmt::Display for Phases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, took)) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={}", took.as_micros())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_steps_in_order_with_their_own_durations() {
        let mut phases = Phases::start();
        std::thread::sleep(Duration::from_millis(2));
        phases.mark("first");
        phases.mark("second");
        let text = phases.to_string();
        let steps: Vec<(&str, u128)> = text
            .split(' ')
            .map(|step| {
                let (name, us) = step.split_once('=').unwrap();
                (name, us.parse().unwrap())
            })
            .collect();
        assert_eq!(steps[0].0, "first");
        assert!(steps[0].1 >= 2000, "{text}");
        assert_eq!(steps[1].0, "second");
        assert!(steps[1].1 < 2000, "{text}");
    }
}
