//! Decoder for vLLM's streaming responses: `/v1/completions`,
//! `/v1/chat/completions` and `/inference/v1/generate` (`--enable-scale-out`).
//!
//! SSE framing comes from [`crate::sse`]; each event's JSON is parsed into
//! borrowed structs and appended to per-choice columnar buffers (token ids,
//! logprobs, top-logprob CSR, sampling-mask CSR, routed experts), so a stream
//! of thousands of events ends as a handful of contiguous vectors.
//!
//! Wire facts this relies on (vLLM 0.32, see `ENGINE-NOTES.md`): the stream
//! ends with `data: [DONE]`; logprobs are clamped at -9999.0 and NaN is sent as
//! `null`; errors after the first byte arrive as `data: {"error": {...}}`
//! under HTTP 200; `choices[].index` may arrive in any order.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::npy::{parse_npy, NpyArray};
use crate::sse::{SseEnd, SseEvent, SseParser};

/// Upper bound on distinct choice indices in one stream. vLLM caps `n` far
/// lower; this only stops a hostile stream from allocating without bound.
pub const MAX_CHOICES: usize = 1 << 16;

/// Why decoding failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// The body ended before `data: [DONE]` or inside an event.
    Truncated,
    /// The bytes are not a valid vLLM stream (bad JSON, wrong types, ...).
    Protocol,
}

/// A decoding failure with the absolute byte offset it refers to and a short
/// excerpt of the offending bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub offset: u64,
    pub message: String,
    pub excerpt: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)?;
        if !self.excerpt.is_empty() {
            write!(f, " near {:?}", self.excerpt)?;
        }
        Ok(())
    }
}

impl std::error::Error for DecodeError {}

/// `stop_reason`: the stop token id or the stop string that ended a choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(i64),
    Text(String),
}

/// One `weight_versions` span (`/inference/v1/generate`, final chunk):
/// output tokens `[start, end)` were produced by weights `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightVersionSpan {
    pub version: String,
    pub start: u64,
    pub end: u64,
}

/// Strings in one buffer with offsets (CSR), to avoid one allocation per string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StringTable {
    pub bytes: Vec<u8>,
    /// `offsets[i]..offsets[i+1]` is string `i`; starts with 0.
    pub offsets: Vec<i64>,
}

impl StringTable {
    fn push(&mut self, s: &str) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.bytes.extend_from_slice(s.as_bytes());
        self.offsets.push(self.bytes.len() as i64);
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let a = usize::try_from(*self.offsets.get(i)?).ok()?;
        let b = usize::try_from(*self.offsets.get(i + 1)?).ok()?;
        std::str::from_utf8(self.bytes.get(a..b)?).ok()
    }
}

/// Top-logprob candidates of every generated token, in CSR form:
/// candidates of token `t` are `offsets[t]..offsets[t+1]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobs {
    pub offsets: Vec<i64>,
    /// Candidate token ids, when the server identified candidates by id
    /// (`/inference/v1/generate`, or `return_tokens_as_token_ids`); -1 for a
    /// candidate given only as a string. Empty when no candidate had an id.
    pub token_ids: Vec<i64>,
    /// Candidate token strings (completions and chat endpoints). Empty when
    /// every candidate had an id.
    pub tokens: StringTable,
    pub logprobs: Vec<f32>,
}

/// Everything decoded for one choice index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceOutput {
    pub index: u32,
    pub token_ids: Vec<i64>,
    /// Logprob of each sampled token (NaN where the server sent `null`).
    pub logprobs: Vec<f32>,
    /// Whether the server sent logprobs at all (tells "not requested" from
    /// "no tokens").
    pub has_logprobs: bool,
    /// Rank of each sampled token (generate endpoint only), else empty.
    pub ranks: Vec<i64>,
    pub top_logprobs: Option<TopLogprobs>,
    /// With `echo`: logprobs of the prompt tokens (the first is NaN: nothing
    /// predicts it), from the first chunk.
    pub prompt_logprobs: Vec<f32>,
    pub prompt_top_logprobs: Option<TopLogprobs>,
    pub text: String,
    /// Chat `delta.reasoning_content` / `delta.reasoning`, concatenated.
    pub reasoning: String,
    pub finish_reason: Option<String>,
    pub stop_reason: Option<StopReason>,
    pub prompt_token_ids: Option<Vec<i64>>,
    /// Routed expert ids, rows concatenated over the stream.
    pub routed_experts: Option<NpyArray>,
    /// Kept token ids per generated token (CSR), when the server sent masks.
    pub sampling_mask: Option<(Vec<i32>, Vec<i64>)>,
    pub weight_versions: Vec<WeightVersionSpan>,
}

