//! Cutting a QMP byte stream into top-level JSON values.
//!
//! QEMU parses its input as a stream: a request may be split across reads, several may come
//! in one read, a request may span lines (pretty-printed) or end without a newline. Like
//! QEMU's `json-streamer`, the framer counts brackets outside string literals and cuts when
//! the count returns to zero; the cut bytes are then parsed by serde_json. This is O(n) in the
//! input, unlike re-parsing a growing buffer on every read.
//!
//! Resync rules, so that one bad request never wedges a session:
//! - A top-level value that does not start with `{` or `[` (a scalar, or garbage) ends at the
//!   next newline or at the next `{`/`[` outside a string (QEMU's lexer resyncs there too).
//! - A raw newline inside a string literal ends the frame: JSON forbids it, so the string was
//!   never closed, and the line end is the best place to start over.
//! - A frame over [`MAX_REQUEST_BYTES`] is reported once as [`Frame::Oversize`] and the input
//!   is dropped through the next newline. The rest of a pretty-printed oversize request then
//!   draws errors line by line; line-oriented clients resync at once.
//!
//! An unclosed `{` (a missing `}`) swallows what follows until the brackets balance or the
//! limit is hit, exactly as in QEMU; the size limit bounds that too.

/// The longest request accepted, in bytes. QEMU's own limit is 64 MiB; QMP requests are a
/// few hundred bytes, and a per-session buffer of at most this size keeps many clients cheap.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// One unit of input for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one top-level JSON value, or of input that failed to be one.
    Value(Vec<u8>),
    /// A request longer than the limit; its bytes were dropped.
    Oversize,
}

/// The framing state and the bytes of the frame in progress.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    /// `buf[..start]` is consumed; the frame in progress, if any, starts here.
    start: usize,
    /// `buf[..scanned]` has been classified by `state`.
    scanned: usize,
    state: State,
    limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between values: whitespace is skipped.
    Idle,
    /// Inside a `{...}` or `[...]` value, `depth` brackets deep.
    Nested { depth: u32, string: StringState },
    /// Inside a top-level value that is not an object or array.
    Bare { string: StringState },
    /// Dropping an oversize request up to the next newline.
    Discard,
}

/// Where we are relative to a string literal, so that brackets in strings do not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct StringState {
    inside: bool,
    escaped: bool,
}

/// What one byte did to a string literal.
enum StringStep {
    /// Still inside, or just closed.
    Continue,
    /// A raw newline: the literal was never closed.
    BrokenByNewline,
}

impl StringState {
    /// Advances over `byte`, which is inside a literal.
    fn step(&mut self, byte: u8) -> StringStep {
        if self.escaped {
            self.escaped = false;
        } else if byte == b'\\' {
            self.escaped = true;
        } else if byte == b'"' {
            self.inside = false;
        } else if byte == b'\n' {
            return StringStep::BrokenByNewline;
        }
        StringStep::Continue
    }
}

impl Default for Framer {
    fn default() -> Self {
        Self::with_limit(MAX_REQUEST_BYTES)
    }
}

