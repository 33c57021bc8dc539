//! The source side: pre-copy rounds with the guest running, the switchover, and the commit.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

use super::clock::{self, PeerClock};
use super::dirty::{DirtyTracker, RegionBitmap};
use super::lanes::SourceLanes;
use super::link::{AnswerError, Link};
use super::pages::{PageError, PageSender, SendStats};
use super::params::{decide, expected_downtime, next_throttle, Decision, SwitchoverCost};
use super::progress::{downtime_ms, MigrationStatus};
use super::transport::connect;
use super::uri::MigrationUri;
use super::wire::{self, LaneOffer, Message, RoundReport};
use super::{logging, Shared};
use crate::machine::devices::{Devices, DiskError};
use crate::machine::memory::PAGE_SIZE;
use crate::runtime::control::Event;
use crate::runtime::throttle::run_throttle;
use crate::runtime::Vm;

mod switchover;
pub(crate) use switchover::COMMIT_DEADLINE;
use switchover::{commit, CommitOutcome, Switchover};

/// How an outgoing migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination runs the guest now; the source stays paused.
    Completed,
    Failed(String),
    Cancelled,
    /// The destination did not confirm the commit: it may run the guest. The source stays
    /// paused until the operator decides.
    InDoubt(String),
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("cannot connect to {uri}: {source}")]
    Connect {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("the destination failed: {0}")]
    DestinationFailed(String),
    #[error("{0}")]
    Wire(#[from] wire::WireError),
    #[error("{0}")]
    Pages(#[from] PageError),
    #[error("unexpected answer from the destination: {0}")]
    Protocol(String),
    #[error("the destination did not answer within {} s", super::link::ANSWER_DEADLINE.as_secs())]
    Timeout,
    #[error("{0}")]
    Local(String),
    #[error(
        "the switchover did not end within {:.1} s of pausing the guest; it was {stuck_in}. The \
         guest runs on here: check the destination and the network, then migrate again",
        deadline.as_secs_f64()
    )]
    SwitchoverTimeout {
        deadline: Duration,
        stuck_in: &'static str,
    },
    #[error(
        "the guest ended the VM (a power-off, a reset or a vCPU that cannot go on) as the \
         switchover began; the VM ends on the source, and the destination does not run it"
    )]
    GuestEnded,
}

impl From<AnswerError> for SendError {
    fn from(error: AnswerError) -> Self {
        match error {
            AnswerError::Wire(error) => Self::Wire(error),
            AnswerError::Refused(reason) => Self::DestinationFailed(reason),
            AnswerError::Timeout => Self::Timeout,
        }
    }
}

fn local(error: impl std::fmt::Display) -> SendError {
    SendError::Local(error.to_string())
}

/// Migrates `vm` to `uri`; the caller has already put `shared` in `setup` (so that the status a
/// client reads right after `migrate` is this migration's). On any outcome but `Completed`, the
/// VM runs again if it ran before.
pub async fn migrate(
    vm: &mut Vm,
    uri: MigrationUri,
    shared: &Shared,
    cancel: CancellationToken,
) -> Outcome {
    let span = info_span!("migration", direction = "outgoing", uri = %uri);
    let was_running = vm.vcpus.running();
    let outcome = async {
        let precopy = precopy(vm, &uri, shared, &cancel).await?;
        // The commit is not cancellable: once READY is in hand, only the commit's own fate
        // decides who runs the guest.
        commit(precopy, was_running, shared).await.map_err(Some)
    }
    .instrument(span.clone())
    .await;
    settle(vm, outcome, was_running, shared)
        .instrument(span)
        .await
}

