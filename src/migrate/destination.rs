//! The destination side: accept one source, check its configuration, take its pages and state,
//! and run the guest only when the source commits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

use super::arrival::{self, Arrived};
use super::clock::LocalClock;
use super::landing::{write_zero_runs, Landing, LandingError};
use super::lanes::{DestinationLanes, LaneError};
use super::phases::Phases;
use super::progress::MigrationStatus;
use super::source::COMMIT_DEADLINE;
use super::sprint::Sprint;
use super::transport::{BoxedStream, Listener};
use super::vmstate::{DecodedState, RestoringCpus, VmStateError};
use super::wire::{self, Commit, Committed, Incoming, LaneOffer, Message, WireError};
use super::{prefault, vmstate, Shared};
use crate::machine::memory::{GuestMemory, PAGE_SIZE};
use crate::runtime::priority;
use crate::runtime::start_gate::{Place, StartGate, START_GATE_TIMEOUT};
use crate::runtime::vcpu::ACK_DEADLINE;
use crate::runtime::Vm;

/// How an incoming migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest is ours; `run` says whether the source ran it.
    Completed {
        run: bool,
    },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
enum ReceiveError {
    #[error("{0}")]
    Wire(WireError),
    #[error("the source's configuration does not match this VM: {0}")]
    Mismatch(String),
    #[error("the source reported: {0}")]
    SourceFailed(String),
    #[error("the source cancelled the migration")]
    Cancelled,
    #[error("the source closed the connection before the migration completed")]
    SourceGone,
    #[error("malformed stream: {0}")]
    Protocol(String),
    #[error("{0}")]
    Local(String),
}

impl From<WireError> for ReceiveError {
    fn from(error: WireError) -> Self {
        match error {
            WireError::Closed => Self::SourceGone,
            error => Self::Wire(error),
        }
    }
}

impl From<LandingError> for ReceiveError {
    fn from(error: LandingError) -> Self {
        match error {
            LandingError::Wire(error) => error.into(),
            LandingError::Protocol(reason) => Self::Protocol(reason),
            LandingError::Local(reason) => Self::Local(reason),
        }
    }
}

/// Receives the VM from the first source that connects to `listener` (strangers aside).
pub async fn receive(
    vm: &mut Vm,
    listener: Listener,
    shared: &Arc<Shared>,
    cancel: CancellationToken,
) -> Outcome {
    match accept_and_receive(vm, listener, shared, &cancel).await {
        Ok(run) => {
            info!(run, "incoming migration completed");
            Outcome::Completed { run }
        }
        Err(reason) => Outcome::Failed(reason),
    }
}

/// How long this side tries to tell the source how the migration ended: a source that does
/// not read then hears nothing, and decides on its own deadlines.
const LAST_WORD_DEADLINE: Duration = Duration::from_secs(1);

/// Tells the source how the migration ended, for at most [`LAST_WORD_DEADLINE`].
async fn last_word(stream: &mut BoxedStream, message: &Message) {
    let _ = tokio::time::timeout(LAST_WORD_DEADLINE, wire::write_message(stream, message)).await;
}

