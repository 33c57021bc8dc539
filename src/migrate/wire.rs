//! The migration stream: a versioned header, then length-prefixed frames.
//!
//! ```text
//! header : "FERRYMIG" | version u32 | reserved u32                       (16 bytes, LE)
//! frame  : tag u32 | length u32 | payload[length]
//! PAGES  : count u32 | reserved u32 | entries: (gpa | ZERO flag) u64 × count
//!          | 4096 bytes for every entry without the ZERO flag, in entry order
//! ZEROS  : count u32 | reserved u32 | runs: (gpa u64, pages u64) × count
//! ```
//!
//! Control frames carry JSON (small, readable in a capture); device state is postcard inside
//! versioned sections. Everything read is checked before use: lengths against limits, page
//! addresses against the guest's RAM by the receiver.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::clock::PeerNanos;
use super::state::{Section, VmDescription};
use crate::machine::memory::PAGE_SIZE;

pub const MAGIC: &[u8; 8] = b"FERRYMIG";
/// The stream version this ferry writes and reads (8: pages may travel on extra connections,
/// LANES and LANE, and round 0's zero runs end with a SYNC; 7: STATE has the ACPI power button,
/// whose press may wait for the guest; 6: STATE says when each part was saved; 5: COMMITTED
/// says when each vCPU ran again; both on the destination's clock, which clock probes relate to
/// the source's).
pub const VERSION: u32 = 8;
/// Pages in one PAGES frame at most.
pub const MAX_PAGES_PER_FRAME: u32 = 1024;
/// The largest frame any message may be: a full PAGES frame and its entries.
pub const MAX_FRAME: u32 = 8 + MAX_PAGES_PER_FRAME * (8 + PAGE_SIZE as u32);
/// Set in a page entry when the page is all zeros and no data follows.
pub const ZERO_PAGE_FLAG: u64 = 1;

const TAG_CONFIG: u32 = 1;
const TAG_ACCEPT: u32 = 2;
const TAG_PAGES: u32 = 3;
const TAG_ROUND: u32 = 4;
const TAG_STATE: u32 = 5;
const TAG_READY: u32 = 6;
const TAG_COMMIT: u32 = 7;
const TAG_ERROR: u32 = 8;
const TAG_CANCEL: u32 = 9;
const TAG_ZEROS: u32 = 10;
const TAG_SYNC: u32 = 11;
const TAG_SYNCED: u32 = 12;
const TAG_COMMITTED: u32 = 13;
const TAG_CLOCK_PROBE: u32 = 14;
const TAG_CLOCK: u32 = 15;
const TAG_LANES: u32 = 16;
const TAG_LANE: u32 = 17;
/// Extra page connections a source may open at most.
pub const MAX_LANES: u32 = 8;
/// Runs of zero pages in one ZEROS frame at most.
pub const MAX_ZERO_RUNS: u32 = 1 << 16;

/// One page of a PAGES frame, with its data unless it is a zero page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    pub gpa: u64,
    pub zero: bool,
}

/// The data of a PAGES frame: the frame's buffer and where the page data starts in it, so that
/// decoding a frame does not move the data.
#[derive(Debug, Clone, Default)]
pub struct PageData {
    buffer: Vec<u8>,
    start: usize,
}

impl PageData {
    pub fn bytes(&self) -> &[u8] {
        &self.buffer[self.start..]
    }
}

impl From<Vec<u8>> for PageData {
    fn from(buffer: Vec<u8>) -> Self {
        Self { buffer, start: 0 }
    }
}

impl PartialEq for PageData {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

/// A frame as the destination reads it: a PAGES frame stops after its page list, so that its
/// page data can go from the socket straight into guest memory.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// A PAGES frame's page list; `data_len` bytes of page data follow on the stream, one page
    /// for every entry without the zero flag, in entry order.
    Pages {
        entries: Vec<PageEntry>,
        data_len: usize,
    },
    Message(Message),
}

/// Progress the source reports at the end of each round, so the destination's `query-migrate`
/// can show it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    pub remaining_pages: u64,
}