/// Token counts reported by the server (`stream_options.include_usage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cached_tokens: Option<i64>,
}

/// An `{"error": {...}}` event sent by the server mid-stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub message: String,
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub param: Option<String>,
    pub offset: u64,
}

/// The decoded stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamOutput {
    /// Ordered by choice index.
    pub choices: Vec<ChoiceOutput>,
    pub usage: Option<Usage>,
    /// Numeric per-request metrics (`--enable-per-request-metrics`):
    /// `queue_time_ms`, `time_to_first_token_ms`, ...
    pub metrics: Vec<(String, f64)>,
    /// `id` (OpenAI endpoints) or `request_id` (generate endpoint).
    pub request_id: Option<String>,
    pub model: Option<String>,
    pub error: Option<ServerError>,
    pub done: bool,
    pub events: u64,
    pub bytes: u64,
}

// ---------------------------------------------------------------------------
// Wire structs (borrowed from the event data where possible).

/// A JSON string, borrowed when it has no escapes.
#[derive(Debug)]
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// A JSON number or null (vLLM's NaN), as f64.
#[derive(Debug, Clone, Copy)]
struct Lp(f64);

impl<'de> Deserialize<'de> for Lp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<f64>::deserialize(d).map(|v| Lp(v.unwrap_or(f64::NAN)))
    }
}

/// `{token: logprob, ...}` in wire order (completions `top_logprobs`).
#[derive(Debug, Default)]
struct PairList<'a>(Vec<(Str<'a>, Lp)>);

impl<'de: 'a, 'a> Deserialize<'de> for PairList<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = PairList<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of token -> logprob")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(8));
                while let Some(k) = m.next_key::<Str<'a>>()? {
                    out.push((k, m.next_value::<Lp>()?));
                }
                Ok(PairList(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Numeric members of an object, in order; other members are skipped
/// (`metrics.speculative_decoding` is an object or null).
#[derive(Debug, Default)]
struct NumericMap(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for NumericMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NumericMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<Str<'de>>()? {
                    let v: serde_json::Value = m.next_value()?;
                    if let Some(x) = v.as_f64() {
                        out.push((k.0.into_owned(), x));
                    }
                }
                Ok(NumericMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Sampling masks: one list of kept ids per generated token, appended to a CSR.
#[derive(Debug, Default)]
struct MaskRows {
    ids: Vec<i32>,
    lens: Vec<i64>,
}

impl<'de> Deserialize<'de> for MaskRows {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Row<'r>(&'r mut Vec<i32>);
        impl<'de> de::DeserializeSeed<'de> for Row<'_> {
            type Value = i64;
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<i64, D::Error> {
                struct RV<'r>(&'r mut Vec<i32>);
                impl<'de> Visitor<'de> for RV<'_> {
                    type Value = i64;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a list of token ids")
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<i64, A::Error> {
                        let mut n = 0i64;
                        while let Some(id) = s.next_element::<u32>()? {
                            let id = i32::try_from(id)
                                .map_err(|_| de::Error::custom(format!("mask token id {id} out of range")))?;
                            self.0.push(id);
                            n += 1;
                        }
                        Ok(n)
                    }
                }
                d.deserialize_seq(RV(self.0))
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaskRows;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of token-id lists")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<MaskRows, A::Error> {
                let mut rows = MaskRows::default();
                while let Some(n) = s.next_element_seed(Row(&mut rows.ids))? {
                    rows.lens.push(n);
                }
                Ok(rows)
            }
        }
        d.deserialize_seq(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawStop<'a> {
    Token(i64),
    #[serde(borrow)]
    Text(Str<'a>),
}

#[derive(Debug, Deserialize)]
struct RawTop<'a> {
    #[serde(borrow, default)]
    token: Option<Str<'a>>,
    #[serde(default)]
    token_id: Option<u32>,
    #[serde(default)]
    logprob: Option<Lp>,
}

#[derive(Debug, Deserialize)]
struct RawContent<'a> {
    #[serde(borrow, default)]
    token: Option<Str<'a>>,
    #[serde(default)]
    token_id: Option<u32>,
    #[serde(default)]
    logprob: Option<Lp>,
    #[serde(default)]
    rank: Option<i64>,
    #[serde(borrow, default)]
    top_logprobs: Option<Vec<RawTop<'a>>>,
}

#[derive(Debug, Deserialize)]
struct RawLogprobs<'a> {
    #[serde(default)]
    token_logprobs: Option<Vec<Lp>>,
    #[serde(borrow, default)]
    top_logprobs: Option<Vec<Option<PairList<'a>>>>,
    #[serde(borrow, default)]
    content: Option<Vec<RawContent<'a>>>,
}