/// Cancellable until the source's COMMIT is in and the vCPUs' restores are queued (a cancel
/// after READY answers the COMMIT with ERROR, which the source takes as a refusal): from then on
/// only the commit's own fate decides where the guest runs, as on the source. A failure ends the
/// migration here before the source hears of it, as a completion does.
async fn accept_and_receive(
    vm: &mut Vm,
    listener: Listener,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
) -> Result<bool, String> {
    let cancelled = || ReceiveError::Local("the incoming migration was cancelled".into());
    let accepted = tokio::select! {
        accepted = arrival::first_source(&listener) => accepted,
        () = cancel.cancelled() => return Err(failed(shared, cancelled())),
    };
    let Arrived {
        mut stream,
        peer,
        header,
    } = match accepted {
        Ok(arrived) => arrived,
        Err(e) => {
            let error = ReceiveError::Local(format!("accept failed: {e}"));
            return Err(failed(shared, error));
        }
    };
    let span = info_span!("migration", direction = "incoming", peer = %peer);
    async {
        let clock = LocalClock::start();
        // Taken when the source starts its switchover, held until the migration has ended:
        // after the guest runs here and COMMITTED is sent, or after a failure.
        let mut sprint = None;
        let received = match header {
            Ok(()) => tokio::select! {
                received = receive_stream(vm, &mut stream, listener, &clock, shared, &mut sprint) => received,
                () = cancel.cancelled() => Err(cancelled()),
            },
            Err(error) => Err(error.into()),
        };
        let result = match received {
            Ok((commit, restoring, backed)) => {
                take_over(vm, &mut stream, commit, restoring, &clock, shared)
                    .await
                    .map(|run| (run, backed))
            }
            Err(error) => Err(error),
        };
        let reason = match result {
            Ok((run, backed)) => {
                // Only now: a line written inside the downtime would wake whatever reads this
                // process's output.
                if let Some(backed) = backed {
                    backed.log();
                }
                return Ok(run);
            }
            Err(error) => failed(shared, error),
        };
        // Tell the source why, so that its error-desc names the real cause.
        last_word(&mut stream, &Message::Error(reason.clone())).await;
        Err(reason)
    }
    .instrument(span)
    .await
}

/// Ends the migration as failed and returns why.
fn failed(shared: &Shared, error: ReceiveError) -> String {
    // This process ends now (a destination without a guest exits); on the same host the
    // source runs its guest again as soon as it hears, and whatever of this side still runs (a
    // lane finishing its read, the prefault thread, the teardown of RAM) must not take a core
    // from it meanwhile, not even while the notice goes out.
    priority::give_way();
    let reason = error.to_string();
    tracing::error!(
        reason,
        "incoming migration failed; the guest does not run here"
    );
    shared.finish(MigrationStatus::Failed, Some(reason.clone()));
    reason
}

/// Takes over the guest the source committed to this side: runs it if the source ran it and no
/// `stop` came meanwhile, then says so. The migration is `completed` before COMMITTED goes
/// out: a client that hears the source complete must find this side's migration over too.
/// Returns whether the source ran the guest.
async fn take_over(
    vm: &mut Vm,
    stream: &mut BoxedStream,
    commit: Commit,
    restoring: Restoring,
    clock: &LocalClock,
    shared: &Shared,
) -> Result<bool, ReceiveError> {
    let mut phases = Phases::start();
    let Restoring { cpus, place } = restoring;
    // The source has let go of the images; without them the guest must not run here (the
    // error goes back to the source, which then runs it again). Dropped, the place shuts the
    // gate, and the vCPUs stay paused.
    vm.machine
        .devices
        .activate_disks()
        .map_err(|e| ReceiveError::Local(format!("cannot take over the disks: {e}")))?;
    phases.mark("disks");
    // The guest is ours now whether or not the source hears this. Its vCPUs go in as soon as
    // the last of them is restored and this side arrives at their gate, before the source is
    // told; the source learns since when: on a busy host this side may hear the vCPUs'
    // acknowledgements well after they run the guest, and that is not downtime.
    let run = commit.run && shared.autostart();
    place.arrive(run);
    phases.mark("arrive");
    let (restored, started) = cpus.finish(vm).await;
    let running_since = if started.opened {
        // Every vCPU was restored and goes in, whatever a late answer says: the guest is this
        // side's. Handed back, an older copy of it would run on the source after this one had
        // run (and written to its disks).
        if let Err(error) = &restored {
            tracing::error!(%error, "the guest runs here, though not every vCPU answered in time");
        }
        // Approximate for a vCPU that did not answer; the source bounds it by its own clock.
        started
            .entered
            .unwrap_or_else(|| vec![Instant::now(); vm.vcpus.count()])
    } else if let Some(why) = start_failure(restored, run) {
        // No vCPU went in, nor will: the gate is shut. The source gets its disks back.
        let _ = vm.vcpus.pause().await;
        vm.machine.devices.deactivate_disks();
        return Err(ReceiveError::Local(why));
    } else {
        Vec::new()
    };
    phases.mark("start");
    shared.finish(MigrationStatus::Completed, None);
    let committed = Committed {
        vcpus_running_at_ns: running_since.iter().map(|&t| clock.at(t)).collect(),
    };
    // The guest is this side's whatever the source hears: one that does not read stays paused,
    // its migration in doubt.
    last_word(stream, &Message::Committed(committed)).await;
    phases.mark("committed");
    let running_us = running_since
        .iter()
        .max()
        .map(|t| t.elapsed().as_micros() as u64);
    tracing::debug!(%phases, running_us, "commit steps (µs)");
    Ok(commit.run)
}