/// The source's offer of extra page connections. `session` ties them to this migration: the
/// destination takes no connection that does not name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneOffer {
    pub count: u32,
    pub session: u64,
}

/// The first message on an extra page connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneHello {
    pub index: u32,
    pub session: u64,
}

/// Whether the destination runs the guest once the migration commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub run: bool,
}

/// The destination's confirmation of the commit, with what the source needs to report the
/// downtime the guest saw rather than the round trip's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// When each vCPU went back into the guest on the destination, in vCPU order, on the
    /// destination's migration clock ([`super::clock`]); empty if the guest does not run.
    pub vcpus_running_at_ns: Vec<PeerNanos>,
}

/// A message of the stream.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// Source → destination: the VM, checked before any RAM.
    Config(Box<VmDescription>),
    /// Destination → source: the configuration matches.
    Accept,
    /// Source → destination: guest pages. `data` holds the non-zero pages back to back.
    Pages {
        entries: Vec<PageEntry>,
        data: PageData,
    },
    /// Source → destination: runs of pages that are all zeros, as (first address, page count).
    Zeros(Vec<(u64, u64)>),
    /// Source → destination: answer SYNCED once everything before this is in guest RAM.
    Sync,
    /// Destination → source: everything up to the SYNC is in.
    Synced,
    /// Source → destination: a pre-copy round ended.
    Round(RoundReport),
    /// Source → destination: the state of every part, after the last pages.
    State(Vec<Section>),
    /// Destination → source: every page and the state are in, and the state decodes and fits
    /// this VM (see `vmstate::decode`); it
    /// restores the state while it waits for the commit, and answers that with COMMITTED, or
    /// ERROR if the restore failed or took too long.
    Ready,
    /// Source → destination: the source gave the guest up; run it.
    Commit(Commit),
    /// Destination → source: the destination took the guest over.
    Committed(Committed),
    /// Source → destination, at setup: answer CLOCK with a reading of the migration clock.
    ClockProbe,
    /// Destination → source: its migration clock when it answered a CLOCK_PROBE.
    Clock(PeerNanos),
    /// Source → destination, after ACCEPT: pages will also travel on this many more
    /// connections, which the destination accepts before it answers ACCEPT again.
    Lanes(LaneOffer),
    /// Source → destination, first on each extra connection: which one it is.
    Lane(LaneHello),
    /// Either way: the sender gives up, and says why.
    Error(String),
    /// Source → destination: the operator cancelled the migration.
    Cancel,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a ferry migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error(
        "the stream is version {0}; this ferry speaks version {VERSION}: run the same ferry \
         release on both sides"
    )]
    Version(u32),
    #[error("malformed stream: {0}")]
    Malformed(String),
    #[error("the peer closed the connection")]
    Closed,
    #[error(
        "the peer did not take a whole frame within {} s: its process is frozen or overloaded, \
         or the network stalled",
        .0.as_secs()
    )]
    Stalled(std::time::Duration),
}

fn malformed(reason: impl Into<String>) -> WireError {
    WireError::Malformed(reason.into())
}

/// The 16 bytes every stream starts with.
pub fn header() -> [u8; 16] {
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header
}

pub async fn read_header<R: AsyncRead + Unpin>(input: &mut R) -> Result<(), WireError> {
    let mut header = [0u8; 16];
    read_exact(input, &mut header).await?;
    let magic: [u8; 8] = header[..8].try_into().expect("8 bytes");
    if &magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    Ok(())
}

async fn read_exact<R: AsyncRead + Unpin>(
    input: &mut R,
    buffer: &mut [u8],
) -> Result<(), WireError> {
    match input.read_exact(buffer).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(error) => Err(error.into()),
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("migration control messages always serialize")
}

fn from_json<T: DeserializeOwned>(what: &str, payload: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(payload).map_err(|e| malformed(format!("bad {what} message: {e}")))
}