#[derive(Debug, Deserialize)]
struct RawDelta<'a> {
    #[serde(borrow, default)]
    content: Option<Str<'a>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Str<'a>>,
    #[serde(borrow, default)]
    reasoning: Option<Str<'a>>,
}

#[derive(Debug, Deserialize)]
struct RawWeightVersion<'a> {
    #[serde(borrow)]
    version: Str<'a>,
    start: u64,
    end: u64,
}

#[derive(Debug, Deserialize)]
struct RawChoice<'a> {
    index: u32,
    #[serde(borrow, default)]
    text: Option<Str<'a>>,
    #[serde(borrow, default)]
    delta: Option<RawDelta<'a>>,
    #[serde(borrow, default)]
    logprobs: Option<RawLogprobs<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Str<'a>>,
    #[serde(borrow, default)]
    stop_reason: Option<RawStop<'a>>,
    #[serde(default)]
    prompt_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(borrow, default)]
    routed_experts: Option<Str<'a>>,
    #[serde(default)]
    sampling_mask: Option<MaskRows>,
    #[serde(borrow, default)]
    weight_versions: Option<Vec<RawWeightVersion<'a>>>,
}

#[derive(Debug, Deserialize)]
struct RawCachedDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
    #[serde(default)]
    total_tokens: i64,
    #[serde(default)]
    prompt_tokens_details: Option<RawCachedDetails>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCode<'a> {
    Int(i64),
    #[serde(borrow)]
    Text(Str<'a>),
}

#[derive(Debug, Deserialize)]
struct RawErrorBody<'a> {
    #[serde(borrow, default)]
    message: Option<Str<'a>>,
    #[serde(borrow, default, rename = "type")]
    error_type: Option<Str<'a>>,
    #[serde(borrow, default)]
    code: Option<RawCode<'a>>,
    #[serde(borrow, default)]
    param: Option<Str<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawError<'a> {
    #[serde(borrow)]
    Body(RawErrorBody<'a>),
    Text(Str<'a>),
}

#[derive(Debug, Deserialize)]
struct RawChunk<'a> {
    #[serde(borrow, default)]
    id: Option<Str<'a>>,
    #[serde(borrow, default)]
    request_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    model: Option<Str<'a>>,
    #[serde(borrow, default)]
    choices: Option<Vec<RawChoice<'a>>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    metrics: Option<NumericMap>,
    #[serde(default)]
    prompt_token_ids: Option<Vec<u32>>,
    #[serde(borrow, default)]
    error: Option<RawError<'a>>,
    #[serde(default, rename = "object")]
    _object: Option<IgnoredAny>,
}

// ---------------------------------------------------------------------------

/// Incremental decoder: feed body bytes as they arrive, then [`finish`].
///
/// [`finish`]: StreamDecoder::finish
#[derive(Debug, Default)]
pub struct StreamDecoder {
    sse: SseParser,
    out: StreamOutput,
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

    /// The server's error event, if one arrived.
    pub fn server_error(&self) -> Option<&ServerError> {
        self.out.error.as_ref()
    }

    /// Feed the next chunk of the body. After an error every later call
    /// returns the same error.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let out = &mut self.out;
        out.bytes += chunk.len() as u64;
        let res = self.sse.feed(chunk, |ev| handle_event(out, ev));
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
    let mut d = StreamDecoder::new();
    d.feed(body)?;
    d.finish()
}

fn handle_event(out: &mut StreamOutput, ev: SseEvent<'_>) -> Result<(), DecodeError> {
    out.events += 1;
    let data = ev.data;
    if out.done {
        return Err(protocol(ev.offset, "event after `data: [DONE]`", excerpt(data, 0)));
    }
    if data == b"[DONE]" {
        out.done = true;
        return Ok(());
    }
    if ev.event_type != b"message" && ev.event_type != b"error" {
        // Named events other than errors (pings, keep-alives) carry no tokens.
        return Ok(());
    }
    let chunk: RawChunk<'_> = match serde_json::from_slice(data) {
        Ok(c) => c,
        Err(e) => {
            if ev.event_type == b"error" {
                // A plain-text error event.
                out.error.get_or_insert(ServerError {
                    message: String::from_utf8_lossy(data).into_owned(),
                    error_type: None,
                    code: None,
                    param: None,
                    offset: ev.offset,
                });
                return Ok(());
            }
            let at = json_error_position(data, &e);
            let kind = if e.is_eof() { "incomplete JSON" } else { "invalid JSON" };
            return Err(protocol(ev.data_offset + at as u64, format!("{kind} in event: {e}"), excerpt(data, at)));
        }
    };
    apply_chunk(out, chunk, ev).map_err(|msg| protocol(ev.data_offset, msg, excerpt(data, 0)))
}