/// Why a guest whose vCPUs' gate did not open cannot stay here, if it cannot: the restores
/// failed, or the guest was to run and a vCPU gave up waiting to be let in. A guest not to be
/// run stays, paused, once every vCPU is restored.
fn start_failure(restored: Result<(), VmStateError>, run: bool) -> Option<String> {
    match restored {
        Err(VmStateError::Vcpu(error)) => {
            Some(format!("cannot restore and start the vCPUs: {error}"))
        }
        Err(error) => Some(format!("cannot take the state: {error}")),
        Ok(()) if run => Some(format!(
            "cannot start the vCPUs: one of them gave up waiting to be let into the guest \
             (after {} s)",
            START_GATE_TIMEOUT.as_secs()
        )),
        Ok(()) => None,
    }
}

/// Reads and answers on the one unsplit `stream`: the two never overlap, and page data is read
/// with the socket's own readv (see [`Landing`]).
async fn receive_stream(
    vm: &mut Vm,
    stream: &mut BoxedStream,
    listener: Listener,
    clock: &LocalClock,
    shared: &Arc<Shared>,
    sprint: &mut Option<Sprint>,
) -> Result<(Commit, Restoring, Option<prefault::Backed>), ReceiveError> {
    // The migration starts when the source connects, not when this side began to wait.
    let started = Instant::now();
    shared.progress().started = Some(started);
    let memory = vm.machine.memory.clone();
    let source = match wire::read_message(stream).await? {
        Message::Config(source) => source,
        other => {
            return Err(ReceiveError::Protocol(format!(
                "{other:?} before the configuration"
            )))
        }
    };
    if let Err(mismatch) = vm.machine.description().check_source(&source) {
        return Err(ReceiveError::Mismatch(mismatch));
    }
    wire::write_message(stream, &Message::Accept).await?;
    shared.progress().setup_time = Some(started.elapsed());
    shared.set_status(MigrationStatus::Active);

    let ram_pages: u64 = vm.machine.layout.iter().map(|r| r.size / PAGE_SIZE).sum();
    // Round 0's zero runs, until the SYNC that ends them (before any page data): then the
    // rest of RAM is backed ahead, unless -mem-prealloc backed it all already.
    let mut zero_runs = (!vm.machine.preallocated).then(Vec::new);
    // Where the last zero run ended: runs ascend without overlapping, so they are at most
    // one per page of RAM, however many frames a source sends.
    let mut zeros_end = 0;
    let mut backing = None;
    let mut backed = None;
    let mut landing = Landing::new(memory.clone());
    // Kept until the source says whether it opens page connections of its own (right after
    // ACCEPT), so that no other source can connect meanwhile.
    let mut listener = Some(listener);
    let mut lanes: Option<DestinationLanes> = None;
    // Marks every lane must have passed: one per SYNC and one before the state.
    let mut marks = 0;
    loop {
        let message = match read_control(stream, &mut lanes).await? {
            // Round 0's zero runs come first and clear whatever they cover, which on
            // preallocated RAM includes only pages ferry wrote: data landed before them could
            // be left under a run.
            Ok(Incoming::Pages { .. }) if marks == 0 => {
                return Err(ReceiveError::Protocol(
                    "page data before round 0's first SYNC".into(),
                ));
            }
            Ok(Incoming::Pages { entries, data_len }) => {
                drop(listener.take());
                let bytes = landing.receive(stream, &entries, data_len).await?;
                shared.progress().count_landed(bytes, &entries);
                continue;
            }
            Ok(Incoming::Message(Message::Lanes(offer))) if listener.is_some() => {
                let listener = listener.take().expect("checked above");
                lanes = Some(accept_lanes(stream, &listener, offer, &memory, shared).await?);
                info!(lanes = offer.count, "page connections accepted");
                wire::write_message(stream, &Message::Accept).await?;
                continue;
            }
            Ok(Incoming::Message(message)) => {
                drop(listener.take());
                message
            }
            Err(error) => return Err(error.into()),
        };
        match message {
            // Landed pages are not recorded anywhere a zero run could consult: on preallocated
            // RAM, a zero run after them would leave their data in place.
            Message::Zeros(_) if marks > 0 => {
                return Err(ReceiveError::Protocol(
                    "zero runs after round 0's first SYNC, when pages may have landed".into(),
                ));
            }
            Message::Zeros(runs) => {
                zeros_end = ascending_end(zeros_end, &runs)?;
                let pages = write_zero_runs(&memory, &runs, vm.machine.preallocated)?;
                if let Some(all) = zero_runs.as_mut() {
                    all.extend_from_slice(&runs);
                }
                let mut progress = shared.progress();
                progress.transferred += 8 + runs.len() as u64 * 16;
                progress.duplicate += pages;
            }
            Message::Sync => {
                // The first SYNC ends round 0's zero runs and starts the prefault; the second
                // ends round 0's data and with it the prefault's work.
                let finishing = backing.take();
                if let Some(runs) = zero_runs.take() {
                    backing = prefault::start(memory.clone(), runs);
                }
                marks += 1;
                lanes_reached(stream, &mut lanes, marks).await?;
                if let Some(prefault) = finishing {
                    // Round 0 has landed every page that holds data, backing what the thread
                    // had not reached; the rest stays zero. It ends before the answer, so that
                    // on a host slow to back memory it does not hold a core at the switchover.
                    backed = prefault.finish().await;
                }
                wire::write_message(stream, &Message::Synced).await?;
            }
            Message::ClockProbe => {
                // Past round 0's first SYNC, the source probes the clock only right before it
                // pauses the guest.
                if marks > 0 && sprint.is_none() {
                    *sprint = Some(Sprint::start(&vm.vcpus));
                }
                wire::write_message(stream, &Message::Clock(clock.now())).await?;
            }
            Message::Round(report) if report.remaining_pages > ram_pages => {
                return Err(ReceiveError::Protocol(format!(
                    "round {} reports {} pages remaining, but RAM has {ram_pages}",
                    report.round, report.remaining_pages
                )));
            }
            Message::Round(report) => {
                {
                    let mut progress = shared.progress();
                    progress.remaining_pages = report.remaining_pages;
                    progress.dirty_sync_count = u64::from(report.round) + 2;
                }
                shared.emit_pass(u64::from(report.round) + 1);
            }
            Message::State(sections) => {
                // Stopped at the SYNC that ended round 0 already; this covers a stream without one.
                drop(backing.take());
                marks += 1;
                lanes_reached(stream, &mut lanes, marks).await?;
                // Decoded and checked before READY: a state that does not fit this VM fails the
                // migration while the source still holds its disks.
                let decoding = Instant::now();
                let state = vmstate::decode(vm, sections)
                    .map_err(|e| ReceiveError::Local(format!("cannot take the state: {e}")))?;
                let decode_us = decoding.elapsed().as_micros() as u64;
                tracing::debug!(decode_us, "state decoded");
                let (commit, restoring) =
                    restore_until_commit(vm, stream, state, lanes.take(), clock).await?;
                return Ok((commit, restoring, backed));
            }
            Message::Error(reason) => return Err(ReceiveError::SourceFailed(reason)),
            Message::Cancel => return Err(ReceiveError::Cancelled),
            other => {
                return Err(ReceiveError::Protocol(format!(
                    "unexpected {} during pre-copy",
                    describe(&other)
                )));
            }
        }
    }
}

