//! Guest pages over several connections at once (QEMU's multifd): one connection is one
//! sending thread's worth of copying, and on a host where the source's copy into the socket is
//! the slowest step, a second connection lets a second core copy too.
//!
//! The first connection stays the control link: configuration, zero runs, rounds, clock probes,
//! device state and the commit. Each lane carries PAGES frames and marks (a SYNC frame) and
//! nothing else. Pages need no order across lanes: a page is sent at most once per round, and
//! every round ends with a mark on each lane before the SYNC on the control link, which the
//! destination answers only once every lane has landed up to that mark. The device state
//! follows a mark the same way, so no page is in flight when the guest is restored.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::arrival::{Introduced, Introductions};
use super::landing::{Landing, LandingError};
use super::link::Link;
use super::transport::{connect, connect_tcp, BoxedStream, Listener};
use super::uri::MigrationUri;
use super::wire::{self, Incoming, LaneHello, LaneOffer, Message, WireError, MAX_LANES};
use super::Shared;
use crate::machine::memory::GuestMemory;

/// How long a destination waits for the lanes a source offered to connect.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connection gets to say it is one of them.
const INTRODUCE_DEADLINE: Duration = Duration::from_secs(1);
/// Frames queued per lane: one being written, one ready behind it.
const QUEUED_FRAMES: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("page connection {index}: {source}")]
    Wire {
        index: usize,
        #[source]
        source: WireError,
    },
    #[error("page connection {index}: {reason}")]
    Landing { index: usize, reason: String },
    #[error("{0}")]
    Handshake(String),
}

/// What the source's page building hands to a lane.
enum Work {
    /// A PAGES frame: its head, then the guest pages at these host addresses.
    Frame { head: Vec<u8>, pages: Vec<usize> },
    /// Everything handed over before this is on its way: a SYNC on this lane, and word back
    /// once it is written.
    Mark(oneshot::Sender<()>),
}

struct SourceLane {
    work: mpsc::Sender<Work>,
    task: Option<JoinHandle<Result<(), WireError>>>,
}

/// The source's lanes, each a task that writes what it is handed, in order.
pub struct SourceLanes {
    lanes: Vec<SourceLane>,
    next: usize,
    /// Marks handed over whose lanes have not yet said they wrote them.
    unwritten: Vec<(usize, oneshot::Receiver<()>)>,
}

impl SourceLanes {
    /// Connects `offer.count` lanes to the destination the control link `control` reached
    /// through `uri`, and introduces each.
    pub async fn open(
        uri: &MigrationUri,
        control: Option<SocketAddr>,
        offer: LaneOffer,
        memory: &GuestMemory,
    ) -> Result<Self, LaneError> {
        let mut lanes = Vec::with_capacity(offer.count as usize);
        for index in 0..offer.count {
            let wire = |source| LaneError::Wire {
                index: index as usize,
                source,
            };
            let stream = match control {
                Some(peer) => connect_tcp(peer).await,
                None => connect(uri).await,
            }
            .map_err(|e| wire(WireError::Io(e)))?;
            let mut link = Link::new(stream);
            link.write_frames(&wire::header()).await.map_err(wire)?;
            let hello = LaneHello {
                index,
                session: offer.session,
            };
            link.send(&Message::Lane(hello)).await.map_err(wire)?;
            let (work, queue) = mpsc::channel(QUEUED_FRAMES);
            // The task keeps guest RAM mapped for as long as it may still read from it.
            let task = tokio::spawn(write_lane(link, queue, memory.clone()));
            lanes.push(SourceLane {
                work,
                task: Some(task),
            });
        }
        Ok(Self {
            lanes,
            next: 0,
            unwritten: Vec::new(),
        })
    }

    /// Hands a PAGES frame to the next lane in turn; waits while that lane is still busy.
    ///
    /// # Safety
    ///
    /// `pages` must be host addresses of whole pages of the guest RAM these lanes were opened
    /// with: the lane reads them later, on its own task.
    pub async unsafe fn send_frame(
        &mut self,
        head: Vec<u8>,
        pages: Vec<usize>,
    ) -> Result<(), LaneError> {
        let index = self.next;
        self.next = (self.next + 1) % self.lanes.len();
        self.hand(index, Work::Frame { head, pages }).await
    }