/// Gives the guest back to the source unless the destination runs it, and says how it ended.
async fn settle(
    vm: &mut Vm,
    outcome: Result<CommitOutcome, Option<SendError>>,
    was_running: bool,
    shared: &Shared,
) -> Outcome {
    vm.vcpus.throttle().set(0);
    let error = match outcome {
        // A guest that runs on the destination never runs here again (`cont` is refused after
        // a completed migration): dirty logging stays on rather than take milliseconds of a
        // core right when the destination's vCPUs start.
        Ok(CommitOutcome::Confirmed) => return Outcome::Completed,
        Ok(CommitOutcome::Unconfirmed(reason)) => {
            // The destination may be running the guest: resuming here could make two copies.
            tracing::error!(reason, "the commit is in doubt; the source stays paused");
            logging::stop(vm).await;
            shared.finish(MigrationStatus::Failed, Some(reason.clone()));
            return Outcome::InDoubt(reason);
        }
        Err(error) => error,
    };
    // Paused vCPUs make the change immediate; running ones go on while it is made.
    logging::stop(vm).await;
    if let Err(disks) = vm.machine.devices.activate_disks() {
        // Another process holds an image now, and that may be the destination running the
        // guest: running it here as well could corrupt the disk.
        let reason =
            format!(
            "the migration failed ({}) and the source cannot take its disks back: {disks}. The \
             source stays paused: check the destination, and resume the source with 'cont' \
             only if the destination does not run the guest",
            error.as_ref().map_or("cancelled".to_owned(), |e| e.to_string())
        );
        tracing::error!(reason, "disks not recovered");
        shared.finish(MigrationStatus::Failed, Some(reason.clone()));
        return Outcome::InDoubt(reason);
    }
    // A pause once sent counts (`running` is false) even if it was never acknowledged. Vcpus
    // that were never paused are left alone: waking them to hear "resume" costs each an exit.
    // A guest that asked to end the VM stays paused: its owner ends it next.
    let ended = vm.machine.guest_events.ended_by_guest();
    if was_running && !vm.vcpus.running() && !ended {
        match vm.vcpus.resume().await {
            Ok(()) => shared.emit(Event::new("RESUME", None)),
            Err(resume) => {
                tracing::error!(%resume, "cannot resume the source after the migration ended")
            }
        }
    }
    let reason = error.map(|e| e.to_string());
    match &reason {
        Some(reason) => tracing::warn!(reason, "migration failed; the source runs on"),
        None => info!("migration cancelled; the source runs on"),
    }
    let status = if reason.is_some() {
        MigrationStatus::Failed
    } else {
        MigrationStatus::Cancelled
    };
    shared.finish(status, reason.clone());
    reason.map_or(Outcome::Cancelled, Outcome::Failed)
}

/// Runs disk work that waits for storage (a flush, a drain) right here, on a thread the
/// runtime sets aside meanwhile. Not as a task of its own: a cancel would drop the wait but not
/// the task, which could then quiesce the disks after `settle` gave them back to the guest.
fn on_disks(vm: &Vm, work: fn(&Devices) -> Result<(), DiskError>) -> Result<(), SendError> {
    tokio::task::block_in_place(|| work(&vm.machine.devices)).map_err(local)
}

/// A source that has the destination's READY in hand.
struct Ready {
    link: Link,
    switchover: Switchover,
}