/// The end of the last of `runs`, which must start at or after `after` and each after the one
/// before it.
fn ascending_end(after: u64, runs: &[(u64, u64)]) -> Result<u64, ReceiveError> {
    runs.iter().try_fold(after, |end, &(gpa, pages)| {
        if gpa < end {
            return Err(ReceiveError::Protocol(format!(
                "zero run at {gpa:#x} overlaps or precedes the one before it, which ended at \
                 {end:#x}"
            )));
        }
        // The wire's decoding checked that the run's end fits in 64 bits.
        Ok(gpa + pages * PAGE_SIZE)
    })
}

/// How long the restore (and the page connections' end) may take. Past the source's wait for
/// the commit's answer the source stays paused, the commit in doubt; within it, a restore that
/// ends the migration reaches the source as a refusal, and the source runs the guest again.
const RESTORE_DEADLINE: Duration = Duration::from_secs(3);

// What may follow the restore before the answer goes out: collecting the vCPUs' restores and
// starts, stopping them again if that fails, and the answer itself.
const _: () = assert!(
    RESTORE_DEADLINE.as_millis() + 2 * ACK_DEADLINE.as_millis() + LAST_WORD_DEADLINE.as_millis()
        < COMMIT_DEADLINE.as_millis()
);

// A vCPU waits at the gate from its restore on, which this side queues as it sends READY; a
// source commits as soon as it reads READY, and waits for the answer no longer than its
// deadline. A vCPU gives up only well past that, so only a source stalled for longer (and
// then answered with ERROR) meets a gate shut by a vCPU.
const _: () = assert!(
    START_GATE_TIMEOUT.as_millis() > RESTORE_DEADLINE.as_millis() + COMMIT_DEADLINE.as_millis()
);

