//! The source side: pre-copy rounds with the guest running, the switchover, and the commit.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};
use vm_memory::{Bytes, GuestAddress};

use super::dirty::{DirtyTracker, RegionBitmap};
use super::params::{decide, expected_downtime, Decision};
use super::progress::MigrationStatus;
use super::transport::{connect, BoxedStream};
use super::uri::MigrationUri;
use super::wire::{self, Commit, Message, PageEntry, RoundReport, MAX_PAGES_PER_FRAME};
use super::{vmstate, Shared};
use crate::machine::memory::{take_vmm_dirty_bitmap, GuestMemory, PAGE_SIZE};
use crate::runtime::control::Event;
use crate::runtime::Vm;
use vm_memory::GuestMemoryBackend;

/// How long the source waits for the destination to answer the configuration or to restore.
const ANSWER_DEADLINE: Duration = Duration::from_secs(60);
/// How long a cancelled source tries to tell the destination before hanging up.
const CANCEL_NOTICE_DEADLINE: Duration = Duration::from_millis(50);

/// How an outgoing migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination runs the guest now; the source stays paused.
    Completed,
    Failed(String),
    Cancelled,
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
    #[error("unexpected answer from the destination: {0}")]
    Protocol(String),
    #[error("the destination did not answer within {} s", ANSWER_DEADLINE.as_secs())]
    Timeout,
    #[error("{0}")]
    Local(String),
}

fn local(error: impl std::fmt::Display) -> SendError {
    SendError::Local(error.to_string())
}

type Reader = ReadHalf<BoxedStream>;
type Writer = WriteHalf<BoxedStream>;

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
    let precopy = async {
        tokio::select! {
            result = precopy(vm, &uri, shared) => result,
            () = cancel.cancelled() => Err(None),
        }
    }
    .instrument(span.clone())
    .await;
    let outcome = match precopy {
        // The commit is not cancellable: once RESTORED is in hand, only the commit's own fate
        // decides who runs the guest.
        Ok((reader, writer, paused_at)) => commit(writer, reader, was_running, paused_at, shared)
            .instrument(span.clone())
            .await
            .map_err(Some),
        Err(error) => Err(error),
    };
    let _enter = span.enter();
    match outcome {
        Ok(()) => {
            stop_dirty_logging(vm);
            Outcome::Completed
        }
        Err(error) => {
            stop_dirty_logging(vm);
            if was_running && !vm.vcpus.running() {
                if let Err(resume) = vm.vcpus.resume().await {
                    tracing::error!(%resume, "cannot resume the source after the migration ended");
                } else {
                    shared.emit(Event::new("RESUME", None));
                }
            }
            let (status, reason) = match error {
                None => (MigrationStatus::Cancelled, None),
                Some(error) => (MigrationStatus::Failed, Some(error.to_string())),
            };
            match &reason {
                Some(reason) => tracing::warn!(reason, "migration failed; the source runs on"),
                None => info!("migration cancelled; the source runs on"),
            }
            shared.finish(status, reason.clone());
            reason.map_or(Outcome::Cancelled, Outcome::Failed)
        }
    }
}

fn stop_dirty_logging(vm: &Vm) {
    if let Err(error) = vm.machine.set_dirty_logging(false) {
        tracing::warn!(%error, "cannot turn KVM's dirty logging off");
    }
}

/// Everything up to the destination's RESTORED. Returns the connection and when the guest
/// was paused.
async fn precopy(
    vm: &mut Vm,
    uri: &MigrationUri,
    shared: &Shared,
) -> Result<(Reader, Writer, Instant), Option<SendError>> {
    let started = Instant::now();
    let stream = connect(uri).await.map_err(|source| SendError::Connect {
        uri: uri.to_string(),
        source,
    })?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let result = stream_guest(vm, &mut reader, &mut writer, shared, started).await;
    match result {
        Ok(paused_at) => Ok((reader, writer, paused_at)),
        Err(error) => {
            // A destination that gave up says why before it hangs up; prefer its reason.
            let error = match error {
                SendError::Wire(_) => {
                    match tokio::time::timeout(Duration::from_secs(1), read_error(&mut reader))
                        .await
                    {
                        Ok(Some(reason)) => SendError::DestinationFailed(reason),
                        _ => error,
                    }
                }
                other => other,
            };
            let _ = tokio::time::timeout(
                CANCEL_NOTICE_DEADLINE,
                wire::write_message(&mut writer, &Message::Error(error.to_string())),
            )
            .await;
            Err(Some(error))
        }
    }
}

