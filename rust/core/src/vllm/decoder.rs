//! The incremental decoder: SSE framing in, one parsed event at a time
//! applied to the columns, errors with absolute byte offsets out.

use crate::json::Reader;
use crate::sse::{SseEnd, SseEvent, SseParser, DEFAULT_MAX_EVENT_BYTES};

use super::columns::{apply_chunk, finalize_top};
use super::event::{parse_chunk, Scratch};
use super::types::{DecodeError, DecodeErrorKind, ServerError, StreamOutput};

/// Incremental decoder: feed body bytes as they arrive, then [`finish`].
///
/// [`finish`]: StreamDecoder::finish
#[derive(Debug, Default)]
pub struct StreamDecoder {
    sse: SseParser,
    out: StreamOutput,
    scratch: Scratch,
    failed: Option<DecodeError>,
}

fn excerpt(data: &[u8], at: usize) -> String {
    let start = at.saturating_sub(24).min(data.len());
    let end = at.saturating_add(40).min(data.len());
    String::from_utf8_lossy(&data[start..end]).into_owned()
}

fn protocol(offset: u64, message: impl Into<String>, excerpt: String) -> DecodeError {
    DecodeError { kind: DecodeErrorKind::Protocol, offset, message: message.into(), excerpt }
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that fails with a protocol error once one event buffers
    /// more than `max_event_bytes` (default [`DEFAULT_MAX_EVENT_BYTES`]).
    pub fn with_max_event_bytes(max_event_bytes: usize) -> Self {
        StreamDecoder { sse: SseParser::with_max_event_bytes(max_event_bytes), ..Self::default() }
    }

    /// Events decoded so far.
    pub fn events(&self) -> u64 {
        self.out.events
    }

    /// Tokens decoded so far, over all choices.
    pub fn tokens(&self) -> usize {
        self.out.choices.iter().map(|c| c.token_ids.len()).sum()
    }

    /// Whether `data: [DONE]` has been seen.
    pub fn is_done(&self) -> bool {
        self.out.done
    }

    /// Feed the next chunk of the body. After an error every later call
    /// returns the same error.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let out = &mut self.out;
        let scratch = &mut self.scratch;
        out.bytes += chunk.len() as u64;
        let res = self.sse.feed(chunk, |ev| handle_event(out, scratch, ev));
        if let Err(e) = &res {
            self.failed = Some(e.clone());
        }
        res
    }

    /// Declare the end of the body and return what was decoded. A body that
    /// ended inside an event or without `[DONE]` is reported as truncated.
    pub fn finish(mut self) -> Result<StreamOutput, DecodeError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        match self.sse.finish() {
            SseEnd::Truncated { offset, pending_bytes } => {
                return Err(DecodeError {
                    kind: DecodeErrorKind::Truncated,
                    offset,
                    message: format!("stream truncated inside an event ({pending_bytes} bytes pending)"),
                    excerpt: String::new(),
                })
            }
            SseEnd::Clean => {}
        }
        if !self.out.done {
            return Err(DecodeError {
                kind: DecodeErrorKind::Truncated,
                offset: self.out.bytes,
                message: "stream ended without `data: [DONE]`".into(),
                excerpt: String::new(),
            });
        }
        Ok(self.into_partial())
    }

    /// Return what was decoded so far without requiring a clean end (for
    /// diagnostics of a failed request).
    pub fn into_partial(mut self) -> StreamOutput {
        self.out.choices.sort_by_key(|c| c.index);
        for c in &mut self.out.choices {
            for top in [&mut c.top_logprobs, &mut c.prompt_top_logprobs].into_iter().flatten() {
                finalize_top(top);
            }
        }
        self.out
    }
}

/// Decode a complete body in one call.
pub fn decode_stream(body: &[u8]) -> Result<StreamOutput, DecodeError> {
    decode_stream_capped(body, DEFAULT_MAX_EVENT_BYTES)
}

/// [`decode_stream`] with a cap on one event's size (see [`StreamDecoder::with_max_event_bytes`]).
pub fn decode_stream_capped(body: &[u8], max_event_bytes: usize) -> Result<StreamOutput, DecodeError> {
    let mut d = StreamDecoder::with_max_event_bytes(max_event_bytes);
    d.feed(body)?;
    d.finish()
}

fn handle_event(out: &mut StreamOutput, scratch: &mut Scratch, ev: SseEvent<'_>) -> Result<(), DecodeError> {
    out.events += 1;
    let data = ev.data;
    if out.done {
        return Err(protocol(ev.offset, "event after `data: [DONE]`", excerpt(data, 0)));
    }
    if data == b"[DONE]" {
        out.done = true;
        return Ok(());
    }
    let is_error_event = ev.event_type == b"error";
    if ev.event_type != b"message" && !is_error_event {
        // Named events other than errors (pings, keep-alives) carry no tokens.
        return Ok(());
    }
    let mut r = Reader::new(data);
    let fields = match parse_chunk(&mut r, scratch, ev.offset) {
        Ok(f) => f,
        Err(e) if is_error_event => {
            // A plain-text error event.
            let _ = e;
            out.error.get_or_insert(ServerError {
                message: String::from_utf8_lossy(data).into_owned(),
                error_type: None,
                code: None,
                param: None,
                offset: ev.offset,
            });
            return Ok(());
        }
        Err(e) => {
            let at = e.pos.min(data.len());
            let kind = if at >= data.len() { "incomplete JSON" } else { "invalid event" };
            return Err(protocol(ev.data_offset + at as u64, format!("{kind}: {}", e.msg), excerpt(data, at)));
        }
    };
    apply_chunk(out, fields, scratch, ev.offset).map_err(|msg| protocol(ev.data_offset, msg, excerpt(data, 0)))
}