/// Byte index into `data` of a serde_json error (which reports line/column).
fn json_error_position(data: &[u8], e: &serde_json::Error) -> usize {
    let mut line = 1usize;
    let mut idx = 0usize;
    while line < e.line() {
        match memchr::memchr(b'\n', &data[idx..]) {
            Some(p) => {
                idx += p + 1;
                line += 1;
            }
            None => break,
        }
    }
    (idx + e.column().saturating_sub(1)).min(data.len())
}

fn choice_mut(out: &mut StreamOutput, index: u32) -> Result<&mut ChoiceOutput, String> {
    // Choices are few (n); a linear scan beats hashing here.
    if let Some(pos) = out.choices.iter().position(|c| c.index == index) {
        return Ok(&mut out.choices[pos]);
    }
    if out.choices.len() >= MAX_CHOICES {
        return Err(format!("more than {MAX_CHOICES} distinct choice indices"));
    }
    out.choices.push(ChoiceOutput { index, ..Default::default() });
    let last = out.choices.len() - 1;
    Ok(&mut out.choices[last])
}

fn apply_chunk(out: &mut StreamOutput, chunk: RawChunk<'_>, ev: SseEvent<'_>) -> Result<(), String> {
    if let Some(err) = chunk.error {
        if out.error.is_none() {
            out.error = Some(match err {
                RawError::Body(b) => ServerError {
                    message: b.message.map(|s| s.0.into_owned()).unwrap_or_default(),
                    error_type: b.error_type.map(|s| s.0.into_owned()),
                    code: b.code.map(|c| match c {
                        RawCode::Int(i) => i.to_string(),
                        RawCode::Text(s) => s.0.into_owned(),
                    }),
                    param: b.param.map(|s| s.0.into_owned()),
                    offset: ev.offset,
                },
                RawError::Text(s) => ServerError {
                    message: s.0.into_owned(),
                    error_type: None,
                    code: None,
                    param: None,
                    offset: ev.offset,
                },
            });
        }
    }
    if out.request_id.is_none() {
        if let Some(id) = chunk.request_id.or(chunk.id) {
            out.request_id = Some(id.0.into_owned());
        }
    }
    if out.model.is_none() {
        if let Some(m) = chunk.model {
            out.model = Some(m.0.into_owned());
        }
    }
    if let Some(u) = chunk.usage {
        out.usage = Some(Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
        });
    }
    if let Some(m) = chunk.metrics {
        out.metrics = m.0;
    }
    let top_prompt = chunk.prompt_token_ids;
    let Some(choices) = chunk.choices else {
        return Ok(());
    };
    for rc in choices {
        let c = choice_mut(out, rc.index)?;
        apply_choice(c, rc, top_prompt.as_deref())?;
    }
    Ok(())
}