impl Framer {
    /// A framer that reports frames longer than `limit` bytes as [`Frame::Oversize`].
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            state: State::Idle,
            limit,
        }
    }

    /// Appends input. Consumed bytes are dropped first, so the buffer holds at most the frame
    /// in progress (bounded by the limit) plus `data`.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.drain(..self.start);
        self.scanned -= self.start;
        self.start = 0;
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, or `None` when more input is needed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        while self.scanned < self.buf.len() {
            let at = self.scanned;
            let byte = self.buf[at];
            self.scanned += 1;
            match self.state {
                State::Idle => match byte {
                    b' ' | b'\t' | b'\r' | b'\n' => self.start = self.scanned,
                    b'{' | b'[' => {
                        self.start = at;
                        self.state = State::Nested {
                            depth: 1,
                            string: StringState::default(),
                        };
                    }
                    _ => {
                        // Let the `Bare` arm see this byte too (it may open a string).
                        self.start = at;
                        self.scanned = at;
                        self.state = State::Bare {
                            string: StringState::default(),
                        };
                        continue;
                    }
                },
                State::Discard => {
                    self.start = self.scanned;
                    if byte == b'\n' {
                        self.state = State::Idle;
                    }
                }
                State::Nested {
                    mut depth,
                    mut string,
                } => {
                    // Every byte up to the closing bracket is part of the frame.
                    if at + 1 - self.start > self.limit {
                        return Some(self.oversize(byte));
                    }
                    if string.inside {
                        if let StringStep::BrokenByNewline = string.step(byte) {
                            return Some(self.cut(self.scanned, self.scanned));
                        }
                    } else {
                        match byte {
                            b'"' => string.inside = true,
                            b'{' | b'[' => depth += 1,
                            b'}' | b']' => {
                                depth -= 1;
                                if depth == 0 {
                                    return Some(self.cut(self.scanned, self.scanned));
                                }
                            }
                            _ => {}
                        }
                    }
                    self.state = State::Nested { depth, string };
                }
                State::Bare { mut string } => {
                    if string.inside {
                        if let StringStep::BrokenByNewline = string.step(byte) {
                            return Some(self.cut(at, self.scanned));
                        }
                    } else {
                        match byte {
                            b'"' => string.inside = true,
                            b'\n' => return Some(self.cut(at, self.scanned)),
                            // A resync point: the bytes so far are one bad frame, and the
                            // bracket starts the next one.
                            b'{' | b'[' => return Some(self.cut(at, at)),
                            _ => {}
                        }
                    }
                    // The terminator is not part of the frame, so this checks after it.
                    if at + 1 - self.start > self.limit {
                        return Some(self.oversize(byte));
                    }
                    self.state = State::Bare { string };
                }
            }
        }
        None
    }

    /// Drops the frame in progress, which `byte` took over the limit, and resyncs at the
    /// next newline (this one, if `byte` is a newline).
    fn oversize(&mut self, byte: u8) -> Frame {
        self.state = if byte == b'\n' {
            State::Idle
        } else {
            State::Discard
        };
        self.start = self.scanned;
        Frame::Oversize
    }

    /// At end of input: whatever partial value is left, as a last (bad) frame.
    pub fn finish(&mut self) -> Option<Frame> {
        let state = std::mem::replace(&mut self.state, State::Idle);
        let end = self.buf.len();
        let rest = match state {
            State::Nested { .. } | State::Bare { .. } => Some(self.cut(end, end)),
            State::Idle | State::Discard => None,
        };
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
        rest
    }

    /// Ends the frame in progress at `end` (trailing whitespace trimmed), goes back to `Idle`,
    /// and resumes scanning at `resume`.
    fn cut(&mut self, end: usize, resume: usize) -> Frame {
        let bytes = self.buf[self.start..end].trim_ascii_end().to_vec();
        self.start = resume;
        self.scanned = resume;
        self.state = State::Idle;
        Frame::Value(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Frame {
        Frame::Value(text.as_bytes().to_vec())
    }

    /// Feeds `chunks` one by one, collecting frames after each, then finishes.
    fn frames_of(framer: &mut Framer, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for chunk in chunks {
            framer.push(chunk);
            while let Some(frame) = framer.next_frame() {
                frames.push(frame);
            }
        }
        frames.extend(framer.finish());
        frames
    }

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        frames_of(&mut Framer::default(), chunks)
    }

    #[test]
    fn newline_delimited_and_several_per_read() {
        let input = b"{\"execute\":\"stop\"}\r\n{\"execute\":\"cont\"}\n  \n{\"a\":1}{\"b\":2}";
        assert_eq!(
            frames(&[input]),
            [
                value(r#"{"execute":"stop"}"#),
                value(r#"{"execute":"cont"}"#),
                value(r#"{"a":1}"#),
                value(r#"{"b":2}"#)
            ]
        );
    }

    #[test]
    fn split_across_reads_byte_by_byte() {
        let input = br#"{"execute":"migrate","arguments":{"uri":"unix:/x"}}"#;
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(frames(&chunks), [Frame::Value(input.to_vec())]);
    }

    #[test]
    fn pretty_printed_multi_line_objects() {
        let input = "{\n  \"execute\": \"migrate\",\n  \"arguments\": {\n    \"uri\": \"tcp:h:1\"\n  }\n}\n";
        assert_eq!(frames(&[input.as_bytes()]), [value(input.trim_end())]);
    }

    #[test]
    fn brackets_and_escaped_quotes_inside_strings_do_not_count() {
        let input = r#"{"id":"}{\"[","execute":"x\\"}"#;
        assert_eq!(
            frames(&[input.as_bytes(), b"{}"]),
            [value(input), value("{}")]
        );
    }

    #[test]
    fn bare_values_and_garbage_end_at_a_newline_or_bracket() {
        assert_eq!(
            frames(&[b"42\r\nhello world\n\"a{b\"\n}{\"x\":1}\n[1,2]\ntrue"]),
            [
                value("42"),
                value("hello world"),
                value("\"a{b\""),
                value("}"),
                value(r#"{"x":1}"#),
                value("[1,2]"),
                value("true"),
            ]
        );
    }

    #[test]
    fn a_newline_in_a_string_ends_the_frame() {
        assert_eq!(
            frames(&[b"{\"execute\":\"stop\n{\"execute\":\"cont\"}\n\"abc\ndef\n"]),
            [
                value("{\"execute\":\"stop"),
                value(r#"{"execute":"cont"}"#),
                value("\"abc"),
                value("def"),
            ]
        );
    }

    #[test]
    fn oversize_is_reported_once_then_resyncs_at_the_newline() {
        let mut framer = Framer::with_limit(16);
        let big = format!("{{\"execute\":\"{}\"}}", "x".repeat(100));
        let input = format!("{big}{big}\n{{\"ok\":1}}\n");
        assert_eq!(
            frames_of(&mut framer, &[input.as_bytes()]),
            [Frame::Oversize, value(r#"{"ok":1}"#)]
        );
        // Arriving in pieces, and at exactly the limit.
        let chunks: Vec<&[u8]> = input.as_bytes().chunks(7).collect();
        assert_eq!(
            frames_of(&mut framer, &chunks),
            [Frame::Oversize, value(r#"{"ok":1}"#)]
        );
        let exact = r#"{"a":"123456789"}"#;
        assert_eq!(exact.len(), 17);
        assert_eq!(
            frames_of(&mut framer, &[exact.as_bytes()]),
            [Frame::Oversize]
        );
        assert_eq!(
            frames_of(&mut framer, &[&exact.as_bytes()[1..]]),
            [value(&exact[1..])]
        );
    }

    #[test]
    fn garbage_without_newline_is_bounded_too() {
        let mut framer = Framer::with_limit(8);
        assert_eq!(
            frames_of(&mut framer, &[b"abcdefghijkl", b"mnop\n1\n"]),
            [Frame::Oversize, value("1")]
        );
    }

    #[test]
    fn the_buffer_holds_only_the_frame_in_progress() {
        let mut framer = Framer::with_limit(64);
        for _ in 0..1000 {
            framer.push(b"{\"execute\":\"query-status\"}\n   {\"exec");
            while framer.next_frame().is_some() {}
            framer.push(b"ute\":\"x\"}\n");
            while framer.next_frame().is_some() {}
        }
        framer.push(b"");
        assert!(framer.buf.is_empty(), "{:?}", framer.buf);
        framer.push(&[b'x'; 10_000]);
        assert_eq!(framer.next_frame(), Some(Frame::Oversize));
        assert_eq!(framer.next_frame(), None);
        framer.push(b"");
        assert!(framer.buf.is_empty());
    }

    #[test]
    fn finish_reports_an_unterminated_value() {
        assert_eq!(
            frames(&[b"{\"execute\":\"st"]),
            [value("{\"execute\":\"st")]
        );
        assert_eq!(frames(&[b"   \n"]), []);
    }
}