/// Encodes the PAGES frame for `entries` into `frame` (cleared first), copying the data of the
/// non-zero pages from `data`.
pub fn encode_pages(frame: &mut Vec<u8>, entries: &[PageEntry], data: &[u8]) {
    encode_pages_head(frame, entries, data.len());
    frame.extend_from_slice(data);
}

/// Encodes everything of a PAGES frame but the page data (`data_len` bytes), which the caller
/// writes right after it: the sender streams pages from its own buffer without a copy.
pub fn encode_pages_head(head: &mut Vec<u8>, entries: &[PageEntry], data_len: usize) {
    head.clear();
    let length = 8 + entries.len() * 8 + data_len;
    head.extend_from_slice(&TAG_PAGES.to_le_bytes());
    head.extend_from_slice(&(length as u32).to_le_bytes());
    head.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    for entry in entries {
        let word = entry.gpa | if entry.zero { ZERO_PAGE_FLAG } else { 0 };
        head.extend_from_slice(&word.to_le_bytes());
    }
}

/// The bytes of one message on the wire.
pub fn encode_message(message: &Message) -> Result<Vec<u8>, WireError> {
    let (tag, payload) = match message {
        Message::Config(config) => (TAG_CONFIG, json(config)),
        Message::Accept => (TAG_ACCEPT, Vec::new()),
        Message::Pages { entries, data } => {
            let mut frame = Vec::new();
            encode_pages(&mut frame, entries, data.bytes());
            return Ok(frame);
        }
        Message::Zeros(runs) => {
            let mut payload = Vec::with_capacity(8 + runs.len() * 16);
            payload.extend_from_slice(&(runs.len() as u32).to_le_bytes());
            payload.extend_from_slice(&0u32.to_le_bytes());
            for (gpa, pages) in runs {
                payload.extend_from_slice(&gpa.to_le_bytes());
                payload.extend_from_slice(&pages.to_le_bytes());
            }
            (TAG_ZEROS, payload)
        }
        Message::Sync => (TAG_SYNC, Vec::new()),
        Message::Synced => (TAG_SYNCED, Vec::new()),
        Message::Round(report) => (TAG_ROUND, json(report)),
        Message::State(sections) => (
            TAG_STATE,
            postcard::to_stdvec(sections).map_err(|e| malformed(format!("state: {e}")))?,
        ),
        Message::Ready => (TAG_READY, Vec::new()),
        Message::Commit(commit) => (TAG_COMMIT, json(commit)),
        Message::Committed(committed) => (TAG_COMMITTED, json(committed)),
        Message::ClockProbe => (TAG_CLOCK_PROBE, Vec::new()),
        Message::Clock(reading) => (TAG_CLOCK, reading.to_le_bytes().to_vec()),
        Message::Lanes(offer) => (TAG_LANES, json(offer)),
        Message::Lane(hello) => (TAG_LANE, json(hello)),
        Message::Error(reason) => (TAG_ERROR, json(reason)),
        Message::Cancel => (TAG_CANCEL, Vec::new()),
    };
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| malformed(format!("message of {} bytes is too large", payload.len())))?;
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&tag.to_le_bytes());
    frame.extend_from_slice(&length.to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Writes one message.
pub async fn write_message<W: AsyncWrite + Unpin>(
    out: &mut W,
    message: &Message,
) -> Result<(), WireError> {
    out.write_all(&encode_message(message)?).await?;
    out.flush().await?;
    Ok(())
}

/// Reads one message, checking every length before allocating or using it.
pub async fn read_message<R: AsyncRead + Unpin>(input: &mut R) -> Result<Message, WireError> {
    let (tag, length) = read_frame_head(input).await?;
    read_payload(input, tag, length).await
}

/// Like [`read_message`], but leaves a PAGES frame's page data on the stream for the caller.
pub async fn read_incoming<R: AsyncRead + Unpin>(input: &mut R) -> Result<Incoming, WireError> {
    let (tag, length) = read_frame_head(input).await?;
    if tag != TAG_PAGES {
        return Ok(Incoming::Message(read_payload(input, tag, length).await?));
    }
    let length = length as usize;
    if length < 8 {
        return Err(malformed("PAGES frame shorter than its header"));
    }
    let mut count = [0u8; 8];
    read_exact(input, &mut count).await?;
    let count = page_count(&count)?;
    let entries_end = 8 + count as usize * 8;
    if length < entries_end {
        return Err(malformed("PAGES frame shorter than its page list"));
    }
    let mut words = vec![0u8; count as usize * 8];
    read_exact(input, &mut words).await?;
    let entries = page_list(&words)?;
    let data_len = page_data_len(count, &entries, length)? - entries_end;
    Ok(Incoming::Pages { entries, data_len })
}

async fn read_frame_head<R: AsyncRead + Unpin>(input: &mut R) -> Result<(u32, u32), WireError> {
    let mut head = [0u8; 8];
    read_exact(input, &mut head).await?;
    let tag = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    let length = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if length > MAX_FRAME {
        return Err(malformed(format!(
            "frame of {length} bytes is over the {MAX_FRAME}-byte limit"
        )));
    }
    Ok((tag, length))
}

async fn read_payload<R: AsyncRead + Unpin>(
    input: &mut R,
    tag: u32,
    length: u32,
) -> Result<Message, WireError> {
    let mut payload = vec![0u8; length as usize];
    read_exact(input, &mut payload).await?;
    decode(tag, payload)
}

fn decode(tag: u32, payload: Vec<u8>) -> Result<Message, WireError> {
    let empty = |message: Message| {
        if payload.is_empty() {
            Ok(message)
        } else {
            Err(malformed(format!(
                "{message:?} carries {} unexpected bytes",
                payload.len()
            )))
        }
    };
    match tag {
        TAG_CONFIG => Ok(Message::Config(Box::new(from_json(
            "configuration",
            &payload,
        )?))),
        TAG_ACCEPT => empty(Message::Accept),
        TAG_PAGES => decode_pages(payload),
        TAG_ZEROS => decode_zeros(&payload),
        TAG_SYNC => empty(Message::Sync),
        TAG_SYNCED => empty(Message::Synced),
        TAG_ROUND => Ok(Message::Round(from_json("round", &payload)?)),
        TAG_STATE => postcard::from_bytes(&payload)
            .map(Message::State)
            .map_err(|e| malformed(format!("bad device state: {e}"))),
        TAG_READY => empty(Message::Ready),
        TAG_COMMIT => Ok(Message::Commit(from_json("commit", &payload)?)),
        TAG_COMMITTED => Ok(Message::Committed(from_json("committed", &payload)?)),
        TAG_CLOCK_PROBE => empty(Message::ClockProbe),
        TAG_CLOCK => payload
            .try_into()
            .map(|reading| Message::Clock(u64::from_le_bytes(reading)))
            .map_err(|payload: Vec<u8>| {
                malformed(format!("CLOCK of {} bytes instead of 8", payload.len()))
            }),
        TAG_LANES => Ok(Message::Lanes(from_json("lanes", &payload)?)),
        TAG_LANE => Ok(Message::Lane(from_json("lane", &payload)?)),
        TAG_ERROR => Ok(Message::Error(from_json("error", &payload)?)),
        TAG_CANCEL => empty(Message::Cancel),
        other => Err(malformed(format!("unknown message type {other}"))),
    }
}

fn decode_zeros(payload: &[u8]) -> Result<Message, WireError> {
    if payload.len() < 8 {
        return Err(malformed("ZEROS frame shorter than its header"));
    }
    let count = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
    if count == 0 || count > MAX_ZERO_RUNS {
        return Err(malformed(format!(
            "ZEROS frame with {count} runs (1..={MAX_ZERO_RUNS})"
        )));
    }
    if payload.len() != 8 + count as usize * 16 {
        return Err(malformed(format!(
            "ZEROS frame of {} bytes for {count} runs",
            payload.len()
        )));
    }
    let mut runs = Vec::with_capacity(count as usize);
    for run in payload[8..].chunks_exact(16) {
        let gpa = u64::from_le_bytes(run[..8].try_into().expect("8 bytes"));
        let pages = u64::from_le_bytes(run[8..].try_into().expect("8 bytes"));
        let fits = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| gpa.checked_add(len))
            .is_some();
        if gpa % PAGE_SIZE != 0 || pages == 0 || !fits {
            return Err(malformed(format!(
                "bad zero run of {pages} pages at {gpa:#x}"
            )));
        }
        runs.push((gpa, pages));
    }
    Ok(Message::Zeros(runs))
}

