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

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::landing::{Landing, LandingError};
use super::link::Link;
use super::transport::{connect, BoxedStream, Listener};
use super::uri::MigrationUri;
use super::wire::{self, Incoming, LaneHello, LaneOffer, Message, WireError, MAX_LANES};
use super::Shared;
use crate::machine::memory::GuestMemory;
use std::sync::Arc;

/// How long a destination waits for the lanes a source offered to connect.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
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
    /// Everything handed over before this is on its way: a SYNC on this lane.
    Mark,
}

struct SourceLane {
    work: mpsc::Sender<Work>,
    task: Option<JoinHandle<Result<(), WireError>>>,
}

/// The source's lanes, each a task that writes what it is handed, in order.
pub struct SourceLanes {
    lanes: Vec<SourceLane>,
    next: usize,
}

impl SourceLanes {
    /// Connects `offer.count` lanes to the destination at `uri` and introduces each.
    pub async fn open(
        uri: &MigrationUri,
        offer: LaneOffer,
        memory: &GuestMemory,
    ) -> Result<Self, LaneError> {
        let mut lanes = Vec::with_capacity(offer.count as usize);
        for index in 0..offer.count {
            let wire = |source| LaneError::Wire {
                index: index as usize,
                source,
            };
            let stream = connect(uri).await.map_err(|e| wire(WireError::Io(e)))?;
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
        Ok(Self { lanes, next: 0 })
    }

    /// Hands a PAGES frame to the next lane in turn; waits while that lane is still busy.
    /// `pages` must be whole pages of mapped guest RAM.
    pub async fn send_frame(&mut self, head: Vec<u8>, pages: Vec<usize>) -> Result<(), LaneError> {
        let index = self.next;
        self.next = (self.next + 1) % self.lanes.len();
        self.hand(index, Work::Frame { head, pages }).await
    }

    /// Puts a mark behind everything handed to every lane so far.
    pub async fn mark(&mut self) -> Result<(), LaneError> {
        for index in 0..self.lanes.len() {
            self.hand(index, Work::Mark).await?;
        }
        Ok(())
    }

    async fn hand(&mut self, index: usize, work: Work) -> Result<(), LaneError> {
        let lane = &mut self.lanes[index];
        if lane.work.send(work).await.is_ok() {
            return Ok(());
        }
        // The task stopped taking work: it failed, and says why.
        let source = match lane.task.take() {
            Some(task) => match task.await {
                Ok(Err(error)) => error,
                Ok(Ok(())) | Err(_) => WireError::Closed,
            },
            None => WireError::Closed,
        };
        Err(LaneError::Wire { index, source })
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
            // The caller's promise: whole pages of guest RAM, which `_memory` keeps mapped.
            Work::Frame { head, pages } => link.write_pages_frame(&head, &pages).await?,
            Work::Mark => link.send(&Message::Sync).await?,
        }
    }
    link.close().await;
    Ok(())
}

/// The destination's lanes, each a task that lands the pages it reads.
pub struct DestinationLanes {
    marks: Vec<watch::Receiver<u64>>,
    tasks: Vec<Option<JoinHandle<Result<(), LandingError>>>>,
}

