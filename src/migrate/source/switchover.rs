//! The switchover and the commit: the guest pauses, its last pages and state go over, and the
//! destination is told to run it once it says READY.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, info_span, Instrument};

use super::{local, on_disks, probe_clock, Ready, SendError};
use crate::machine::devices::Devices;
use crate::migrate::clock::{self, PeerClock};
use crate::migrate::dirty::DirtyTracker;
use crate::migrate::link::{AnswerError, Link};
use crate::migrate::pages::PageSender;
use crate::migrate::params::switchover_deadline;
use crate::migrate::phases::Phases;
use crate::migrate::progress::{downtime_ms, MigrationStatus};
use crate::migrate::sprint::Sprint;
use crate::migrate::vmstate;
use crate::migrate::wire::{Commit, Message};
use crate::migrate::Shared;
use crate::runtime::control::Event;
use crate::runtime::throttle::THROTTLE_PERIOD;
use crate::runtime::Vm;

/// What the commit needs of the switchover to report its downtime.
pub(super) struct Switchover {
    /// When each vCPU left the guest, in vCPU order: where the downtime starts.
    left_guest: Vec<Instant>,
    /// The destination's clock, on which it says when the guest ran again.
    peer_clock: PeerClock,
    phases: Phases,
    /// What went in the downtime: pages, and device state in bytes.
    last_pages: u64,
    state_bytes: usize,
    /// Until the commit has its answer, whose arrival wakes a thread here; dropped before the
    /// vCPUs run again, here or not at all.
    sprint: Sprint,
}

/// Measures the destination's clock again, pauses the guest and sends what it dirtied last and
/// its state, until the destination says READY; past the switchover deadline the migration
/// fails, and the source runs on.
pub(super) async fn hand_over(
    vm: &mut Vm,
    link: &mut Link,
    sender: &mut PageSender,
    tracker: &mut DirtyTracker,
    shared: &Shared,
    expected: Duration,
) -> Result<Switchover, SendError> {
    // Held until the commit has ended, or the switchover failed; taken ahead of the clock
    // probes, which give it time to take effect.
    let sprint = Sprint::start(&vm.vcpus);
    // Two hosts' clocks drift apart over a long migration, and the offset measured at setup
    // now places the guest's clocks and timers on the destination: measure it again while the
    // guest still runs.
    let peer_clock = probe_clock(link, clock::SWITCHOVER_PROBES).await?;
    // What the disks wrote so far goes to stable storage while the guest still runs, so
    // that the drain's own flush, inside the downtime, has little left to do.
    let mut phases = Phases::start();
    let disks = !vm.machine.devices.disks.is_empty();
    if disks {
        on_disks(vm, Devices::flush_disks)?;
    }
    phases.mark("flush");
    // A throttled vCPU stalls right before the pause would make the guest's blackout
    // longer than the downtime: let every vCPU out of its hold-back first.
    let throttle = vm.vcpus.throttle();
    if throttle.percent() > 0 {
        throttle.set(0);
        tokio::time::sleep(THROTTLE_PERIOD).await;
    }
    phases.mark("unthrottle");
    // Once paused, the guest waits on the destination: a network that stalls or a destination
    // that hangs must not keep it paused for as long as TCP takes to give up.
    let deadline = switchover_deadline(expected);
    let paused_at = Instant::now();
    let mut steps = Steps {
        phases: &mut phases,
        doing: "pausing the vCPUs",
        paused_at,
        deadline,
    };
    let paused = async {
        // Without disks nothing touches the guest once its vCPUs stop, so they save their
        // state as they pause, while this thread reads the dirty log and sends the last
        // pages. Disks drain first: a request completing then writes guest memory and raises
        // an interrupt, which the saved state must include.
        let saving_cpus = if disks {
            vm.vcpus.pause().await.map_err(local)?;
            None
        } else {
            Some(vmstate::pause_and_save(vm).await.map_err(local)?)
        };
        let after_pause = if disks {
            "draining the disks"
        } else {
            "reading the dirty log"
        };
        steps.next("pause", after_pause)?;
        // A paused guest asks for nothing more, so this answer is final: a guest that already
        // asked to end the VM (its event still on the way to the owner) must not live on in
        // the destination.
        if vm.machine.guest_events.ended_by_guest() {
            return Err(SendError::GuestEnded);
        }
        // The downtime is the guest's blackout: on a busy host a vCPU thread can have been
        // waiting for a core, its guest stopped, for milliseconds before the pause.
        let left_guest: Vec<Instant> = match vm.vcpus.left_guest() {
            // A paused guest's downtime is the switchover's.
            [] => vec![paused_at; vm.vcpus.count()],
            left => left.iter().map(|&l| l.min(paused_at)).collect(),
        };
        let first_left = left_guest.iter().min().copied().unwrap_or(paused_at);
        let preempted_us = (paused_at - first_left).as_micros() as u64;
        shared.switchover.store(true, Ordering::Release);
        shared.emit(Event::new("STOP", None));
        if disks {
            // Disk requests complete into guest memory: drain them before the last dirty sync
            // so that their data and used rings travel with the final pages.
            on_disks(vm, Devices::quiesce_disks)?;
            steps.next("quiesce", "reading the dirty log")?;
        }
        let dirty = tracker
            .sync(&vm.machine.vm, &vm.machine.memory)
            .map_err(local)?;
        let last = tracker.take();
        {
            // As QEMU counts it: the switchover's read of the dirty log is a sync too, and
            // `remaining` counts down what it found.
            let mut progress = shared.progress();
            progress.dirty_sync_count += 1;
            progress.remaining_pages = dirty;
        }
        steps.next("sync", "sending the last pages")?;
        sender.stop_pacing();
        let stats = sender.send(link, &last, shared).await?;
        sender.mark().await?;
        steps.next("pages", "saving the vCPUs' and devices' state")?;
        let cpus = async {
            match saving_cpus {
                Some(saving) => saving.finish(vm, &peer_clock).await,
                None => vmstate::save_cpus(vm, &peer_clock).await,
            }
        };
        let mut state = cpus
            .instrument(info_span!("device_state"))
            .await
            .map_err(local)?;
        state.extend(vmstate::save_devices(vm).map_err(local)?);
        steps.next("save", "sending the state")?;
        let state_bytes: usize = state.iter().map(|s| s.data.len()).sum();
        link.send(&Message::State(state)).await?;
        steps.next(
            "send_state",
            "waiting for the destination to take the last pages and the state",
        )?;
        shared.progress().transferred += state_bytes as u64;
        let answer = link.answer().await?;
        steps.phases.mark("ready");
        match answer {
            Message::Ready => {
                vm.machine.devices.release_images().map_err(local)?;
                steps.phases.mark("release");
                if preempted_us > 0 {
                    tracing::debug!(preempted_us, "a vCPU had left the guest before the pause");
                }
                Ok((left_guest, stats.pages, state_bytes))
            }
            other => Err(SendError::Protocol(format!("{other:?} instead of READY"))),
        }
    };
    match tokio::time::timeout(deadline, paused).await {
        Ok(paused) => {
            let (left_guest, last_pages, state_bytes) = paused?;
            Ok(Switchover {
                left_guest,
                peer_clock,
                phases,
                last_pages,
                state_bytes,
                sprint,
            })
        }
        Err(_) => Err(SendError::SwitchoverTimeout {
            deadline,
            stuck_in: steps.doing,
        }),
    }
}