/// How long this side waits for the source's COMMIT after READY: as long as the restored vCPUs
/// wait at their gate, after which a COMMIT to run the guest could only be refused. A source
/// sends it as soon as it reads READY; one that is alive but stalled this long must not keep
/// this side `active` until someone cancels it.
const COMMIT_WAIT: Duration = START_GATE_TIMEOUT;

/// The state being restored: the vCPUs restore themselves and then wait at a gate, which this
/// side's owner must arrive at (or shut, by dropping its place).
struct Restoring {
    cpus: RestoringCpus,
    place: Place,
}

/// Restores the state while the source hears READY and commits: that round trip, which the
/// guest would otherwise wait for after the restore, overlaps it. A restore that fails, here or
/// later on a vCPU's thread, answers the COMMIT with ERROR, and the source runs the guest again.
async fn restore_until_commit(
    vm: &Vm,
    stream: &mut BoxedStream,
    state: DecodedState,
    lanes: Option<DestinationLanes>,
    clock: &LocalClock,
) -> Result<(Commit, Restoring), ReceiveError> {
    let began = Instant::now();
    // Polled first, so READY is on its way before the restore wakes the vCPU threads.
    let commit = async {
        let exchange = async {
            wire::write_message(stream, &Message::Ready).await?;
            wire::read_message(stream).await
        };
        let message = tokio::time::timeout(COMMIT_WAIT, exchange)
            .await
            .map_err(|_| {
                ReceiveError::Local(format!(
                    "the source did not commit within {} s of READY",
                    COMMIT_WAIT.as_secs()
                ))
            })??;
        let committed_us = began.elapsed().as_micros() as u64;
        match source_gave_up(message) {
            Ok(gave_up) => Err(gave_up),
            Err(Message::Commit(commit)) => Ok((commit, committed_us)),
            Err(other) => Err(ReceiveError::Protocol(format!(
                "unexpected {} after the state",
                describe(&other)
            ))),
        }
    };
    // Every lane has passed its last mark, so a well-behaved source has no page in flight: the
    // lanes stop while the state is restored. The guest runs only after both (the owner
    // arrives at the vCPUs' gate only then), when no lane can land a page any more.
    let restore = async {
        // The owner and every vCPU.
        let gate = Arc::new(StartGate::new(vm.vcpus.count() + 1));
        let place = Place::new(gate.clone());
        let restoring = info_span!("device_state")
            .in_scope(|| vmstate::restore(vm, state, clock, &gate))
            .map_err(|error| ReceiveError::Local(error.to_string()));
        let stopping = async {
            if let Some(lanes) = lanes {
                lanes.stop().await;
            }
        };
        let stopped = tokio::time::timeout(RESTORE_DEADLINE, stopping).await;
        let elapsed = began.elapsed();
        let restoring = match (restoring, stopped) {
            (Err(error), _) => Err(error),
            (Ok(cpus), Ok(())) if elapsed <= RESTORE_DEADLINE => Ok(Restoring { cpus, place }),
            _ => Err(ReceiveError::Local(format!(
                "restoring the state and ending the page connections took more than {} s",
                RESTORE_DEADLINE.as_secs()
            ))),
        };
        (restoring, elapsed.as_micros() as u64)
    };
    let (commit, (restoring, queued_us)) = tokio::join!(commit, restore);
    let (commit, committed_us) = commit?;
    let restoring = restoring?;
    tracing::debug!(
        queued_us,
        committed_us,
        "vCPU restores queued while the source committed"
    );
    Ok((commit, restoring))
}