impl DestinationLanes {
    /// Accepts the lanes `offer` announced on `listener`, in any order.
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
        let accepting = async {
            for _ in 0..offer.count {
                let (mut stream, peer) = listener
                    .accept()
                    .await
                    .map_err(|e| LaneError::Handshake(format!("accept failed: {e}")))?;
                let hello = introduce(&mut stream)
                    .await
                    .map_err(|e| LaneError::Handshake(format!("connection from {peer}: {e}")))?;
                let slot = streams
                    .get_mut(hello.index as usize)
                    .filter(|slot| hello.session == offer.session && slot.is_none())
                    .ok_or_else(|| {
                        LaneError::Handshake(format!(
                            "connection from {peer} is not one of this migration's page \
                             connections (index {}, session {:#x})",
                            hello.index, hello.session
                        ))
                    })?;
                *slot = Some(stream);
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
        let mut marks = Vec::with_capacity(streams.len());
        let mut tasks = Vec::with_capacity(streams.len());
        for stream in streams.into_iter().flatten() {
            let (reached, mark) = watch::channel(0);
            let task = tokio::spawn(land_lane(
                stream,
                Landing::new(memory.clone()),
                Arc::clone(shared),
                reached,
            ));
            marks.push(mark);
            tasks.push(Some(task));
        }
        Ok(Self { marks, tasks })
    }

    /// Waits until every lane has landed everything before its `mark`-th mark.
    pub async fn reached(&mut self, mark: u64) -> Result<(), LaneError> {
        for index in 0..self.marks.len() {
            if self.marks[index].wait_for(|m| *m >= mark).await.is_ok() {
                continue;
            }
            // The lane's task ended before the mark: it failed, and says why.
            let reason = match self.tasks[index].take() {
                Some(task) => match task.await {
                    Ok(Err(error)) => error.to_string(),
                    Ok(Ok(())) | Err(_) => "closed".to_owned(),
                },
                None => "closed".to_owned(),
            };
            return Err(LaneError::Landing { index, reason });
        }
        Ok(())
    }
}

impl Drop for DestinationLanes {
    fn drop(&mut self) {
        for task in self.tasks.iter_mut().filter_map(Option::take) {
            task.abort();
        }
    }
}

/// Reads a lane's header and LANE.
async fn introduce(stream: &mut BoxedStream) -> Result<LaneHello, WireError> {
    wire::read_header(stream).await?;
    match wire::read_message(stream).await? {
        Message::Lane(hello) => Ok(hello),
        other => Err(WireError::Malformed(format!("{other:?} instead of LANE"))),
    }
}

async fn land_lane(
    mut stream: BoxedStream,
    mut landing: Landing,
    shared: Arc<Shared>,
    reached: watch::Sender<u64>,
) -> Result<(), LandingError> {
    loop {
        match wire::read_incoming(&mut stream).await? {
            Incoming::Pages { entries, data_len } => {
                let bytes = landing.receive(&stream, &entries, data_len).await?;
                shared.progress().count_landed(bytes, &entries);
            }
            Incoming::Message(Message::Sync) => reached.send_modify(|mark| *mark += 1),
            Incoming::Message(other) => {
                return Err(LandingError::Protocol(format!(
                    "{other:?} on a page connection"
                )))
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

    async fn lanes(
        count: u32,
        session: u64,
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
        let offer = LaneOffer { count, session: 7 };
        let source = SourceLanes::open(&uri, LaneOffer { count, session }, &source_memory);
        let shared = shared();
        let destination = DestinationLanes::accept(&listener, offer, &destination_memory, &shared);
        let (destination, source) = tokio::join!(destination, source);
        (destination, source, source_memory, destination_memory, dir)
    }

    #[tokio::test]
    async fn every_lane_has_landed_its_pages_once_the_mark_is_reached() {
        let (destination, source, source_memory, destination_memory, _dir) = lanes(3, 7).await;
        let (mut destination, mut source) = (destination.unwrap(), source.unwrap());
        for round in 0..2u64 {
            // Frames go to the lanes in turn, so each lane gets some of every round's pages.
            for first in (0..6).map(|f| (round * 24 + f * 4) * PAGE_SIZE) {
                let gpas: Vec<u64> = (0..4).map(|p| first + p * PAGE_SIZE).collect();
                let (head, pages) = frame(&source_memory, &gpas);
                source.send_frame(head, pages).await.unwrap();
            }
            source.mark().await.unwrap();
            destination.reached(round + 1).await.unwrap();
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
    async fn a_connection_of_another_migration_is_refused() {
        let (destination, _source, ..) = lanes(2, 8).await;
        let error = destination
            .err()
            .expect("a stranger's connection")
            .to_string();
        assert!(
            error.contains("not one of this migration's page connections"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_lane_that_fails_says_why_at_the_next_mark() {
        let (destination, source, ..) = lanes(2, 7).await;
        let (mut destination, mut source) = (destination.unwrap(), source.unwrap());
        // A frame naming a page outside RAM: the destination's lane must stop on it.
        let outside = PAGES * PAGE_SIZE;
        let entries = [PageEntry {
            gpa: outside,
            zero: true,
        }];
        let mut head = Vec::new();
        wire::encode_pages_head(&mut head, &entries, 0);
        source.send_frame(head, Vec::new()).await.unwrap();
        source.mark().await.unwrap();
        let error = destination.reached(1).await.unwrap_err().to_string();
        assert!(error.contains("outside this VM's RAM"), "{error}");
    }
}