/// The page count at the start of a PAGES payload (count u32, reserved u32).
fn page_count(header: &[u8]) -> Result<u32, WireError> {
    let count = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(malformed(format!(
            "PAGES frame with {count} pages (1..={MAX_PAGES_PER_FRAME})"
        )));
    }
    Ok(count)
}

fn page_list(words: &[u8]) -> Result<Vec<PageEntry>, WireError> {
    let mut entries = Vec::with_capacity(words.len() / 8);
    for word in words.chunks_exact(8) {
        let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        if word & (PAGE_SIZE - 1) & !ZERO_PAGE_FLAG != 0 {
            return Err(malformed(format!("page entry {word:#x} has unknown flags")));
        }
        entries.push(PageEntry {
            gpa: word & !(PAGE_SIZE - 1),
            zero: word & ZERO_PAGE_FLAG != 0,
        });
    }
    Ok(entries)
}

/// Checks that a PAGES payload of `length` bytes holds exactly the data its entries promise;
/// returns that length.
fn page_data_len(count: u32, entries: &[PageEntry], length: usize) -> Result<usize, WireError> {
    let with_data = entries.iter().filter(|e| !e.zero).count();
    let expected = 8 + entries.len() * 8 + with_data * PAGE_SIZE as usize;
    if length != expected {
        return Err(malformed(format!(
            "PAGES frame of {length} bytes for {count} pages ({with_data} with data) should be \
             {expected}"
        )));
    }
    Ok(length)
}