/// Accepts the page connections the source offered. A source that fails to open them, or is
/// cancelled meanwhile, says so on the control link and hangs up: that ends the wait, with its
/// reason.
async fn accept_lanes(
    stream: &mut BoxedStream,
    listener: &Listener,
    offer: LaneOffer,
    memory: &GuestMemory,
    shared: &Arc<Shared>,
) -> Result<DestinationLanes, ReceiveError> {
    // The control link is watched with `read_buf`, which reads nothing unless it completes: a
    // frame read half way when the connections arrived would leave the link mid-frame.
    let mut said = Vec::new();
    let accept = DestinationLanes::accept(listener, offer, memory, shared);
    tokio::select! {
        // Not a malformed stream: the connections did not come, or the offer is beyond ours.
        accepted = accept => return accepted.map_err(|e| ReceiveError::Local(e.to_string())),
        read = stream.read_buf(&mut said) => {
            read.map_err(WireError::Io)?;
        }
    }
    // The source speaks before the connections are accepted only to give up; its whole word
    // is its first bytes and the rest of that frame, which a source that is giving up sends at
    // once.
    let mut rest = (&said[..]).chain(stream);
    let said = tokio::time::timeout(SOURCE_NOTICE_DEADLINE, wire::read_message(&mut rest)).await;
    Err(match said {
        Ok(Ok(message)) => match source_gave_up(message) {
            Ok(gave_up) => gave_up,
            Err(other) => ReceiveError::Protocol(format!(
                "{} while the page connections were opening",
                describe(&other)
            )),
        },
        Ok(Err(error)) => error.into(),
        Err(_) => ReceiveError::Protocol(format!(
            "the source began a message while its page connections were opening, and did not \
             finish it within {} ms",
            SOURCE_NOTICE_DEADLINE.as_millis()
        )),
    })
}

/// The next frame on the control link. With lanes open, a lane that fails ends the migration
/// now, not at the next SYNC.
async fn read_control(
    stream: &mut BoxedStream,
    lanes: &mut Option<DestinationLanes>,
) -> Result<Result<Incoming, WireError>, ReceiveError> {
    let Some(lanes) = lanes.as_mut() else {
        return Ok(wire::read_incoming(stream).await);
    };
    let failure = {
        let mut read = std::pin::pin!(wire::read_incoming(stream));
        tokio::select! {
            incoming = &mut read => return Ok(incoming),
            failure = lanes.failed() => {
                // A frame half read would leave the stream mid-frame: finish it.
                match tokio::time::timeout(SOURCE_NOTICE_DEADLINE, read).await {
                    Ok(Ok(Incoming::Message(message))) => match source_gave_up(message) {
                        Ok(gave_up) => return Err(gave_up),
                        Err(_) => failure,
                    },
                    Ok(Ok(Incoming::Pages { .. })) => failure,
                    _ => return Err(ReceiveError::Local(failure.to_string())),
                }
            }
        }
    };
    Err(lane_failure(stream, failure).await)
}