fn apply_choice(c: &mut ChoiceOutput, rc: RawChoice<'_>, top_prompt: Option<&[u32]>) -> Result<(), String> {
    let idx = rc.index;
    if c.finish_reason.is_some() && (rc.token_ids.as_ref().is_some_and(|t| !t.is_empty())) {
        return Err(format!("choice {idx}: tokens after its finish_reason"));
    }
    if let Some(p) = rc.prompt_token_ids.as_deref().or(top_prompt) {
        if c.prompt_token_ids.is_none() {
            c.prompt_token_ids = Some(p.iter().map(|&t| i64::from(t)).collect());
        }
    }
    let mut rc = rc;
    if rc.token_ids.is_none() {
        // Chat without `return_token_ids`: the sampled ids can still be known
        // from the logprob entries (`token_id` or `token_id:N` strings).
        rc.token_ids = rc.logprobs.as_ref().and_then(|lp| lp.content.as_ref()).and_then(|content| {
            content
                .iter()
                .map(|e| {
                    e.token_id
                        .map(i64::from)
                        .or_else(|| e.token.as_ref().and_then(|t| token_id_string(&t.0)))
                        .and_then(|i| u32::try_from(i).ok())
                })
                .collect::<Option<Vec<u32>>>()
        });
    } else if let (Some(ids), Some(content)) = (&rc.token_ids, rc.logprobs.as_ref().and_then(|lp| lp.content.as_ref()))
    {
        for (i, (e, &t)) in content.iter().zip(ids).enumerate() {
            if e.token_id.is_some_and(|id| id != t) {
                return Err(format!(
                    "choice {idx}: logprob entry {i} is for token {:?} but token_ids has {t}",
                    e.token_id
                ));
            }
        }
    }
    let before = c.token_ids.len();
    let new_tokens = rc.token_ids.as_ref().map_or(0, Vec::len);
    if let Some(ids) = &rc.token_ids {
        c.token_ids.extend(ids.iter().map(|&t| i64::from(t)));
    }
    if let Some(t) = rc.text {
        c.text.push_str(&t.0);
    }
    if let Some(d) = rc.delta {
        if let Some(t) = d.content {
            c.text.push_str(&t.0);
        }
        if let Some(t) = d.reasoning_content.or(d.reasoning) {
            c.reasoning.push_str(&t.0);
        }
    }
    if let Some(lp) = rc.logprobs {
        // With `echo`, the first chunk's logprob lists cover the prompt too.
        let echo = match (&rc.prompt_token_ids, &lp.token_logprobs) {
            (Some(p), Some(tl))
                if before == 0 && c.prompt_logprobs.is_empty() && !p.is_empty() && tl.len() == p.len() + new_tokens =>
            {
                p.len()
            }
            _ => 0,
        };
        apply_logprobs(c, lp, idx, before, new_tokens, rc.token_ids.is_some(), echo)?;
    }
    if let Some(mask) = rc.sampling_mask {
        let (ids, offs) = c.sampling_mask.get_or_insert_with(|| (Vec::new(), vec![0]));
        // Rows already present must line up with earlier tokens.
        let rows_before = offs.len() - 1;
        if rows_before != before {
            return Err(format!("choice {idx}: sampling_mask rows ({rows_before}) out of step with tokens ({before})"));
        }
        if rc.token_ids.is_some() && mask.lens.len() != new_tokens {
            return Err(format!(
                "choice {idx}: {} sampling_mask rows for {new_tokens} tokens in one chunk",
                mask.lens.len()
            ));
        }
        let mut end = *offs.last().unwrap_or(&0);
        for n in mask.lens {
            end += n;
            offs.push(end);
        }
        ids.extend_from_slice(&mask.ids);
    }
    if let Some(re) = rc.routed_experts {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(re.0.as_bytes())
            .map_err(|e| format!("choice {idx}: routed_experts is not base64: {e}"))?;
        let arr = parse_npy(&raw).map_err(|e| format!("choice {idx}: routed_experts: {e}"))?;
        append_rows(&mut c.routed_experts, arr).map_err(|e| format!("choice {idx}: routed_experts: {e}"))?;
    }
    if let Some(wv) = rc.weight_versions {
        c.weight_versions = wv
            .into_iter()
            .map(|w| WeightVersionSpan { version: w.version.0.into_owned(), start: w.start, end: w.end })
            .collect();
    }
    if let Some(fr) = rc.finish_reason {
        c.finish_reason = Some(fr.0.into_owned());
    }
    if let Some(sr) = rc.stop_reason {
        c.stop_reason = Some(match sr {
            RawStop::Token(t) => StopReason::Token(t),
            RawStop::Text(s) => StopReason::Text(s.0.into_owned()),
        });
    }
    Ok(())
}

fn append_rows(slot: &mut Option<NpyArray>, arr: NpyArray) -> Result<(), String> {
    match slot {
        None => *slot = Some(arr),
        Some(prev) => {
            if prev.dtype != arr.dtype
                || prev.shape.len() != arr.shape.len()
                || prev.shape.get(1..) != arr.shape.get(1..)
                || prev.shape.is_empty()
            {
                return Err(format!(
                    "chunk array {:?} {:?} does not extend {:?} {:?}",
                    arr.dtype.name(),
                    arr.shape,
                    prev.dtype.name(),
                    prev.shape
                ));
            }
            prev.shape[0] += arr.shape[0];
            prev.data.extend_from_slice(&arr.data);
        }
    }
    Ok(())
}

/// Parse `"token_id:123"` (vLLM's `return_tokens_as_token_ids` form).
fn token_id_string(s: &str) -> Option<i64> {
    s.strip_prefix("token_id:")?.parse::<u32>().ok().map(i64::from)
}