/// Everything up to the destination's READY; `Err(None)` when cancelled.
async fn precopy(
    vm: &mut Vm,
    uri: &MigrationUri,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<Ready, Option<SendError>> {
    let started = Instant::now();
    let stream = tokio::select! {
        stream = connect(uri) => stream.map_err(|source| SendError::Connect {
            uri: uri.to_string(),
            source,
        })?,
        () = cancel.cancelled() => return Err(None),
    };
    let mut link = Link::new(stream);
    let throttle = run_throttle(vm.vcpus.throttle().clone(), vm.vcpus.kicker());
    let streamed = tokio::select! {
        result = stream_guest(vm, uri, &mut link, shared, started) => result.map_err(Some),
        () = cancel.cancelled() => Err(None),
        () = throttle => unreachable!("the throttle runs until dropped"),
    };
    match streamed {
        Ok(switchover) => Ok(Ready { link, switchover }),
        Err(None) => {
            tracing::debug!("cancelled; telling the destination");
            // The source need not wait for the notice to be written (a full socket buffer
            // holds it up): the guest is the source's again already.
            tokio::spawn(link.hang_up(Message::Cancel).in_current_span());
            Err(None)
        }
        Err(Some(error)) => {
            // A destination that gave up says why before it hangs up; prefer its reason.
            let error = match error {
                SendError::Wire(_) | SendError::Pages(PageError::Wire(_) | PageError::Lane(_)) => {
                    match link.destination_reason().await {
                        Some(reason) => SendError::DestinationFailed(reason),
                        None => error,
                    }
                }
                other => other,
            };
            link.hang_up(Message::Error(error.to_string())).await;
            Err(Some(error))
        }
    }
}

async fn stream_guest(
    vm: &mut Vm,
    uri: &MigrationUri,
    link: &mut Link,
    shared: &Shared,
    started: Instant,
) -> Result<Switchover, SendError> {
    let memory = vm.machine.memory.clone();
    let mut sender = PageSender::new(memory.clone());
    let multifd = shared.capabilities().multifd;
    let channels = shared.params().multifd_channels;
    let peer_clock = async {
        link.write_frames(&wire::header()).await?;
        link.send(&Message::Config(Box::new(vm.machine.description())))
            .await?;
        accepted(link).await?;
        if multifd {
            let offer = LaneOffer {
                count: channels,
                // Tells this migration's connections from any other on the destination's port;
                // std's randomly keyed hasher is random enough for that.
                session: RandomState::new().build_hasher().finish(),
            };
            link.send(&Message::Lanes(offer)).await?;
            let lanes = SourceLanes::open(uri, link.tcp_peer(), offer, &memory)
                .await
                .map_err(|e| SendError::Pages(e.into()))?;
            accepted(link).await?;
            sender.use_lanes(lanes);
        }
        probe_clock(link, clock::PROBES).await
    }
    .instrument(info_span!("setup"))
    .await?;
    let pause = logging::start(vm).await.map_err(local)?;
    let mut cost = SwitchoverCost {
        pause,
        sync: Duration::ZERO,
        round_trip: peer_clock.round_trip(),
    };
    let mut tracker = DirtyTracker::all_pending(&memory);
    {
        let mut progress = shared.progress();
        progress.setup_time = Some(started.elapsed());
        progress.dirty_sync_count = 1;
    }
    shared.set_status(MigrationStatus::Active);
    let mut bandwidth = 0.0;
    // The downtime expected when the rounds end, for the switchover's deadline.
    let mut expected = Duration::ZERO;
    let mut last_sync = Instant::now();
    for round in 0u32.. {
        let span = info_span!("round", number = round);
        let pending = tracker.take();
        let pages: u64 = pending.iter().map(RegionBitmap::count).sum();
        shared.emit_pass(u64::from(round) + 1);
        let round_started = Instant::now();
        let sent = async {
            let mut zeros = SendStats { pages: 0, bytes: 0 };
            let mut touched = None;
            if round == 0 {
                let (present, runs) = sender.send_untouched(link, &pending, shared).await?;
                // The destination has every zero run before any data: it backs the rest of RAM
                // ahead of the pages once it answers.
                sync(link, &mut sender).await?;
                (zeros, touched) = (runs, Some(present));
            }
            let data = sender
                .send(link, touched.as_deref().unwrap_or(&pending), shared)
                .await?;
            // Bytes in socket buffers are not at the destination yet: wait until it has them
            // all, so that bandwidth and the downtime estimate count its side too. The
            // destination takes round 0's second SYNC as the end of its data, and stops backing
            // RAM ahead there.
            sync(link, &mut sender).await?;
            Ok::<SendStats, SendError>(SendStats {
                pages: zeros.pages + data.pages,
                bytes: zeros.bytes + data.bytes,
            })
        };
        let stats = match sent.instrument(span.clone()).await {
            Ok(stats) => stats,
            Err(error) => {
                tracker.give_back(&pending);
                return Err(error);
            }
        };
        let round_time = round_started.elapsed();
        if stats.bytes >= 1 << 20 || bandwidth == 0.0 {
            bandwidth = stats.bytes as f64 / round_time.as_secs_f64().max(1e-6);
        }
        let sync_started = Instant::now();
        let dirty = tracker.sync(&vm.machine.vm, &memory).map_err(local)?;
        cost.sync = sync_started.elapsed();
        let since_sync = last_sync.elapsed();
        last_sync = Instant::now();
        let params = *shared.params();
        let limit = Duration::from_millis(params.downtime_limit_ms);
        let throttle = vm.vcpus.throttle();
        if round > 0 && shared.capabilities().auto_converge {
            throttle.set(next_throttle(
                throttle.percent(),
                dirty * PAGE_SIZE,
                stats.bytes,
                params.throttle,
            ));
        }
        let fixed = cost.total();
        expected = expected_downtime(dirty * PAGE_SIZE, bandwidth).saturating_add(fixed);
        {
            let mut progress = shared.progress();
            progress.dirty_sync_count += 1;
            progress.remaining_pages = dirty;
            progress.bandwidth = bandwidth;
            progress.dirty_pages_rate = (dirty as f64 / since_sync.as_secs_f64().max(1e-6)) as u64;
            progress.expected_downtime = Some(expected);
            progress.cpu_throttle_percentage = throttle.percent();
        }
        span.in_scope(|| {
            info!(
                round,
                pages,
                bytes = stats.bytes,
                ms = round_time.as_millis() as u64,
                mib_per_s = (bandwidth / (1 << 20) as f64) as u64,
                dirty_after = dirty,
                throttle_percent = throttle.percent(),
                "pre-copy round"
            )
        });
        link.send(&Message::Round(RoundReport {
            round,
            remaining_pages: dirty,
        }))
        .await?;
        let decision = decide(
            round + 1,
            dirty * PAGE_SIZE,
            // What this round started with: did sending it leave less than half behind?
            pages * PAGE_SIZE,
            bandwidth,
            fixed,
            limit,
        );
        let timed_out = params.convergence_timed_out(started.elapsed());
        let decision = match decision {
            // Out of time while rounds still shrink what already fits the limit: that is
            // converged, not a failure.
            Decision::AnotherRound if timed_out && expected <= limit => Decision::Switchover,
            decision => decision,
        };
        if decision != Decision::Switchover && timed_out {
            return Err(SendError::Local(format!(
                "the guest did not converge within the convergence-timeout of {} s: after {} \
                 rounds {} MiB are still dirty and the downtime would be {} ms ({} ms of it \
                 the switchover's own cost), above the downtime-limit of {} ms; raise \
                 downtime-limit, max-cpu-throttle or convergence-timeout",
                params.convergence_timeout_s,
                round + 1,
                (dirty * PAGE_SIZE) >> 20,
                downtime_ms(expected),
                downtime_ms(fixed),
                params.downtime_limit_ms
            )));
        }
        match decision {
            Decision::AnotherRound => continue,
            Decision::Switchover => break,
            Decision::ForcedSwitchover => {
                tracing::warn!(
                    expected_ms = downtime_ms(expected),
                    limit_ms = params.downtime_limit_ms,
                    "round cap reached; switching over beyond the downtime limit"
                );
                break;
            }
        }
    }

    switchover::hand_over(vm, link, &mut sender, &mut tracker, shared, expected)
        .instrument(info_span!("switchover"))
        .await
}

/// Waits until the destination has everything sent so far in guest RAM: a mark on every lane,
/// then SYNC, which the destination answers once every lane has passed its mark.
async fn sync(link: &mut Link, sender: &mut PageSender) -> Result<(), SendError> {
    sender.mark().await?;
    // The answer's deadline is for the destination's landing, not for a slow link's queue.
    sender.marks_written().await?;
    link.send(&Message::Sync).await?;
    match link.answer().await? {
        Message::Synced => Ok(()),
        other => Err(SendError::Protocol(format!("{other:?} instead of SYNCED"))),
    }
}

/// Waits for the destination's ACCEPT (of the configuration, or of the page connections).
async fn accepted(link: &mut Link) -> Result<(), SendError> {
    match link.answer().await {
        Ok(Message::Accept) => Ok(()),
        Err(AnswerError::Refused(reason)) => Err(SendError::Refused(reason)),
        Ok(other) => Err(SendError::Protocol(format!("{other:?} instead of ACCEPT"))),
        Err(error) => Err(error.into()),
    }
}

/// Reads the destination's clock `probes` times and keeps the most precise reading.
async fn probe_clock(link: &mut Link, probes: usize) -> Result<PeerClock, SendError> {
    let mut best: Option<PeerClock> = None;
    for _ in 0..probes.max(1) {
        let sent = Instant::now();
        link.send(&Message::ClockProbe).await?;
        let reading = match link.answer().await? {
            Message::Clock(reading) => reading,
            other => return Err(SendError::Protocol(format!("{other:?} instead of CLOCK"))),
        };
        let probe = PeerClock::from_probe(sent, Instant::now(), reading);
        best = Some(best.map_or(probe, |best| best.better(probe)));
    }
    let best = best.expect("at least one probe");
    tracing::debug!(
        uncertainty_us = best.uncertainty().as_micros() as u64,
        "destination clock read"
    );
    Ok(best)
}