/// Waits for every lane (if the source opened any) to land everything before its `mark`-th
/// mark.
async fn lanes_reached(
    stream: &mut BoxedStream,
    lanes: &mut Option<DestinationLanes>,
    mark: u64,
) -> Result<(), ReceiveError> {
    match lanes {
        Some(lanes) => match lanes.reached(mark).await {
            Ok(()) => Ok(()),
            Err(failure) => Err(lane_failure(stream, failure).await),
        },
        None => Ok(()),
    }
}

/// How long a failed lane's source gets to say on the control link why it hung up.
const SOURCE_NOTICE_DEADLINE: Duration = Duration::from_millis(200);

/// The reason a migration fails with when a lane did: a source that cancels or fails closes
/// its lanes, then says so on the control link, and that is the better reason.
async fn lane_failure(stream: &mut BoxedStream, failure: LaneError) -> ReceiveError {
    let notice = async {
        loop {
            match wire::read_message(stream).await.map(source_gave_up) {
                Ok(Ok(gave_up)) => return Some(gave_up),
                Ok(Err(_)) => continue,
                Err(_) => return None,
            }
        }
    };
    match tokio::time::timeout(SOURCE_NOTICE_DEADLINE, notice).await {
        Ok(Some(error)) => error,
        _ => ReceiveError::Local(failure.to_string()),
    }
}

/// The failure a source's CANCEL or ERROR stands for; any other message back.
fn source_gave_up(message: Message) -> Result<ReceiveError, Message> {
    match message {
        Message::Cancel => Ok(ReceiveError::Cancelled),
        Message::Error(reason) => Ok(ReceiveError::SourceFailed(reason)),
        other => Err(other),
    }
}

fn describe(message: &Message) -> String {
    match message {
        Message::Pages { entries, .. } => format!("PAGES ({} pages)", entries.len()),
        Message::Zeros(runs) => format!("ZEROS ({} runs)", runs.len()),
        Message::State(sections) => format!("STATE ({} sections)", sections.len()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::state::StateError;
    use crate::runtime::vcpu::VcpuError;

    #[test]
    fn zero_runs_must_ascend_without_overlapping() {
        let page = PAGE_SIZE;
        assert_eq!(
            ascending_end(0, &[(0, 2), (2 * page, 1)]).unwrap(),
            3 * page
        );
        assert_eq!(ascending_end(3 * page, &[(5 * page, 1)]).unwrap(), 6 * page);
        // The same page again, in the same frame or a later one.
        assert!(ascending_end(0, &[(0, 2), (page, 1)]).is_err());
        assert!(ascending_end(3 * page, &[(0, 1)]).is_err());
    }

    #[test]
    fn a_guest_not_to_run_stays_paused_once_every_vcpu_is_restored() {
        assert_eq!(start_failure(Ok(()), false), None);
    }

    #[test]
    fn a_guest_to_run_that_was_not_let_in_does_not_stay() {
        let why = start_failure(Ok(()), true).expect("a guest to run must have run");
        assert!(why.contains("gave up waiting"), "{why}");
    }

    #[test]
    fn a_failed_or_silent_restore_never_stays_run_or_not() {
        for run in [false, true] {
            let failed = StateError::Restore {
                what: "vcpu1".into(),
                reason: "bad sregs".into(),
            };
            let why =
                start_failure(Err(failed.into()), run).expect("a failed restore must not stay");
            assert!(why.starts_with("cannot take the state"), "{why}");
            let silent = VcpuError::Timeout { index: 1 };
            let why = start_failure(Err(silent.into()), run).expect("a silent vCPU must not stay");
            assert!(why.contains("vCPU 1 did not answer"), "{why}");
        }
    }
}