fn apply_logprobs(
    c: &mut ChoiceOutput,
    lp: RawLogprobs<'_>,
    idx: u32,
    tokens_before: usize,
    new_tokens: usize,
    has_ids: bool,
    echo: usize,
) -> Result<(), String> {
    c.has_logprobs = true;
    let check = |n: usize, what: &str| -> Result<(), String> {
        if has_ids && n != new_tokens {
            Err(format!("choice {idx}: {n} {what} for {new_tokens} token ids in one chunk"))
        } else {
            Ok(())
        }
    };
    if c.logprobs.len() != tokens_before {
        return Err(format!(
            "choice {idx}: logprobs ({}) out of step with token ids ({tokens_before})",
            c.logprobs.len()
        ));
    }
    if let Some(tl) = lp.token_logprobs {
        check(tl.len() - echo, "token_logprobs")?;
        c.prompt_logprobs.extend(tl[..echo].iter().map(|l| l.0 as f32));
        c.logprobs.extend(tl[echo..].iter().map(|l| l.0 as f32));
        if let Some(tops) = lp.top_logprobs {
            if tops.len() < echo {
                return Err(format!("choice {idx}: {} top_logprobs rows for an echoed prompt of {echo}", tops.len()));
            }
            check(tops.len() - echo, "top_logprobs rows")?;
            for (i, row) in tops.into_iter().enumerate() {
                let slot = if i < echo { &mut c.prompt_top_logprobs } else { &mut c.top_logprobs };
                let top = slot.get_or_insert_with(|| TopLogprobs { offsets: vec![0], ..Default::default() });
                for (tok, l) in row.map(|r| r.0).unwrap_or_default() {
                    push_top(top, Some(&tok.0), None, l.0);
                }
                top.offsets.push(top.logprobs.len() as i64);
            }
        }
    } else if let Some(content) = lp.content {
        check(content.len(), "logprobs.content entries")?;
        let with_rank = content.iter().any(|e| e.rank.is_some());
        if with_rank && c.ranks.len() != tokens_before {
            return Err(format!("choice {idx}: ranks out of step with tokens"));
        }
        for e in content {
            c.logprobs.push(e.logprob.map_or(f64::NAN, |l| l.0) as f32);
            if with_rank {
                c.ranks.push(e.rank.unwrap_or(-1));
            }
            if let Some(tops) = e.top_logprobs {
                let top = c.top_logprobs.get_or_insert_with(|| TopLogprobs { offsets: vec![0], ..Default::default() });
                // Rows must stay aligned with tokens even when earlier entries had none.
                while top.offsets.len() < c.logprobs.len() {
                    top.offsets.push(top.logprobs.len() as i64);
                }
                for t in tops {
                    push_top(top, t.token.as_ref().map(|s| &*s.0), t.token_id, t.logprob.map_or(f64::NAN, |l| l.0));
                }
                top.offsets.push(top.logprobs.len() as i64);
            }
        }
    } else {
        return Ok(());
    }
    if let Some(top) = &mut c.top_logprobs {
        while top.offsets.len() < c.logprobs.len() + 1 {
            top.offsets.push(top.logprobs.len() as i64);
        }
    }
    Ok(())
}

/// Append one candidate. Both forms are kept while decoding (id -1 when the
/// server gave only a string); [`finalize_top`] drops whichever form is not
/// needed once the stream is complete.
fn push_top(top: &mut TopLogprobs, token: Option<&str>, id: Option<u32>, lp: f64) {
    let id = id.map(i64::from).or_else(|| token.and_then(token_id_string));
    top.token_ids.push(id.unwrap_or(-1));
    top.tokens.push(token.unwrap_or(""));
    top.logprobs.push(lp as f32);
}

