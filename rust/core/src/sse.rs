//! Incremental Server-Sent-Events parser following the WHATWG EventSource
//! processing model (<https://html.spec.whatwg.org/multipage/server-sent-events.html>).
//!
//! The parser is fed arbitrary byte chunks (1 byte to megabytes) and calls a
//! sink once per dispatched event. It never panics on input: every byte
//! sequence is either an event stream or leaves a partial event that
//! [`SseParser::finish`] reports as truncated.
//!
//! Deviations from the browser algorithm, on purpose: payload bytes are
//! passed through unchanged instead of being decoded with U+FFFD replacement,
//! so that invalid UTF-8 reaches the JSON layer and is reported as an error
//! instead of being silently altered; and one event (its data plus the line
//! being read) may hold at most `max_event_bytes`, so a server that never
//! sends a newline cannot make the client buffer without bound.

use std::fmt;

use memchr::memchr2;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// Default cap on one event's buffered bytes: far above any vLLM event (a
/// few KiB, a few MiB with large top-logprobs or masks), far below memory.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 << 20;

/// An event grew past the parser's `max_event_bytes` without its blank line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTooLarge {
    /// Absolute offset of the event's first byte.
    pub offset: u64,
    pub limit: usize,
}

impl fmt::Display for EventTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event exceeds max_event_bytes={} without ending (no blank line)", self.limit)
    }
}

impl std::error::Error for EventTooLarge {}

/// One dispatched event. Borrowed from the parser's buffers: valid only for
/// the duration of the sink call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, or `b"message"` when none was given.
    pub event_type: &'a [u8],
    /// The joined `data:` lines, without the final newline.
    pub data: &'a [u8],
    /// The last event id seen so far on this stream (it persists across events).
    pub last_event_id: &'a [u8],
    /// Absolute byte offset in the stream of the first byte of this event.
    pub offset: u64,
    /// Absolute byte offset of the first byte of the first `data` value, used
    /// to point errors in the payload at the right place.
    pub data_offset: u64,
}

/// What the stream looked like when it ended, as seen by [`SseParser::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEnd {
    /// Ended on an event boundary.
    Clean,
    /// Ended inside a line or inside an event whose blank line never came.
    Truncated { offset: u64, pending_bytes: usize },
}