    /// Puts a mark behind everything handed to every lane so far.
    pub async fn mark(&mut self) -> Result<(), LaneError> {
        for index in 0..self.lanes.len() {
            let (written, heard) = oneshot::channel();
            self.hand(index, Work::Mark(written)).await?;
            self.unwritten.push((index, heard));
        }
        Ok(())
    }

    /// Waits until every lane has written the marks handed to it. Each frame's write has its
    /// own deadline, so this ends; a wait for the destination's answer that starts only then
    /// is not eaten up by the megabytes a slow link still had queued.
    pub async fn marks_written(&mut self) -> Result<(), LaneError> {
        for (index, heard) in std::mem::take(&mut self.unwritten) {
            if heard.await.is_err() {
                return Err(self.failure(index).await);
            }
        }
        Ok(())
    }

    async fn hand(&mut self, index: usize, work: Work) -> Result<(), LaneError> {
        if self.lanes[index].work.send(work).await.is_ok() {
            return Ok(());
        }
        Err(self.failure(index).await)
    }

    /// Why the lane `index`, which stopped taking work, failed.
    async fn failure(&mut self, index: usize) -> LaneError {
        let source = match self.lanes[index].task.take() {
            Some(task) => match task.await {
                Ok(Err(error)) => error,
                Ok(Ok(())) | Err(_) => WireError::Closed,
            },
            None => WireError::Closed,
        };
        LaneError::Wire { index, source }
    }
}

impl Drop for SourceLanes {
    /// A lane stops with the migration that owns it (a cancel drops it mid-round).
    fn drop(&mut self) {
        for task in self.lanes.iter_mut().filter_map(|lane| lane.task.take()) {
            task.abort();
        }
    }
}

async fn write_lane(
    mut link: Link,
    mut queue: mpsc::Receiver<Work>,
    _memory: GuestMemory,
) -> Result<(), WireError> {
    while let Some(work) = queue.recv().await {
        match work {
            // `send_frame`'s contract: whole pages of guest RAM, which `_memory` keeps mapped.
            Work::Frame { head, pages } => link.write_pages_frame(&head, &pages).await?,
            Work::Mark(written) => {
                link.send(&Message::Sync).await?;
                // Nobody listening means the migration stopped waiting; not this lane's error.
                let _ = written.send(());
            }
        }
        // A socket with room takes a frame without an await in between, and a copy of 4 MiB
        // holds a worker thread for a millisecond or two: two lanes would keep both of the
        // runtime's threads from QMP and from `migrate_cancel`.
        tokio::task::yield_now().await;
    }
    // Not reached while the lanes' owner lives: dropping it aborts this task first.
    Ok(())
}

/// The destination's lanes, each a task that lands the pages it reads.
pub struct DestinationLanes {
    marks: Vec<watch::Receiver<u64>>,
    tasks: Vec<JoinHandle<()>>,
    /// Why a lane stopped; each task sends its reason before it lets go of its marks.
    failures: mpsc::UnboundedReceiver<LaneError>,
}