/// Keep ids when every candidate has one, strings when none has; both otherwise.
fn finalize_top(top: &mut TopLogprobs) {
    if top.token_ids.iter().all(|&i| i >= 0) {
        top.tokens = StringTable::default();
    } else if top.token_ids.iter().all(|&i| i < 0) {
        top.token_ids.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(events: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        for e in events {
            b.extend_from_slice(b"data: ");
            b.extend_from_slice(e.as_bytes());
            b.extend_from_slice(b"\n\n");
        }
        b
    }

    #[test]
    fn completions_two_choices_out_of_order() {
        let b = body(&[
            r#"{"id":"cmpl-1","choices":[{"index":1,"text":"b","logprobs":{"token_logprobs":[-1.5],"top_logprobs":[{"b":-1.5,"c":-2.0}]},"finish_reason":null,"prompt_token_ids":[1,2],"token_ids":[7]}]}"#,
            r#"{"id":"cmpl-1","choices":[{"index":0,"text":"a","logprobs":{"token_logprobs":[null],"top_logprobs":[{"a":-9999.0}]},"finish_reason":"length","stop_reason":null,"token_ids":[5]}]}"#,
            r#"{"id":"cmpl-1","choices":[{"index":1,"text":"!","logprobs":{"token_logprobs":[-0.5],"top_logprobs":[{"!":-0.5}]},"finish_reason":"stop","stop_reason":42,"token_ids":[9]}]}"#,
            r#"{"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5},"metrics":{"queue_time_ms":1.5,"speculative_decoding":null}}"#,
            "[DONE]",
        ]);
        let out = decode_stream(&b).unwrap();
        assert_eq!(out.request_id.as_deref(), Some("cmpl-1"));
        assert_eq!(out.choices.len(), 2);
        let c0 = &out.choices[0];
        assert_eq!(c0.index, 0);
        assert_eq!(c0.token_ids, vec![5]);
        assert!(c0.logprobs[0].is_nan());
        assert_eq!(c0.top_logprobs.as_ref().unwrap().logprobs, vec![-9999.0]);
        let c1 = &out.choices[1];
        assert_eq!(c1.token_ids, vec![7, 9]);
        assert_eq!(c1.text, "b!");
        assert_eq!(c1.logprobs, vec![-1.5, -0.5]);
        assert_eq!(c1.stop_reason, Some(StopReason::Token(42)));
        assert_eq!(c1.prompt_token_ids, Some(vec![1, 2]));
        let top = c1.top_logprobs.as_ref().unwrap();
        assert_eq!(top.offsets, vec![0, 2, 3]);
        assert_eq!(top.tokens.get(1), Some("c"));
        assert_eq!(out.usage.as_ref().unwrap().completion_tokens, 3);
        assert_eq!(out.metrics, vec![("queue_time_ms".to_string(), 1.5)]);
    }

    #[test]
    fn generate_endpoint_ids_ranks_masks_versions() {
        let b = body(&[
            r#"{"request_id":"r1","choices":[{"index":0,"token_ids":[4,5],"sampling_mask":[[4,1],[5]],"logprobs":{"content":[{"token_id":4,"logprob":-1.0,"rank":2,"top_logprobs":[{"token_id":1,"logprob":-0.5,"rank":1}]},{"token_id":5,"logprob":-2.0,"rank":1,"top_logprobs":[{"token_id":5,"logprob":-2.0,"rank":1}]}]}}]}"#,
            r#"{"request_id":"r1","choices":[{"index":0,"token_ids":[6],"finish_reason":"length","sampling_mask":[[6,7,8]],"weight_versions":[{"version":"v2","start":0,"end":3}],"logprobs":{"content":[{"token_id":6,"logprob":-3.0,"rank":3,"top_logprobs":[]}]}}]}"#,
            "[DONE]",
        ]);
        let out = decode_stream(&b).unwrap();
        let c = &out.choices[0];
        assert_eq!(out.request_id.as_deref(), Some("r1"));
        assert_eq!(c.token_ids, vec![4, 5, 6]);
        assert_eq!(c.ranks, vec![2, 1, 3]);
        let top = c.top_logprobs.as_ref().unwrap();
        assert_eq!(top.token_ids, vec![1, 5]);
        assert_eq!(top.offsets, vec![0, 1, 2, 2]);
        let (ids, offs) = c.sampling_mask.as_ref().unwrap();
        assert_eq!(ids, &vec![4, 1, 5, 6, 7, 8]);
        assert_eq!(offs, &vec![0, 2, 3, 6]);
        assert_eq!(c.weight_versions, vec![WeightVersionSpan { version: "v2".into(), start: 0, end: 3 }]);
    }

    #[test]
    fn echo_splits_prompt_logprobs() {
        let b = body(&[
            r#"{"id":"e","choices":[{"index":0,"text":"x","logprobs":{"token_logprobs":[null,-1.0,-2.0],"top_logprobs":[null,{"a":-1.0},{"x":-2.0,"y":-3.0}]},"prompt_token_ids":[7,8],"token_ids":[9]}]}"#,
            r#"{"id":"e","choices":[{"index":0,"text":"z","logprobs":{"token_logprobs":[-4.0],"top_logprobs":[{"z":-4.0}]},"finish_reason":"length","token_ids":[10]}]}"#,
            "[DONE]",
        ]);
        let out = decode_stream(&b).unwrap();
        let c = &out.choices[0];
        assert_eq!(c.token_ids, vec![9, 10]);
        assert_eq!(c.logprobs, vec![-2.0, -4.0]);
        assert!(c.prompt_logprobs[0].is_nan());
        assert_eq!(c.prompt_logprobs[1], -1.0);
        assert_eq!(c.prompt_top_logprobs.as_ref().unwrap().offsets, vec![0, 0, 1]);
        assert_eq!(c.top_logprobs.as_ref().unwrap().offsets, vec![0, 2, 3]);
    }

    #[test]
    fn token_id_strings_become_ids() {
        let b = body(&[
            r#"{"choices":[{"index":0,"delta":{"content":"x"},"logprobs":{"content":[{"token":"token_id:3","logprob":-1.0,"top_logprobs":[{"token":"token_id:3","logprob":-1.0},{"token":"token_id:9","logprob":-2.0}]}]},"token_ids":[3]}]}"#,
            "[DONE]",
        ]);
        let out = decode_stream(&b).unwrap();
        let top = out.choices[0].top_logprobs.as_ref().unwrap();
        assert_eq!(top.token_ids, vec![3, 9]);
        assert!(top.tokens.is_empty());
    }

    #[test]
    fn server_error_event_is_recorded() {
        let b = body(&[
            r#"{"choices":[{"index":0,"text":"a","token_ids":[1]}]}"#,
            r#"{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}"#,
            "[DONE]",
        ]);
        let out = decode_stream(&b).unwrap();
        let e = out.error.unwrap();
        assert_eq!(e.message, "boom");
        assert_eq!(e.code.as_deref(), Some("500"));
        assert_eq!(e.error_type.as_deref(), Some("InternalServerError"));
    }

    #[test]
    fn truncation_and_missing_done() {
        let full = body(&[r#"{"choices":[{"index":0,"text":"a","token_ids":[1]}]}"#, "[DONE]"]);
        for cut in [full.len() - 1, full.len() - 3, 10] {
            let e = decode_stream(&full[..cut]).unwrap_err();
            assert_eq!(e.kind, DecodeErrorKind::Truncated, "cut {cut}");
        }
        let no_done = body(&[r#"{"choices":[]}"#]);
        assert_eq!(decode_stream(&no_done).unwrap_err().kind, DecodeErrorKind::Truncated);
    }

    #[test]
    fn malformed_input_is_a_protocol_error_with_offset() {
        let b = body(&[r#"{"choices":[{"index":0,"token_ids":[1,}]}"#, "[DONE]"]);
        let e = decode_stream(&b).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Protocol);
        assert!(e.offset >= 6 && e.offset < 50, "{e}");
        for bad in [
            r#"{"choices":[{"index":0,"token_ids":["x"]}]}"#,
            r#"{"choices":[{"index":0,"token_ids":[-1]}]}"#,
            r#"{"choices":[{"index":0,"token_ids":[99999999999999999999999]}]}"#,
            r#"{"choices":[{"index":0,"token_ids":[1],"logprobs":{"token_logprobs":[-1,-2]}}]}"#,
            r#"{"choices":[{"token_ids":[1]}]}"#,
            r#"{"choices":[{"index":0,"routed_experts":"!!"}]}"#,
        ] {
            let e = decode_stream(&body(&[bad, "[DONE]"])).unwrap_err();
            assert_eq!(e.kind, DecodeErrorKind::Protocol, "{bad}");
        }
        let e =
            decode_stream(b"data: {\"choices\":[{\"index\":0,\"text\":\"\xff\"}]}\n\ndata: [DONE]\n\n").unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Protocol);
    }

    #[test]
    fn unknown_fields_are_ignored_and_events_after_done_rejected() {
        let b = body(&[r#"{"new_field":{"x":[1,2]},"choices":[{"index":0,"token_ids":[1],"extra":true}]}"#, "[DONE]"]);
        assert_eq!(decode_stream(&b).unwrap().choices[0].token_ids, vec![1]);
        let b = body(&["[DONE]", r#"{"choices":[]}"#]);
        assert_eq!(decode_stream(&b).unwrap_err().kind, DecodeErrorKind::Protocol);
    }

    #[test]
    fn routed_experts_rows_concatenate() {
        fn npy_b64(rows: usize) -> String {
            let mut header = format!("{{'descr': '<i4', 'fortran_order': False, 'shape': ({rows}, 2), }}");
            while (10 + header.len() + 1) % 64 != 0 {
                header.push(' ');
            }
            header.push('\n');
            let mut out = b"\x93NUMPY\x01\x00".to_vec();
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
            out.extend_from_slice(header.as_bytes());
            for v in 0..(rows * 2) as i32 {
                out.extend_from_slice(&v.to_le_bytes());
            }
            base64::engine::general_purpose::STANDARD.encode(out)
        }
        let e1 = format!(r#"{{"choices":[{{"index":0,"token_ids":[1],"routed_experts":"{}"}}]}}"#, npy_b64(1));
        let e2 = format!(r#"{{"choices":[{{"index":0,"token_ids":[2,3],"routed_experts":"{}"}}]}}"#, npy_b64(2));
        let out = decode_stream(&body(&[&e1, &e2, "[DONE]"])).unwrap();
        let re = out.choices[0].routed_experts.as_ref().unwrap();
        assert_eq!(re.shape, vec![3, 2]);
        assert_eq!(re.data.len(), 24);
    }
}