/// Incremental WHATWG SSE parser.
///
/// Invariants: `carry` holds the bytes of the current, unterminated line and
/// nothing else; every complete line has been processed; `carry` plus `data`
/// never exceed `max_event_bytes` (past it, feeding fails).
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    carry: Vec<u8>,
    carry_start: u64,
    data: Vec<u8>,
    has_data: bool,
    data_offset: u64,
    event_type: Vec<u8>,
    last_event_id: Vec<u8>,
    retry_ms: Option<u64>,
    /// A field line of the current event has been seen (for truncation and offsets).
    in_event: bool,
    event_start: u64,
    /// The previous chunk ended with CR: a leading LF of the next chunk belongs to it.
    skip_lf: bool,
    /// Bytes of the stream consumed so far.
    consumed: u64,
    bom_checked: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser that fails with [`EventTooLarge`] once one event's buffered
    /// bytes (its data and the line being read) exceed `max_event_bytes`.
    pub fn with_max_event_bytes(max_event_bytes: usize) -> Self {
        SseParser {
            max_event_bytes,
            carry: Vec::new(),
            carry_start: 0,
            data: Vec::new(),
            has_data: false,
            data_offset: 0,
            event_type: Vec::new(),
            last_event_id: Vec::new(),
            retry_ms: None,
            in_event: false,
            event_start: 0,
            skip_lf: false,
            consumed: 0,
            bom_checked: false,
        }
    }

    /// The reconnection time requested by the last valid `retry:` field.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Feed the next chunk; `sink` is called for each event dispatched by it.
    /// The sink's error aborts parsing and is returned unchanged; an event
    /// past the size cap is returned as `E::from(EventTooLarge)`.
    pub fn feed<E, F>(&mut self, mut chunk: &[u8], mut sink: F) -> Result<(), E>
    where
        E: From<EventTooLarge>,
        F: FnMut(SseEvent<'_>) -> Result<(), E>,
    {
        let mut base = self.consumed;
        self.consumed += chunk.len() as u64;
        if !self.bom_checked {
            // The BOM may itself be split over chunks: hold bytes back until
            // three are known or they stop matching.
            let have = self.carry.len();
            let take = chunk.len().min(3 - have);
            self.carry.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            base += take as u64;
            if self.carry.len() < 3 && BOM.starts_with(&self.carry) {
                return Ok(());
            }
            self.bom_checked = true;
            let held = std::mem::take(&mut self.carry);
            let body: &[u8] = if held == BOM { &[] } else { &held };
            let held_base = base - held.len() as u64;
            let body_base = held_base + (held.len() - body.len()) as u64;
            self.feed_lines(body, body_base, &mut sink)?;
        }
        self.feed_lines(chunk, base, &mut sink)
    }

    fn feed_lines<E, F>(&mut self, chunk: &[u8], base: u64, sink: &mut F) -> Result<(), E>
    where
        E: From<EventTooLarge>,
        F: FnMut(SseEvent<'_>) -> Result<(), E>,
    {
        let mut pos = 0usize;
        if self.skip_lf {
            if let Some(&first) = chunk.first() {
                self.skip_lf = false;
                if first == b'\n' {
                    pos = 1;
                }
            }
        }
        while pos < chunk.len() {
            let rest = &chunk[pos..];
            let Some(eol) = memchr2(b'\n', b'\r', rest) else {
                if self.carry.is_empty() {
                    self.carry_start = base + pos as u64;
                }
                self.check_size(rest.len())?;
                self.carry.extend_from_slice(rest);
                return Ok(());
            };
            let line_start = base + pos as u64;
            let terminator = rest[eol];
            let mut next = pos + eol + 1;
            if terminator == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            if self.carry.is_empty() {
                self.process_line(&rest[..eol], line_start, sink)?;
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(&rest[..eol]);
                let start = self.carry_start;
                let res = self.process_line(&line, start, sink);
                line.clear();
                self.carry = line;
                res?;
            }
            pos = next;
        }
        Ok(())
    }

    fn process_line<E, F>(&mut self, line: &[u8], line_offset: u64, sink: &mut F) -> Result<(), E>
    where
        E: From<EventTooLarge>,
        F: FnMut(SseEvent<'_>) -> Result<(), E>,
    {
        if line.is_empty() {
            return self.dispatch(sink);
        }
        if !self.in_event {
            self.in_event = true;
            self.event_start = line_offset;
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, mut value, value_offset) = match memchr::memchr(b':', line) {
            Some(colon) => (&line[..colon], &line[colon + 1..], line_offset + colon as u64 + 1),
            None => (line, &line[line.len()..], line_offset + line.len() as u64),
        };
        let mut value_offset = value_offset;
        if value.first() == Some(&b' ') {
            value = &value[1..];
            value_offset += 1;
        }
        match field {
            b"data" => {
                self.check_size(value.len() + 1)?;
                if !self.has_data {
                    self.has_data = true;
                    self.data_offset = value_offset;
                } else {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
            }
            b"event" => {
                self.event_type.clear();
                self.event_type.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => {
                self.last_event_id.clear();
                self.last_event_id.extend_from_slice(value);
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                // Absurdly long digit strings saturate instead of overflowing.
                let ms = value.iter().fold(0u64, |acc, d| acc.saturating_mul(10).saturating_add(u64::from(d - b'0')));
                self.retry_ms = Some(ms);
            }
            _ => {}
        }
        Ok(())
    }

    /// Fail when `more` bytes would take the current event (its data plus
    /// the unterminated line) past the cap.
    fn check_size(&self, more: usize) -> Result<(), EventTooLarge> {
        let total = self.carry.len().saturating_add(self.data.len()).saturating_add(more);
        if total > self.max_event_bytes {
            let offset = if self.in_event { self.event_start } else { self.carry_start };
            return Err(EventTooLarge { offset, limit: self.max_event_bytes });
        }
        Ok(())
    }

    fn dispatch<E, F>(&mut self, sink: &mut F) -> Result<(), E>
    where
        F: FnMut(SseEvent<'_>) -> Result<(), E>,
    {
        let had_data = self.has_data;
        let offset = self.event_start;
        self.in_event = false;
        self.has_data = false;
        if !had_data {
            // Per the spec an event without data is not dispatched.
            self.event_type.clear();
            self.data.clear();
            return Ok(());
        }
        let event_type: &[u8] = if self.event_type.is_empty() { b"message" } else { &self.event_type };
        let res = sink(SseEvent {
            event_type,
            data: &self.data,
            last_event_id: &self.last_event_id,
            offset,
            data_offset: self.data_offset,
        });
        self.event_type.clear();
        self.data.clear();
        res
    }

    /// Declare the end of the stream. Reports whether it ended on an event
    /// boundary; an unfinished event is discarded (never dispatched), as the
    /// spec requires, but the caller learns about it.
    pub fn finish(&mut self) -> SseEnd {
        let pending = self.carry.len();
        let truncated = pending > 0 || self.in_event;
        let offset = if pending > 0 && !self.in_event { self.carry_start } else { self.event_start };
        let pending_bytes = pending + self.data.len();
        self.carry.clear();
        self.data.clear();
        self.event_type.clear();
        self.has_data = false;
        self.in_event = false;
        if truncated {
            SseEnd::Truncated { offset, pending_bytes }
        } else {
            SseEnd::Clean
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Clone)]
    struct Ev {
        ty: String,
        data: String,
        id: String,
        offset: u64,
    }

    fn parse_chunks(chunks: &[&[u8]]) -> (Vec<Ev>, SseEnd) {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed::<EventTooLarge, _>(c, |e| {
                out.push(Ev {
                    ty: String::from_utf8_lossy(e.event_type).into(),
                    data: String::from_utf8_lossy(e.data).into(),
                    id: String::from_utf8_lossy(e.last_event_id).into(),
                    offset: e.offset,
                });
                Ok(())
            })
            .unwrap();
        }
        let end = p.finish();
        (out, end)
    }

    fn parse(body: &[u8]) -> (Vec<Ev>, SseEnd) {
        parse_chunks(&[body])
    }

    #[test]
    fn simple_events_with_all_line_endings() {
        for body in [&b"data: a\n\ndata: b\n\n"[..], b"data: a\r\n\r\ndata: b\r\n\r\n", b"data: a\r\rdata: b\r\r"] {
            let (evs, end) = parse(body);
            assert_eq!(evs.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["a", "b"]);
            assert_eq!(end, SseEnd::Clean);
        }
    }

    #[test]
    fn multiline_data_event_id_retry_comments() {
        let (evs, end) = parse(b": hello\nevent: error\nid: 7\nretry: 1500\ndata: x\ndata:y\ndata\n\n");
        assert_eq!(end, SseEnd::Clean);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].ty, "error");
        assert_eq!(evs[0].data, "x\ny\n");
        assert_eq!(evs[0].id, "7");
        let mut p = SseParser::new();
        p.feed::<EventTooLarge, _>(b"retry: 1500\n\nretry: x1\n\n", |_| Ok(())).unwrap();
        assert_eq!(p.retry_ms(), Some(1500));
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_type_resets() {
        let (evs, _) = parse(b"event: ping\n\ndata: d\n\n");
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].ty, "message");
    }

    #[test]
    fn id_with_nul_is_ignored_and_id_persists() {
        let (evs, _) = parse(b"id: 1\ndata: a\n\nid: 2\0\ndata: b\n\n");
        assert_eq!(evs[0].id, "1");
        assert_eq!(evs[1].id, "1");
    }

    #[test]
    fn bom_is_stripped_even_split() {
        let body = b"\xEF\xBB\xBFdata: a\n\n";
        let (evs, _) = parse(body);
        assert_eq!(evs[0].data, "a");
        let (evs, _) = parse_chunks(&[&body[..1], &body[1..2], &body[2..]]);
        assert_eq!(evs[0].data, "a");
        // Only one BOM is stripped; a lone 0xEF is ordinary data.
        let (evs, _) = parse(b"\xEFdata: a\n\n");
        assert_eq!(evs.len(), 0);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let (evs, end) = parse_chunks(&[b"data: a\r", b"\n\r", b"\ndata: b\r", b"\r"]);
        assert_eq!(evs.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(end, SseEnd::Clean);
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let body = "data: {\"a\":\"é€😀\"}\r\n\r\n: c\nevent: x\ndata: 1\ndata: 2\r\rdata: [DONE]\n\n".as_bytes();
        let whole = parse(body);
        let chunks: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(parse_chunks(&chunks), whole);
        assert_eq!(whole.0[0].data, "{\"a\":\"é€😀\"}");
    }

    #[test]
    fn truncation_is_reported() {
        assert!(matches!(parse(b"data: a\n\ndata: b").1, SseEnd::Truncated { offset: 9, .. }));
        assert!(matches!(parse(b"data: a\n\ndata: b\n").1, SseEnd::Truncated { offset: 9, .. }));
        assert_eq!(parse(b"").1, SseEnd::Clean);
        assert_eq!(parse(b"\xEF\xBB\xBF").1, SseEnd::Clean);
        assert!(matches!(parse(b"\xEF\xBB").1, SseEnd::Truncated { .. }));
    }

    #[test]
    fn offsets_are_absolute() {
        let (evs, _) = parse_chunks(&[b"data: a\n", b"\ndata: bb\n\n"]);
        assert_eq!(evs[0].offset, 0);
        assert_eq!(evs[1].offset, 9);
        let mut p = SseParser::new();
        let mut offs = vec![];
        p.feed::<EventTooLarge, _>(b"\xEF\xBB\xBFdata:  x\n\n", |e| {
            offs.push(e.data_offset);
            Ok(())
        })
        .unwrap();
        assert_eq!(offs, vec![9]);
    }

    #[derive(Debug, PartialEq)]
    enum Stop {
        Sink,
        TooLarge(EventTooLarge),
    }

    impl From<EventTooLarge> for Stop {
        fn from(e: EventTooLarge) -> Self {
            Stop::TooLarge(e)
        }
    }

    #[test]
    fn sink_error_propagates() {
        let mut p = SseParser::new();
        let r = p.feed(b"data: a\n\n", |_| Err(Stop::Sink));
        assert_eq!(r, Err(Stop::Sink));
    }

    #[test]
    fn events_past_the_cap_fail_however_they_arrive() {
        // One endless line, fed in pieces: fails once the cap is passed.
        let mut p = SseParser::with_max_event_bytes(64);
        let mut fed = 0;
        let err = loop {
            match p.feed::<EventTooLarge, _>(b"data: xxxxxxxxxxxxxxxx", |_| Ok(())) {
                Ok(()) => fed += 22,
                Err(e) => break e,
            }
        };
        assert!(fed <= 64, "buffered {fed} bytes past the cap");
        assert_eq!(err, EventTooLarge { offset: 0, limit: 64 });
        // Many short data lines without the blank line: same.
        let mut p = SseParser::with_max_event_bytes(64);
        let mut r = Ok(());
        for _ in 0..20 {
            r = p.feed(b"data: 0123456789\n", |_| Err(Stop::Sink));
            if r.is_err() {
                break;
            }
        }
        assert_eq!(r, Err(Stop::TooLarge(EventTooLarge { offset: 0, limit: 64 })));
        // At the cap itself, and for events that end, nothing fails.
        let mut p = SseParser::with_max_event_bytes(64);
        let event = [&b"data: "[..], &[b'y'; 63], b"\n\n"].concat();
        let mut n = 0;
        for _ in 0..3 {
            p.feed::<EventTooLarge, _>(&event, |e| {
                n += e.data.len();
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(n, 3 * 63);
        // The offset names the event that grew too large.
        let mut p = SseParser::with_max_event_bytes(8);
        let r = p.feed::<EventTooLarge, _>(b"data: a\n\ndata: 0123456789\n", |_| Ok(()));
        assert_eq!(r, Err(EventTooLarge { offset: 9, limit: 8 }));
    }
}