/// The switchover's steps from the pause on: how long each took, and what it is doing now,
/// for the error if it overruns its deadline.
struct Steps<'a> {
    phases: &'a mut Phases,
    doing: &'static str,
    paused_at: Instant,
    deadline: Duration,
}

impl Steps<'_> {
    /// Ends the step `phase` and starts the one `next` describes. The deadline's timeout fires
    /// only at an await, so a step that does not await would have its overrun blamed on the
    /// step after it: each step's end checks the clock itself.
    fn next(&mut self, phase: &'static str, next: &'static str) -> Result<(), SendError> {
        self.phases.mark(phase);
        if self.paused_at.elapsed() > self.deadline {
            return Err(SendError::SwitchoverTimeout {
                deadline: self.deadline,
                stuck_in: self.doing,
            });
        }
        self.doing = next;
        Ok(())
    }
}

/// How the commit went, once the COMMIT was written.
pub(super) enum CommitOutcome {
    /// The destination said it took the guest over.
    Confirmed,
    /// The destination did not confirm: it may or may not run the guest.
    Unconfirmed(String),
}

/// How long the source waits for the destination to confirm the commit (its restore included).
pub(crate) const COMMIT_DEADLINE: Duration = Duration::from_secs(10);

/// The point of no return: the destination has everything; tell it to take the guest over.
pub(super) async fn commit(
    ready: Ready,
    was_running: bool,
    shared: &Shared,
) -> Result<CommitOutcome, SendError> {
    let Ready {
        mut link,
        switchover:
            Switchover {
                left_guest,
                peer_clock,
                mut phases,
                last_pages,
                state_bytes,
                sprint,
            },
    } = ready;
    // If the COMMIT cannot be written the destination never got it and will not run the guest,
    // so the source may safely take it back.
    let commit_sent = Instant::now();
    link.send(&Message::Commit(Commit { run: was_running }))
        .await?;
    phases.mark("commit");
    let confirmation = tokio::time::timeout(COMMIT_DEADLINE, link.answer()).await;
    let answered = Instant::now();
    phases.mark("committed");
    drop(sprint);
    link.close().await;
    // The downtime ends when the guest runs on the destination, which may be well before its
    // COMMITTED was written, and this side may read that much later still (its thread waiting
    // for a core): the destination says when on its clock. It cannot have run before COMMIT.
    let entered: Vec<Instant> = match &confirmation {
        Ok(Ok(Message::Committed(committed))) => committed
            .vcpus_running_at_ns
            .iter()
            .map(|&at| peer_clock.local(at).clamp(commit_sent, answered))
            .collect(),
        _ => Vec::new(),
    };
    let blackouts = clock::blackouts(&left_guest, &entered).unwrap_or_default();
    // A destination that keeps the guest paused (it was paused here) ends it at its answer.
    let downtime = blackouts.iter().max().copied().unwrap_or_else(|| {
        let first_left = left_guest.iter().min().copied().unwrap_or(commit_sent);
        answered.saturating_duration_since(first_left)
    });
    let running = entered.iter().max().copied().unwrap_or(answered);
    // Each vCPU's blackout, for reading beside the guest's own measures of them.
    let vcpus_us: Vec<u128> = blackouts.iter().map(Duration::as_micros).collect();
    tracing::debug!(
        %phases,
        ?vcpus_us,
        unread_us = answered.saturating_duration_since(running).as_micros() as u64,
        clock_uncertainty_us = peer_clock.uncertainty().as_micros() as u64,
        downtime_us = downtime.as_micros() as u64,
        "switchover steps (µs)"
    );
    match confirmation {
        // Only a guest that runs on reports a downtime, as in QEMU: a refused or unconfirmed
        // commit ends `failed`, and its pause is the error's business.
        Ok(Ok(Message::Committed(_))) => shared.progress().downtime = Some(downtime),
        // The destination refused the guest before running it (it could not take a disk, for
        // example): the source takes it back.
        Ok(Err(AnswerError::Refused(reason))) => return Err(SendError::DestinationFailed(reason)),
        other => {
            let why = match other {
                Ok(Ok(message)) => format!("it answered {message:?}"),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {} s", COMMIT_DEADLINE.as_secs()),
            };
            return Ok(CommitOutcome::Unconfirmed(format!(
                "the destination did not confirm that it took the guest over ({why}); it may be \
                 running it. The source stays paused: check the destination, and resume the \
                 source with 'cont' only if the destination does not run the guest"
            )));
        }
    }
    info_span!("switchover").in_scope(|| {
        // Logged only now: a line written inside the downtime wakes whatever reads this
        // process's output, which on a busy host takes a core from the switchover.
        info!(
            downtime_ms = downtime_ms(downtime),
            last_pages, state_bytes, "the destination runs the guest"
        )
    });
    shared.finish(MigrationStatus::Completed, None);
    let progress = shared.progress().clone();
    info!(
        downtime_ms = downtime_ms(downtime),
        downtime_us = downtime.as_micros() as u64,
        total_ms = progress.total_time.unwrap_or_default().as_millis() as u64,
        transferred = progress.transferred,
        dirty_syncs = progress.dirty_sync_count,
        "migration completed"
    );
    Ok(CommitOutcome::Confirmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An overrun is blamed on the step that ran past the deadline, not on the one after it.
    #[test]
    fn an_overrun_names_the_step_that_overran() {
        let mut phases = Phases::start();
        let mut steps = Steps {
            phases: &mut phases,
            doing: "reading the dirty log",
            paused_at: Instant::now(),
            deadline: Duration::from_secs(3600),
        };
        steps.next("sync", "sending the last pages").unwrap();
        assert_eq!(steps.doing, "sending the last pages");
        steps.deadline = Duration::ZERO;
        std::thread::sleep(Duration::from_millis(1));
        match steps.next("pages", "saving the state") {
            Err(SendError::SwitchoverTimeout { stuck_in, .. }) => {
                assert_eq!(stuck_in, "sending the last pages")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(phases.to_string().split(' ').count(), 2, "{phases}");
    }
}