/// Reads until an ERROR message, if the destination sent one.
async fn read_error(reader: &mut Reader) -> Option<String> {
    loop {
        match wire::read_message(reader).await {
            Ok(Message::Error(reason)) => return Some(reason),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

async fn answer(reader: &mut Reader) -> Result<Message, SendError> {
    match tokio::time::timeout(ANSWER_DEADLINE, wire::read_message(reader)).await {
        Ok(Ok(Message::Error(reason))) => Err(SendError::DestinationFailed(reason)),
        Ok(result) => Ok(result?),
        Err(_) => Err(SendError::Timeout),
    }
}

async fn stream_guest(
    vm: &mut Vm,
    reader: &mut Reader,
    writer: &mut Writer,
    shared: &Shared,
    started: Instant,
) -> Result<Instant, SendError> {
    let setup = info_span!("setup");
    async {
        wire::write_header(writer).await?;
        wire::write_message(writer, &Message::Config(Box::new(vm.machine.description()))).await?;
        match answer(reader).await {
            Ok(Message::Accept) => Ok(()),
            Err(SendError::DestinationFailed(reason)) => Err(SendError::Refused(reason)),
            Ok(other) => Err(SendError::Protocol(format!("{other:?} instead of ACCEPT"))),
            Err(error) => Err(error),
        }
    }
    .instrument(setup)
    .await?;

    let memory = vm.machine.memory.clone();
    vm.machine.set_dirty_logging(true).map_err(local)?;
    // Round 0 sends everything, so what ferry wrote before now needs no record.
    for region in memory.iter() {
        take_vmm_dirty_bitmap(region);
    }
    let mut tracker = DirtyTracker::all_pending(&memory);
    {
        let mut progress = shared.progress();
        progress.setup_time = Some(started.elapsed());
        progress.dirty_sync_count = 1;
    }
    shared.set_status(MigrationStatus::Active);
    let mut sender = PageSender::new(memory.clone());
    let mut bandwidth = 0.0;
    let mut last_sync = Instant::now();
    for round in 0u32.. {
        let span = info_span!("round", number = round);
        let pending = tracker.take();
        let pages: u64 = pending.iter().map(RegionBitmap::count).sum();
        shared.emit_pass(u64::from(round) + 1);
        let sent = sender
            .send(writer, &pending, shared)
            .instrument(span.clone())
            .await;
        if let Err(error) = sent {
            tracker.give_back(&pending);
            return Err(error);
        }
        let stats = sent.expect("checked above");
        if stats.bytes >= 1 << 20 || bandwidth == 0.0 {
            bandwidth = stats.bandwidth();
        }
        let dirty = tracker.sync(&vm.machine.vm, &memory).map_err(local)?;
        let since_sync = last_sync.elapsed();
        last_sync = Instant::now();
        let params = *shared.params();
        let limit = Duration::from_millis(params.downtime_limit_ms);
        let expected = expected_downtime(dirty * PAGE_SIZE, bandwidth);
        {
            let mut progress = shared.progress();
            progress.dirty_sync_count += 1;
            progress.remaining_pages = dirty;
            progress.bandwidth = bandwidth;
            progress.dirty_pages_rate = (dirty as f64 / since_sync.as_secs_f64().max(1e-6)) as u64;
            progress.expected_downtime = Some(expected);
        }
        span.in_scope(|| {
            info!(
                round,
                pages,
                bytes = stats.bytes,
                ms = stats.elapsed.as_millis() as u64,
                mib_per_s = (bandwidth / (1 << 20) as f64) as u64,
                dirty_after = dirty,
                "pre-copy round"
            )
        });
        wire::write_message(
            writer,
            &Message::Round(RoundReport {
                round,
                remaining_pages: dirty,
            }),
        )
        .await?;
        match decide(round + 1, dirty * PAGE_SIZE, bandwidth, limit) {
            Decision::AnotherRound => continue,
            Decision::Switchover => break,
            Decision::ForcedSwitchover => {
                tracing::warn!(
                    expected_ms = expected.as_millis() as u64,
                    limit_ms = params.downtime_limit_ms,
                    "round cap reached; switching over beyond the downtime limit"
                );
                break;
            }
        }
    }

    let switchover = info_span!("switchover");
    async {
        let paused_at = Instant::now();
        vm.vcpus.pause().await.map_err(local)?;
        shared.switchover.store(true, Ordering::Release);
        shared.emit(Event::new("STOP", None));
        tracker.sync(&vm.machine.vm, &memory).map_err(local)?;
        let last = tracker.take();
        let stats = sender.send(writer, &last, shared).await?;
        let state = vmstate::save(vm)
            .instrument(info_span!("device_state"))
            .await
            .map_err(local)?;
        let state_bytes: usize = state.iter().map(|s| s.data.len()).sum();
        wire::write_message(writer, &Message::State(state)).await?;
        shared.progress().transferred += state_bytes as u64;
        info!(
            pages = stats.pages,
            state_bytes, "final pages and device state sent"
        );
        match answer(reader).await? {
            Message::Restored => Ok(paused_at),
            other => Err(SendError::Protocol(format!(
                "{other:?} instead of RESTORED"
            ))),
        }
    }
    .instrument(switchover)
    .await
}

/// The point of no return: the destination has everything; tell it to take the guest over.
async fn commit(
    mut writer: Writer,
    reader: Reader,
    was_running: bool,
    paused_at: Instant,
    shared: &Shared,
) -> Result<(), SendError> {
    // If the COMMIT cannot be written the destination never got it and will not run the guest,
    // so the source may safely take it back.
    wire::write_message(&mut writer, &Message::Commit(Commit { run: was_running })).await?;
    let _ = writer.shutdown().await;
    drop(reader);
    let downtime = paused_at.elapsed();
    {
        let mut progress = shared.progress();
        progress.downtime = Some(downtime);
        progress.remaining_pages = 0;
    }
    shared.finish(MigrationStatus::Completed, None);
    let progress = shared.progress().clone();
    info!(
        downtime_ms = downtime.as_millis() as u64,
        total_ms = progress.total_time.unwrap_or_default().as_millis() as u64,
        transferred = progress.transferred,
        rounds = progress.dirty_sync_count,
        "migration completed"
    );
    Ok(())
}

/// What one call of [`PageSender::send`] did.
struct SendStats {
    pages: u64,
    bytes: u64,
    elapsed: Duration,
}

impl SendStats {
    fn bandwidth(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }
}

/// Sends pages in frames of up to [`MAX_PAGES_PER_FRAME`], zero pages without data, at most
/// `max-bandwidth` bytes per second.
struct PageSender {
    memory: GuestMemory,
    entries: Vec<PageEntry>,
    data: Vec<u8>,
    frame: Vec<u8>,
}

impl PageSender {
    fn new(memory: GuestMemory) -> Self {
        let capacity = MAX_PAGES_PER_FRAME as usize;
        Self {
            memory,
            entries: Vec::with_capacity(capacity),
            data: Vec::with_capacity(capacity * PAGE_SIZE as usize),
            frame: Vec::with_capacity(capacity * (PAGE_SIZE as usize + 8) + 16),
        }
    }

    async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        pages: &[RegionBitmap],
        shared: &Shared,
    ) -> Result<SendStats, SendError> {
        let started = Instant::now();
        let mut stats = SendStats {
            pages: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
        };
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for gpa in pages.iter().flat_map(RegionBitmap::addresses) {
            self.memory
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(local)?;
            let zero = is_zero(&page);
            if !zero {
                self.data.extend_from_slice(&page);
            }
            self.entries.push(PageEntry { gpa, zero });
            if self.entries.len() == MAX_PAGES_PER_FRAME as usize {
                self.flush(writer, shared, &mut stats, started).await?;
            }
        }
        self.flush(writer, shared, &mut stats, started).await?;
        stats.elapsed = started.elapsed();
        Ok(stats)
    }

    async fn flush<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        shared: &Shared,
        stats: &mut SendStats,
        started: Instant,
    ) -> Result<(), SendError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        wire::encode_pages(&mut self.frame, &self.entries, &self.data);
        let max_bandwidth = shared.params().max_bandwidth;
        if max_bandwidth > 0 {
            // Pace the round so that it never runs ahead of the allowed rate.
            let allowed = Duration::from_secs_f64(
                (stats.bytes + self.frame.len() as u64) as f64 / max_bandwidth as f64,
            );
            tokio::time::sleep_until((started + allowed).into()).await;
        }
        writer
            .write_all(&self.frame)
            .await
            .map_err(wire::WireError::from)?;
        let zero = self.entries.iter().filter(|e| e.zero).count() as u64;
        let count = self.entries.len() as u64;
        stats.pages += count;
        stats.bytes += self.frame.len() as u64;
        {
            let mut progress = shared.progress();
            progress.transferred += self.frame.len() as u64;
            progress.duplicate += zero;
            progress.normal += count - zero;
            progress.remaining_pages = progress.remaining_pages.saturating_sub(count);
        }
        self.entries.clear();
        self.data.clear();
        Ok(())
    }
}

/// Whether a page is all zeros; OR-folding whole words lets the compiler vectorise it.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|chunk| {
        chunk.chunks_exact(8).fold(0u64, |acc, word| {
            acc | u64::from_ne_bytes(word.try_into().expect("8 bytes"))
        }) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[0] = 0x80;
        assert!(!is_zero(&page));
    }
}