impl DestinationLanes {
    /// Accepts the lanes `offer` announced on `listener`, in any order. A connection that is
    /// not one of them (a probe, another source) is dropped, and the wait goes on.
    pub async fn accept(
        listener: &Listener,
        offer: LaneOffer,
        memory: &GuestMemory,
        shared: &Arc<Shared>,
    ) -> Result<Self, LaneError> {
        if offer.count == 0 || offer.count > MAX_LANES {
            return Err(LaneError::Handshake(format!(
                "the source offered {} page connections; this ferry takes 1 to {MAX_LANES}",
                offer.count
            )));
        }
        let mut streams: Vec<Option<BoxedStream>> = (0..offer.count).map(|_| None).collect();
        let mut introductions = Introductions::new(listener, introduce, INTRODUCE_DEADLINE);
        let accepting = async {
            while streams.iter().any(Option::is_none) {
                let Introduced { stream, peer, said } = introductions
                    .next()
                    .await
                    .map_err(|e| LaneError::Handshake(format!("accept failed: {e}")))?;
                let slot = match &said {
                    Some(Ok(hello)) if hello.session == offer.session => streams
                        .get_mut(hello.index as usize)
                        .filter(|slot| slot.is_none()),
                    _ => None,
                };
                match slot {
                    Some(slot) => *slot = Some(stream),
                    None => tracing::warn!(
                        %peer,
                        ?said,
                        "dropped a connection that is not one of this migration's page \
                         connections, or repeats one"
                    ),
                }
            }
            Ok::<(), LaneError>(())
        };
        tokio::time::timeout(CONNECT_DEADLINE, accepting)
            .await
            .map_err(|_| {
                LaneError::Handshake(format!(
                    "the source's {} page connections did not all arrive within {} s",
                    offer.count,
                    CONNECT_DEADLINE.as_secs()
                ))
            })??;
        let (failed, failures) = mpsc::unbounded_channel();
        let mut marks = Vec::with_capacity(streams.len());
        let mut tasks = Vec::with_capacity(streams.len());
        for (index, stream) in streams.into_iter().flatten().enumerate() {
            let (reached, mark) = watch::channel(0);
            let lane = Lane {
                index,
                landing: Landing::new(memory.clone()),
                shared: Arc::clone(shared),
                reached,
            };
            tasks.push(tokio::spawn(lane.run(stream, failed.clone())));
            marks.push(mark);
        }
        Ok(Self {
            marks,
            tasks,
            failures,
        })
    }