fn decode_pages(payload: Vec<u8>) -> Result<Message, WireError> {
    if payload.len() < 8 {
        return Err(malformed("PAGES frame shorter than its header"));
    }
    let count = page_count(&payload)?;
    let entries_end = 8 + count as usize * 8;
    if payload.len() < entries_end {
        return Err(malformed("PAGES frame shorter than its page list"));
    }
    let entries = page_list(&payload[8..entries_end])?;
    page_data_len(count, &entries, payload.len())?;
    let data = PageData {
        buffer: payload,
        start: entries_end,
    };
    Ok(Message::Pages { entries, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(message: Message) -> Message {
        let mut buffer = Vec::new();
        write_message(&mut buffer, &message).await.unwrap();
        read_message(&mut buffer.as_slice()).await.unwrap()
    }

    #[tokio::test]
    async fn messages_round_trip() {
        let entries = vec![
            PageEntry {
                gpa: 0x1000,
                zero: false,
            },
            PageEntry {
                gpa: 0x5000,
                zero: true,
            },
        ];
        let data = vec![7u8; 4096];
        let pages = Message::Pages {
            entries: entries.clone(),
            data: data.clone().into(),
        };
        assert_eq!(
            round_trip(pages).await,
            Message::Pages {
                entries,
                data: data.into()
            }
        );
        assert_eq!(round_trip(Message::Accept).await, Message::Accept);
        assert_eq!(round_trip(Message::Sync).await, Message::Sync);
        assert_eq!(round_trip(Message::Synced).await, Message::Synced);
        let offer = LaneOffer {
            count: 2,
            session: u64::MAX,
        };
        assert_eq!(
            round_trip(Message::Lanes(offer)).await,
            Message::Lanes(offer)
        );
        let hello = LaneHello {
            index: 1,
            session: 7,
        };
        assert_eq!(round_trip(Message::Lane(hello)).await, Message::Lane(hello));
        let zeros = Message::Zeros(vec![(0x1000, 3), (1 << 32, 1 << 20)]);
        assert_eq!(
            round_trip(zeros).await,
            Message::Zeros(vec![(0x1000, 3), (1 << 32, 1 << 20)])
        );
        assert_eq!(
            round_trip(Message::Error("no".into())).await,
            Message::Error("no".into())
        );
        let commit = Message::Commit(Commit { run: true });
        assert_eq!(
            round_trip(commit).await,
            Message::Commit(Commit { run: true })
        );
        for vcpus_running_at_ns in [vec![1234, 1240], vec![]] {
            let committed = Committed {
                vcpus_running_at_ns,
            };
            assert_eq!(
                round_trip(Message::Committed(committed.clone())).await,
                Message::Committed(committed)
            );
        }
        assert_eq!(round_trip(Message::ClockProbe).await, Message::ClockProbe);
        assert_eq!(
            round_trip(Message::Clock(u64::MAX - 1)).await,
            Message::Clock(u64::MAX - 1)
        );
        let report = RoundReport {
            round: 3,
            remaining_pages: 9,
        };
        assert_eq!(
            round_trip(Message::Round(report)).await,
            Message::Round(report)
        );
    }

    #[tokio::test]
    async fn header_is_checked() {
        let mut buffer = Vec::new();
        buffer.extend_from_slice(&header());
        read_header(&mut buffer.as_slice()).await.unwrap();
        buffer[8] = 9;
        assert!(matches!(
            read_header(&mut buffer.as_slice()).await,
            Err(WireError::Version(9))
        ));
        let garbage = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        assert!(matches!(
            read_header(&mut garbage.as_slice()).await,
            Err(WireError::BadMagic(_))
        ));
        assert!(matches!(
            read_header(&mut &b"FERRY"[..]).await,
            Err(WireError::Closed)
        ));
    }

    fn frame(tag: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = tag.to_le_bytes().to_vec();
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    #[tokio::test]
    async fn hostile_frames_are_refused() {
        let read = |bytes: Vec<u8>| async move { read_message(&mut bytes.as_slice()).await };
        let mut huge = TAG_PAGES.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read(huge).await, Err(WireError::Malformed(_))));
        assert!(matches!(
            read(frame(77, &[])).await,
            Err(WireError::Malformed(_))
        ));
        // A page count that promises more data than the frame holds.
        let mut pages = 2u32.to_le_bytes().to_vec();
        pages.extend_from_slice(&[0; 4]);
        pages.extend_from_slice(&0x1000u64.to_le_bytes());
        pages.extend_from_slice(&0x2000u64.to_le_bytes());
        pages.extend_from_slice(&[1; 4096]);
        assert!(matches!(
            read(frame(TAG_PAGES, &pages)).await,
            Err(WireError::Malformed(_))
        ));
        // Unknown flag bits in an entry.
        let mut flags = 1u32.to_le_bytes().to_vec();
        flags.extend_from_slice(&[0; 4]);
        flags.extend_from_slice(&0x1002u64.to_le_bytes());
        flags.extend_from_slice(&[1; 4096]);
        assert!(matches!(
            read(frame(TAG_PAGES, &flags)).await,
            Err(WireError::Malformed(_))
        ));
        let mut run = 1u32.to_le_bytes().to_vec();
        run.extend_from_slice(&[0; 4]);
        run.extend_from_slice(&u64::MAX.to_le_bytes());
        run.extend_from_slice(&2u64.to_le_bytes());
        assert!(matches!(
            read(frame(TAG_ZEROS, &run)).await,
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            read(frame(TAG_CONFIG, b"{not json")).await,
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            read(frame(TAG_STATE, &[0xff; 3])).await,
            Err(WireError::Malformed(_))
        ));
        // Truncated: the header promises 100 bytes, 10 arrive.
        let mut short = frame(TAG_ERROR, &[b'x'; 100]);
        short.truncate(18);
        assert!(matches!(read(short).await, Err(WireError::Closed)));
    }
}