    /// Waits until every lane has landed everything before its `mark`-th mark, or until one
    /// fails (while another is still short of the mark).
    pub async fn reached(&mut self, mark: u64) -> Result<(), LaneError> {
        let marks = &mut self.marks;
        let all = async {
            for mark_of_lane in marks.iter_mut() {
                // An error: the lane's task ended before the mark, having sent why.
                if mark_of_lane.wait_for(|m| *m >= mark).await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::select! {
            true = all => Ok(()),
            failure = next_failure(&mut self.failures) => Err(failure),
        }
    }

    /// Resolves when a lane fails: the migration cannot complete without its pages.
    pub async fn failed(&mut self) -> LaneError {
        next_failure(&mut self.failures).await
    }

    /// Stops every lane and waits until none can touch guest RAM any more: nothing may land once
    /// the guest runs. The lanes are all told first, so that they end together.
    pub async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for DestinationLanes {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The next lane failure. Every task holds a sender until it has sent its reason, so the
/// channel closes without one only if every task ended without a word (a panic).
async fn next_failure(failures: &mut mpsc::UnboundedReceiver<LaneError>) -> LaneError {
    failures.recv().await.unwrap_or(LaneError::Landing {
        index: 0,
        reason: "stopped".into(),
    })
}

/// Reads a lane's header and LANE.
fn introduce(stream: &mut BoxedStream) -> BoxFuture<'_, Result<LaneHello, WireError>> {
    Box::pin(async move {
        wire::read_header(stream).await?;
        match wire::read_message(stream).await? {
            Message::Lane(hello) => Ok(hello),
            other => Err(WireError::Malformed(format!("{other:?} instead of LANE"))),
        }
    })
}

/// One destination lane.
struct Lane {
    index: usize,
    landing: Landing,
    shared: Arc<Shared>,
    /// How many marks the lane has passed, everything before them landed.
    reached: watch::Sender<u64>,
}

impl Lane {
    async fn run(mut self, stream: BoxedStream, failed: mpsc::UnboundedSender<LaneError>) {
        let Err(error) = self.land(stream).await;
        tracing::debug!(lane = self.index, %error, "page connection ended");
        let reason = error.to_string();
        let _ = failed.send(LaneError::Landing {
            index: self.index,
            reason,
        });
    }

    async fn land(&mut self, mut stream: BoxedStream) -> Result<Infallible, LandingError> {
        loop {
            match wire::read_incoming(&mut stream).await? {
                // Pages follow round 0's zero runs, which end with the first mark.
                Incoming::Pages { .. } if *self.reached.borrow() == 0 => {
                    return Err(LandingError::Protocol(
                        "page data before round 0's first mark".into(),
                    ))
                }
                Incoming::Pages { entries, data_len } => {
                    let bytes = self.landing.receive(&stream, &entries, data_len).await?;
                    self.shared.progress().count_landed(bytes, &entries);
                }
                Incoming::Message(Message::Sync) => self.reached.send_modify(|mark| *mark += 1),
                Incoming::Message(other) => {
                    return Err(LandingError::Protocol(format!(
                        "{other:?} on a page connection"
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::machine::memory::PAGE_SIZE;
    use crate::migrate::wire::PageEntry;
    use crate::runtime::control::VmHandle;

    const PAGES: u64 = 64;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)]).unwrap()
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared::new(VmHandle::new(None).0, false))
    }

    /// A PAGES frame for `gpas`, each page holding its own number, as `send_frame` takes it.
    fn frame(memory: &GuestMemory, gpas: &[u64]) -> (Vec<u8>, Vec<usize>) {
        let entries: Vec<PageEntry> = gpas
            .iter()
            .map(|&gpa| PageEntry { gpa, zero: false })
            .collect();
        let pages = gpas
            .iter()
            .map(|&gpa| {
                let page = [(gpa / PAGE_SIZE) as u8 + 1; PAGE_SIZE as usize];
                memory.write_slice(&page, GuestAddress(gpa)).unwrap();
                let slice = memory.get_slice(GuestAddress(gpa), PAGE_SIZE as usize);
                slice.unwrap().ptr_guard().as_ptr() as usize
            })
            .collect();
        let mut head = Vec::new();
        wire::encode_pages_head(&mut head, &entries, gpas.len() * PAGE_SIZE as usize);
        (head, pages)
    }

    fn first_byte(memory: &GuestMemory, gpa: u64) -> u8 {
        memory.read_obj(GuestAddress(gpa)).unwrap()
    }

    /// A destination expecting `count` lanes of session 7, and a source opening them with
    /// `session`, after `strangers` connections of another migration.
    async fn lanes(
        count: u32,
        session: u64,
        strangers: u32,
    ) -> (
        Result<DestinationLanes, LaneError>,
        Result<SourceLanes, LaneError>,
        GuestMemory,
        GuestMemory,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrationUri::Unix(dir.path().join("lanes.sock"));
        let listener = Listener::bind(&uri).await.unwrap();
        let (source_memory, destination_memory) = (memory(), memory());
        let stranger = LaneOffer {
            count: strangers,
            session: 99,
        };
        let _strangers = SourceLanes::open(&uri, None, stranger, &source_memory)
            .await
            .unwrap();
        let offer = LaneOffer { count, session: 7 };
        let source = SourceLanes::open(&uri, None, LaneOffer { count, session }, &source_memory);
        let shared = shared();
        let destination = DestinationLanes::accept(&listener, offer, &destination_memory, &shared);
        let (destination, source) = tokio::join!(destination, source);
        (destination, source, source_memory, destination_memory, dir)
    }

    #[tokio::test]
    async fn every_lane_has_landed_its_pages_once_the_mark_is_reached() {
        let (destination, source, source_memory, destination_memory, _dir) = lanes(3, 7, 0).await;
        let (mut destination, mut source) = (destination.unwrap(), source.unwrap());
        // Round 0's zero runs end with a mark before any page.
        source.mark().await.unwrap();
        destination.reached(1).await.unwrap();
        for round in 0..2u64 {
            // Frames go to the lanes in turn, so each lane gets some of every round's pages.
            for first in (0..6).map(|f| (round * 24 + f * 4) * PAGE_SIZE) {
                let gpas: Vec<u64> = (0..4).map(|p| first + p * PAGE_SIZE).collect();
                let (head, pages) = frame(&source_memory, &gpas);
                // SAFETY: `frame` takes the pages' addresses from the lanes' guest RAM.
                unsafe { source.send_frame(head, pages) }.await.unwrap();
            }
            source.mark().await.unwrap();
            source.marks_written().await.unwrap();
            destination.reached(round + 2).await.unwrap();
            for page in 0..(round + 1) * 24 {
                let gpa = page * PAGE_SIZE;
                assert_eq!(
                    first_byte(&destination_memory, gpa),
                    first_byte(&source_memory, gpa),
                    "page {page} after round {round}"
                );
            }
        }
        assert_eq!(first_byte(&destination_memory, 48 * PAGE_SIZE), 0);
    }

    #[tokio::test]
    async fn connections_of_another_migration_are_dropped_and_the_lanes_still_taken() {
        let (destination, source, ..) = lanes(2, 7, 2).await;
        let (mut destination, mut source) = (destination.unwrap(), source.unwrap());
        source.mark().await.unwrap();
        // A stranger taken for a lane would never send the mark.
        let reached = tokio::time::timeout(Duration::from_secs(5), destination.reached(1));
        reached.await.expect("the real lanes' marks").unwrap();
    }

    #[tokio::test]
    async fn connections_that_say_nothing_hold_up_no_lane() {
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrationUri::Unix(dir.path().join("lanes.sock"));
        let listener = Listener::bind(&uri).await.unwrap();
        let MigrationUri::Unix(path) = &uri else {
            unreachable!()
        };
        // More than CONNECT_DEADLINE / INTRODUCE_DEADLINE: waited out one after the other,
        // they would use up the whole wait for the lanes.
        let mut silent = Vec::new();
        for _ in 0..12 {
            silent.push(tokio::net::UnixStream::connect(path).await.unwrap());
        }
        let (source_memory, destination_memory) = (memory(), memory());
        let offer = LaneOffer {
            count: 2,
            session: 7,
        };
        let source = SourceLanes::open(&uri, None, offer, &source_memory);
        let shared = shared();
        let destination = DestinationLanes::accept(&listener, offer, &destination_memory, &shared);
        let (destination, source) = tokio::join!(destination, source);
        let (mut destination, mut source) = (destination.unwrap(), source.unwrap());
        source.mark().await.unwrap();
        destination.reached(1).await.unwrap();
        drop(silent);
    }

    #[tokio::test]
    async fn a_lane_that_fails_says_why_at_the_next_mark() {
        let (destination, source, ..) = lanes(2, 7, 0).await;
        let (mut destination, mut source) = (destination.unwrap(), source.unwrap());
        source.mark().await.unwrap();
        destination.reached(1).await.unwrap();
        // A frame naming a page outside RAM: the destination's lane must stop on it.
        let outside = PAGES * PAGE_SIZE;
        let entries = [PageEntry {
            gpa: outside,
            zero: true,
        }];
        let mut head = Vec::new();
        wire::encode_pages_head(&mut head, &entries, 0);
        // SAFETY: no pages to read.
        unsafe { source.send_frame(head, Vec::new()) }
            .await
            .unwrap();
        source.mark().await.unwrap();
        let error = destination.reached(2).await.unwrap_err().to_string();
        assert!(error.contains("outside this VM's RAM"), "{error}");
    }

    #[tokio::test]
    async fn pages_before_the_first_mark_are_refused() {
        let (destination, source, source_memory, ..) = lanes(1, 7, 0).await;
        let (mut destination, mut source) = (destination.unwrap(), source.unwrap());
        let (head, pages) = frame(&source_memory, &[0]);
        // SAFETY: `frame` takes the page's address from the lanes' guest RAM.
        unsafe { source.send_frame(head, pages) }.await.unwrap();
        source.mark().await.unwrap();
        let error = destination.reached(1).await.unwrap_err().to_string();
        assert!(error.contains("before round 0's first mark"), "{error}");
    }
}
