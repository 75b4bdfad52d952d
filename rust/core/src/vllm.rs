//! Decoder for vLLM's streaming responses: `/v1/completions`,
//! `/v1/chat/completions` and `/inference/v1/generate` (`--enable-scale-out`).
//!
//! SSE framing comes from [`crate::sse`]; each event's JSON is parsed into
//! borrowed structs and appended to per-choice columnar buffers (token ids,
//! logprobs, top-logprob CSR, sampling-mask CSR, routed experts), so a stream
//! of thousands of events ends as a handful of contiguous vectors.
//!
//! Wire facts this relies on (vLLM 0.32, see `docs/ENGINE.md`, section 7): the stream
//! ends with `data: [DONE]`; logprobs are clamped at -9999.0 and NaN is sent as
//! `null`; errors after the first byte arrive as `data: {"error": {...}}`
//! under HTTP 200; `choices[].index` may arrive in any order.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;

use crate::json::{self, JsonError, Reader};
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

    /// Append strings `from..to` of `other` (one copy of their bytes).
    fn extend_from(&mut self, other: &StringTable, from: usize, to: usize) {
        if from >= to {
            return;
        }
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        let (a, b) = (other.offsets[from] as usize, other.offsets[to] as usize);
        let shift = self.bytes.len() as i64 - other.offsets[from];
        self.bytes.extend_from_slice(&other.bytes[a..b]);
        self.offsets.extend(other.offsets[from + 1..=to].iter().map(|&o| o + shift));
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
// Event parsing. One event is parsed completely into reusable scratch buffers
// (a choice's `index` may come after its data), then applied. In steady state
// this allocates nothing per event.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum LpKind {
    #[default]
    None,
    /// Completions: `token_logprobs` + `top_logprobs` (string-keyed maps).
    Legacy,
    /// Chat and generate: `content: [{token|token_id, logprob, rank, top_logprobs}]`.
    Content,
}

/// Logprobs of one choice in one event.
#[derive(Debug, Default)]
struct LpDelta {
    kind: LpKind,
    lps: Vec<f64>,
    /// Per entry: the sampled token's id when the entry names it
    /// (`token_id`, or a `token_id:N` string), else -1.
    entry_ids: Vec<i64>,
    ranks: Vec<i64>,
    has_ranks: bool,
    has_top: bool,
    /// Candidate count per entry (0 for a `null` row).
    top_rows: Vec<u32>,
    top_ids: Vec<i64>,
    top_strs: StringTable,
    top_lps: Vec<f64>,
}

impl LpDelta {
    fn clear(&mut self) {
        self.kind = LpKind::None;
        self.lps.clear();
        self.entry_ids.clear();
        self.ranks.clear();
        self.has_ranks = false;
        self.has_top = false;
        self.top_rows.clear();
        self.top_ids.clear();
        self.top_strs.bytes.clear();
        self.top_strs.offsets.clear();
        self.top_lps.clear();
    }

    fn push_candidate(&mut self, token: Option<&str>, id: Option<u32>, lp: f64) {
        let id = id.map(i64::from).or_else(|| token.and_then(token_id_string));
        self.top_ids.push(id.unwrap_or(-1));
        self.top_strs.push(token.unwrap_or(""));
        self.top_lps.push(lp);
    }
}

/// Fields of one choice in one event.
#[derive(Debug, Default)]
struct ChoiceDelta {
    index: Option<u32>,
    has_text: bool,
    text: String,
    has_reasoning: bool,
    reasoning: String,
    finish_reason: Option<String>,
    stop_reason: Option<StopReason>,
    has_prompt: bool,
    prompt: Vec<u32>,
    has_ids: bool,
    ids: Vec<u32>,
    lp: LpDelta,
    routed_experts: Option<String>,
    has_mask: bool,
    mask_ids: Vec<i32>,
    mask_lens: Vec<i64>,
    weight_versions: Option<Vec<WeightVersionSpan>>,
}

impl ChoiceDelta {
    fn clear(&mut self) {
        self.index = None;
        self.has_text = false;
        self.text.clear();
        self.has_reasoning = false;
        self.reasoning.clear();
        self.finish_reason = None;
        self.stop_reason = None;
        self.has_prompt = false;
        self.prompt.clear();
        self.has_ids = false;
        self.ids.clear();
        self.lp.clear();
        self.routed_experts = None;
        self.has_mask = false;
        self.mask_ids.clear();
        self.mask_lens.clear();
        self.weight_versions = None;
    }
}

/// Chunk-level fields of one event (borrowed from the event data).
#[derive(Debug, Default)]
struct ChunkFields<'a> {
    id: Option<Cow<'a, str>>,
    model: Option<Cow<'a, str>>,
    usage: Option<Usage>,
    metrics: Option<Vec<(String, f64)>>,
    error: Option<ServerError>,
    /// Chat puts `prompt_token_ids` on the chunk, not on the choice.
    has_prompt: bool,
    n_choices: usize,
}

/// Reusable buffers for parsing events.
#[derive(Debug, Default)]
struct Scratch {
    choices: Vec<ChoiceDelta>,
    prompt: Vec<u32>,
    /// The last event's bytes up to the value of `choices`, when everything
    /// before it was inert (see [`parse_chunk`]).
    prefix: Vec<u8>,
}

fn u32_array(r: &mut Reader<'_>, out: &mut Vec<u32>) -> json::Result<()> {
    r.array(|r| r.u32().map(|v| out.push(v)))
}

fn opt_string(r: &mut Reader<'_>) -> json::Result<Option<String>> {
    if r.null()? {
        Ok(None)
    } else {
        r.string().map(|s| Some(s.into_owned()))
    }
}

/// Append a string value unless it is null; returns whether one was present.
fn append_string(r: &mut Reader<'_>, out: &mut String) -> json::Result<bool> {
    if r.null()? {
        return Ok(false);
    }
    out.push_str(&r.string()?);
    Ok(true)
}

fn parse_candidate(r: &mut Reader<'_>, lp: &mut LpDelta) -> json::Result<()> {
    let mut token: Option<Cow<'_, str>> = None;
    let mut id = None;
    let mut value = f64::NAN;
    r.object(|r, k| {
        match k {
            b"token" => token = if r.null()? { None } else { Some(r.string()?) },
            b"token_id" => id = if r.null()? { None } else { Some(r.u32()?) },
            b"logprob" => value = r.f64_or_null()?,
            _ => r.skip()?,
        }
        Ok(())
    })?;
    lp.push_candidate(token.as_deref(), id, value);
    Ok(())
}

fn parse_content_entry(r: &mut Reader<'_>, lp: &mut LpDelta) -> json::Result<()> {
    let mut token: Option<Cow<'_, str>> = None;
    let mut id = None;
    let mut value = f64::NAN;
    let mut rank = None;
    let before = lp.top_lps.len();
    let mut has_top = false;
    r.object(|r, k| {
        match k {
            b"token" => token = if r.null()? { None } else { Some(r.string()?) },
            b"token_id" => id = if r.null()? { None } else { Some(r.u32()?) },
            b"logprob" => value = r.f64_or_null()?,
            b"rank" => rank = if r.null()? { None } else { Some(r.i64()?) },
            b"top_logprobs" => {
                // A repeated key replaces the earlier value, as in json.loads.
                truncate_candidates(lp, before);
                has_top = !r.null()?;
                if has_top {
                    r.array(|r| parse_candidate(r, lp))?;
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    let entry_id = id.map(i64::from).or_else(|| token.as_deref().and_then(token_id_string));
    lp.entry_ids.push(entry_id.unwrap_or(-1));
    lp.lps.push(value);
    lp.has_ranks |= rank.is_some();
    lp.ranks.push(rank.unwrap_or(-1));
    lp.has_top |= has_top;
    lp.top_rows.push((lp.top_lps.len() - before) as u32);
    Ok(())
}

fn truncate_candidates(lp: &mut LpDelta, n: usize) {
    lp.top_ids.truncate(n);
    lp.top_lps.truncate(n);
    if lp.top_strs.offsets.len() > n + 1 {
        lp.top_strs.offsets.truncate(n + 1);
        let end = lp.top_strs.offsets.last().map_or(0, |&e| e as usize);
        lp.top_strs.bytes.truncate(end);
    }
}

fn parse_logprobs(r: &mut Reader<'_>, lp: &mut LpDelta) -> json::Result<()> {
    lp.clear();
    if r.null()? {
        return Ok(());
    }
    let mut has_token_lps = false;
    let mut has_content = false;
    r.object(|r, k| {
        match k {
            b"token_logprobs" => {
                lp.lps.clear();
                has_token_lps = !r.null()?;
                if has_token_lps {
                    r.array(|r| r.f64_or_null().map(|v| lp.lps.push(v)))?;
                }
            }
            b"top_logprobs" => {
                lp.top_rows.clear();
                truncate_candidates(lp, 0);
                lp.has_top = !r.null()?;
                if lp.has_top {
                    r.array(|r| {
                        let before = lp.top_lps.len();
                        if !r.null()? {
                            r.object(|r, key| {
                                let v = r.f64_or_null()?;
                                let token = std::str::from_utf8(key)
                                    .map_err(|_| JsonError { pos: r.pos(), msg: "invalid UTF-8 in key".into() })?;
                                lp.push_candidate(Some(token), None, v);
                                Ok(())
                            })?;
                        }
                        lp.top_rows.push((lp.top_lps.len() - before) as u32);
                        Ok(())
                    })?;
                }
            }
            b"content" => {
                has_content = !r.null()?;
                if has_content {
                    let mut fresh = LpDelta::default();
                    std::mem::swap(&mut fresh, lp);
                    fresh.clear();
                    let res = r.array(|r| parse_content_entry(r, &mut fresh));
                    std::mem::swap(&mut fresh, lp);
                    res?;
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    lp.kind = if has_content {
        LpKind::Content
    } else if has_token_lps {
        LpKind::Legacy
    } else {
        LpKind::None
    };
    Ok(())
}

fn parse_choice(r: &mut Reader<'_>, c: &mut ChoiceDelta) -> json::Result<()> {
    c.clear();
    r.object(|r, k| {
        match k {
            b"index" => c.index = Some(r.u32()?),
            b"text" => {
                c.text.clear();
                c.has_text = append_string(r, &mut c.text)?;
            }
            b"delta" => {
                if !r.null()? {
                    r.object(|r, k| {
                        match k {
                            b"content" => c.has_text |= append_string(r, &mut c.text)?,
                            b"reasoning_content" | b"reasoning" => {
                                c.has_reasoning |= append_string(r, &mut c.reasoning)?
                            }
                            _ => r.skip()?,
                        }
                        Ok(())
                    })?;
                }
            }
            b"logprobs" => parse_logprobs(r, &mut c.lp)?,
            b"finish_reason" => c.finish_reason = opt_string(r)?,
            b"stop_reason" => {
                c.stop_reason = match r.peek() {
                    Some(b'"') => Some(StopReason::Text(r.string()?.into_owned())),
                    _ if r.null()? => None,
                    _ => Some(StopReason::Token(r.i64()?)),
                }
            }
            b"prompt_token_ids" => {
                c.prompt.clear();
                c.has_prompt = !r.null()?;
                if c.has_prompt {
                    u32_array(r, &mut c.prompt)?;
                }
            }
            b"token_ids" => {
                c.ids.clear();
                c.has_ids = !r.null()?;
                if c.has_ids {
                    u32_array(r, &mut c.ids)?;
                }
            }
            b"routed_experts" => c.routed_experts = opt_string(r)?,
            b"sampling_mask" => {
                c.mask_ids.clear();
                c.mask_lens.clear();
                c.has_mask = !r.null()?;
                if c.has_mask {
                    r.array(|r| {
                        let before = c.mask_ids.len();
                        r.array(|r| {
                            let pos = r.pos();
                            let id = r.u32()?;
                            let id = i32::try_from(id).map_err(|_| JsonError {
                                pos,
                                msg: format!("mask token id {id} out of range").into(),
                            })?;
                            c.mask_ids.push(id);
                            Ok(())
                        })?;
                        c.mask_lens.push((c.mask_ids.len() - before) as i64);
                        Ok(())
                    })?;
                }
            }
            b"weight_versions" => {
                c.weight_versions = if r.null()? {
                    None
                } else {
                    let mut spans = Vec::new();
                    r.array(|r| {
                        let (mut version, mut start, mut end) = (None, None, None);
                        r.object(|r, k| {
                            match k {
                                b"version" => version = Some(r.string()?.into_owned()),
                                b"start" => start = Some(r.i64()?),
                                b"end" => end = Some(r.i64()?),
                                _ => r.skip()?,
                            }
                            Ok(())
                        })?;
                        match (version, start, end) {
                            (Some(version), Some(start), Some(end)) if 0 <= start && start <= end => {
                                spans.push(WeightVersionSpan { version, start: start as u64, end: end as u64 });
                                Ok(())
                            }
                            _ => r.err("weight_versions entry needs a version and 0 <= start <= end"),
                        }
                    })?;
                    Some(spans)
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })
}

fn parse_usage(r: &mut Reader<'_>) -> json::Result<Option<Usage>> {
    if r.null()? {
        return Ok(None);
    }
    let mut u = Usage::default();
    r.object(|r, k| {
        match k {
            b"prompt_tokens" => u.prompt_tokens = r.i64()?,
            b"completion_tokens" => u.completion_tokens = r.i64()?,
            b"total_tokens" => u.total_tokens = r.i64()?,
            b"prompt_tokens_details" => {
                if !r.null()? {
                    r.object(|r, k| {
                        match k {
                            b"cached_tokens" if !r.null()? => u.cached_tokens = Some(r.i64()?),
                            _ => r.skip()?,
                        }
                        Ok(())
                    })?;
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Some(u))
}

fn parse_metrics(r: &mut Reader<'_>) -> json::Result<Option<Vec<(String, f64)>>> {
    if r.null()? {
        return Ok(None);
    }
    let mut m = Vec::new();
    r.object(|r, k| {
        match r.peek() {
            Some(b'-' | b'0'..=b'9') => {
                let v = r.f64()?;
                m.push((String::from_utf8_lossy(k).into_owned(), v));
            }
            // Nested objects (speculative_decoding) and nulls are not metrics we track.
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Some(m))
}

fn parse_error(r: &mut Reader<'_>, offset: u64) -> json::Result<Option<ServerError>> {
    if r.null()? {
        return Ok(None);
    }
    let mut e = ServerError { message: String::new(), error_type: None, code: None, param: None, offset };
    if r.peek() == Some(b'"') {
        e.message = r.string()?.into_owned();
        return Ok(Some(e));
    }
    r.object(|r, k| {
        match k {
            b"message" => e.message = opt_string(r)?.unwrap_or_default(),
            b"type" => e.error_type = opt_string(r)?,
            b"param" => e.param = if r.peek() == Some(b'"') { opt_string(r)? } else { r.skip().map(|_| None)? },
            b"code" => {
                e.code = match r.peek() {
                    Some(b'"') => Some(r.string()?.into_owned()),
                    _ if r.null()? => None,
                    _ => Some(r.i64()?.to_string()),
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Some(e))
}

fn chunk_member<'a>(
    r: &mut Reader<'a>,
    k: &[u8],
    f: &mut ChunkFields<'a>,
    choices: &mut Vec<ChoiceDelta>,
    prompt: &mut Vec<u32>,
    offset: u64,
) -> json::Result<()> {
    match k {
        b"id" | b"request_id" => {
            if !r.null()? {
                let s = r.string()?;
                // `request_id` (generate endpoint) wins over `id`.
                if k == b"request_id" || f.id.is_none() {
                    f.id = Some(s);
                }
            }
        }
        b"model" => f.model = if r.null()? { None } else { Some(r.string()?) },
        b"choices" => {
            f.n_choices = 0;
            if !r.null()? {
                r.array(|r| {
                    if f.n_choices == choices.len() {
                        choices.push(ChoiceDelta::default());
                    }
                    let res = parse_choice(r, &mut choices[f.n_choices]);
                    f.n_choices += 1;
                    res
                })?;
            }
        }
        b"usage" => f.usage = parse_usage(r)?,
        b"metrics" => f.metrics = parse_metrics(r)?,
        b"error" => f.error = parse_error(r, offset)?,
        b"prompt_token_ids" => {
            prompt.clear();
            f.has_prompt = !r.null()?;
            if f.has_prompt {
                u32_array(r, prompt)?;
            }
        }
        _ => r.skip()?,
    }
    Ok(())
}

/// Members that may precede `choices` without effects beyond what the first
/// event recorded (the request id and model are kept from the first event).
fn inert_member(k: &[u8]) -> bool {
    matches!(k, b"id" | b"request_id" | b"object" | b"created" | b"model" | b"output_mode" | b"system_fingerprint")
}

fn parse_chunk<'a>(r: &mut Reader<'a>, st: &mut Scratch, offset: u64) -> json::Result<ChunkFields<'a>> {
    let mut f = ChunkFields::default();
    let Scratch { choices, prompt, prefix } = st;
    prompt.clear();
    let data = r.buf();
    // vLLM repeats the same `{"id":..,"object":..,"created":..,"model":..,"choices":`
    // at the start of every event. When the bytes are identical to the last
    // event's validated prefix, they carry nothing new: resume at `choices`.
    if !prefix.is_empty() && data.len() > prefix.len() && data[..prefix.len()] == prefix[..] {
        r.set_pos(prefix.len());
        r.object_resume(b"choices", |r, k| chunk_member(r, k, &mut f, choices, prompt, offset))?;
        r.end()?;
        return Ok(f);
    }
    let mut inert = true;
    let mut prefix_end = None;
    r.object(|r, k| {
        if prefix_end.is_none() {
            if k == b"choices" {
                prefix_end = Some(r.pos());
            } else if !inert_member(k) && r.peek() != Some(b'n') {
                inert = false;
            }
        }
        chunk_member(r, k, &mut f, choices, prompt, offset)
    })?;
    r.end()?;
    prefix.clear();
    if let (true, Some(end)) = (inert, prefix_end) {
        prefix.extend_from_slice(&data[..end]);
    }
    Ok(f)
}

// ---------------------------------------------------------------------------

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
    let mut d = StreamDecoder::new();
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

fn apply_chunk(out: &mut StreamOutput, f: ChunkFields<'_>, st: &mut Scratch, offset: u64) -> Result<(), String> {
    if let Some(mut e) = f.error {
        if out.error.is_none() {
            e.offset = offset;
            out.error = Some(e);
        }
    }
    if out.request_id.is_none() {
        out.request_id = f.id.map(Cow::into_owned);
    }
    if out.model.is_none() {
        out.model = f.model.map(Cow::into_owned);
    }
    if let Some(u) = f.usage {
        out.usage = Some(u);
    }
    if let Some(m) = f.metrics {
        out.metrics = m;
    }
    let top_prompt = f.has_prompt.then_some(st.prompt.as_slice());
    for delta in &mut st.choices[..f.n_choices] {
        let Some(index) = delta.index else {
            return Err("choice without an `index`".into());
        };
        let c = choice_mut(out, index)?;
        apply_choice(c, delta, top_prompt)?;
    }
    Ok(())
}

fn apply_choice(c: &mut ChoiceOutput, d: &mut ChoiceDelta, top_prompt: Option<&[u32]>) -> Result<(), String> {
    let idx = c.index;
    if !d.has_ids && d.lp.kind == LpKind::Content && d.lp.entry_ids.iter().all(|&i| i >= 0) {
        // Chat without `return_token_ids`: the sampled ids are still known
        // from the logprob entries (`token_id` or `token_id:N` strings).
        d.has_ids = true;
        d.ids.extend(d.lp.entry_ids.iter().map(|&i| i as u32));
    } else if d.has_ids && d.lp.kind == LpKind::Content {
        for (i, (&e, &t)) in d.lp.entry_ids.iter().zip(&d.ids).enumerate() {
            if e >= 0 && e != i64::from(t) {
                return Err(format!("choice {idx}: logprob entry {i} is for token {e} but token_ids has {t}"));
            }
        }
    }
    if c.finish_reason.is_some() && !d.ids.is_empty() {
        return Err(format!("choice {idx}: tokens after its finish_reason"));
    }
    let prompt = if d.has_prompt { Some(d.prompt.as_slice()) } else { top_prompt };
    if let Some(p) = prompt {
        if c.prompt_token_ids.is_none() {
            c.prompt_token_ids = Some(p.iter().map(|&t| i64::from(t)).collect());
        }
    }
    let before = c.token_ids.len();
    let new_tokens = d.ids.len();
    c.token_ids.extend(d.ids.iter().map(|&t| i64::from(t)));
    if d.has_text {
        c.text.push_str(&d.text);
    }
    if d.has_reasoning {
        c.reasoning.push_str(&d.reasoning);
    }
    if d.lp.kind != LpKind::None {
        // With `echo`, the first chunk's logprob lists cover the prompt too.
        let echo = if d.lp.kind == LpKind::Legacy
            && d.has_prompt
            && before == 0
            && c.prompt_logprobs.is_empty()
            && !d.prompt.is_empty()
            && d.lp.lps.len() == d.prompt.len() + new_tokens
        {
            d.prompt.len()
        } else {
            0
        };
        apply_logprobs(c, &d.lp, before, new_tokens, d.has_ids, echo)?;
    }
    if d.has_mask {
        let (ids, offs) = c.sampling_mask.get_or_insert_with(|| (Vec::new(), vec![0]));
        // Rows already present must line up with earlier tokens.
        let rows_before = offs.len() - 1;
        if rows_before != before {
            return Err(format!("choice {idx}: sampling_mask rows ({rows_before}) out of step with tokens ({before})"));
        }
        if d.has_ids && d.mask_lens.len() != new_tokens {
            return Err(format!(
                "choice {idx}: {} sampling_mask rows for {new_tokens} tokens in one chunk",
                d.mask_lens.len()
            ));
        }
        let mut end = *offs.last().unwrap_or(&0);
        for &n in &d.mask_lens {
            end += n;
            offs.push(end);
        }
        ids.extend_from_slice(&d.mask_ids);
    }
    if let Some(re) = &d.routed_experts {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(re.as_bytes())
            .map_err(|e| format!("choice {idx}: routed_experts is not base64: {e}"))?;
        let arr = parse_npy(&raw).map_err(|e| format!("choice {idx}: routed_experts: {e}"))?;
        append_rows(&mut c.routed_experts, arr).map_err(|e| format!("choice {idx}: routed_experts: {e}"))?;
    }
    if let Some(wv) = d.weight_versions.take() {
        c.weight_versions = wv;
    }
    if let Some(fr) = d.finish_reason.take() {
        c.finish_reason = Some(fr);
    }
    if let Some(sr) = d.stop_reason.take() {
        c.stop_reason = Some(sr);
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
    lp: &LpDelta,
    tokens_before: usize,
    new_tokens: usize,
    has_ids: bool,
    echo: usize,
) -> Result<(), String> {
    let idx = c.index;
    c.has_logprobs = true;
    if c.logprobs.len() != tokens_before {
        return Err(format!(
            "choice {idx}: logprobs ({}) out of step with token ids ({tokens_before})",
            c.logprobs.len()
        ));
    }
    let entries = lp.lps.len();
    if has_ids && entries - echo != new_tokens {
        return Err(format!("choice {idx}: {} logprobs for {new_tokens} token ids in one chunk", entries - echo));
    }
    c.prompt_logprobs.extend(lp.lps[..echo].iter().map(|&l| l as f32));
    c.logprobs.extend(lp.lps[echo..].iter().map(|&l| l as f32));
    if lp.has_ranks {
        if c.ranks.len() != tokens_before {
            return Err(format!("choice {idx}: ranks out of step with tokens"));
        }
        c.ranks.extend_from_slice(&lp.ranks);
    }
    if lp.has_top {
        if lp.top_rows.len() != entries {
            return Err(format!("choice {idx}: {} top_logprobs rows for {entries} logprobs", lp.top_rows.len()));
        }
        let mut cand = 0usize;
        for (i, &n) in lp.top_rows.iter().enumerate() {
            let slot = if i < echo { &mut c.prompt_top_logprobs } else { &mut c.top_logprobs };
            let top = slot.get_or_insert_with(|| TopLogprobs { offsets: vec![0], ..Default::default() });
            if i >= echo {
                // Rows stay aligned with tokens even when earlier chunks had none.
                while top.offsets.len() < tokens_before + (i - echo) + 1 {
                    top.offsets.push(top.logprobs.len() as i64);
                }
            }
            let end = cand + n as usize;
            top.token_ids.extend_from_slice(&lp.top_ids[cand..end]);
            top.logprobs.extend(lp.top_lps[cand..end].iter().map(|&l| l as f32));
            top.tokens.extend_from(&lp.top_strs, cand, end);
            cand = end;
            top.offsets.push(top.logprobs.len() as i64);
        }
    }
    if let Some(top) = &mut c.top_logprobs {
        while top.offsets.len() < c.logprobs.len() + 1 {
            top.offsets.push(top.logprobs.len() as i64);
        }
    }
    Ok(())
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
            let data: Vec<u8> = (0..(rows * 2) as i32).flat_map(|v| v.to_le_bytes()).collect();
            base64::engine::general_purpose::STANDARD.encode(crate::npy::npy_for_tests(
                "<i4",
                &format!("({rows}, 2)"),
                &data,
            ))
        }
        let e1 = format!(r#"{{"choices":[{{"index":0,"token_ids":[1],"routed_experts":"{}"}}]}}"#, npy_b64(1));
        let e2 = format!(r#"{{"choices":[{{"index":0,"token_ids":[2,3],"routed_experts":"{}"}}]}}"#, npy_b64(2));
        let out = decode_stream(&body(&[&e1, &e2, "[DONE]"])).unwrap();
        let re = out.choices[0].routed_experts.as_ref().unwrap();
        assert_eq!(re.shape, vec![3, 2]);
        assert_eq!(re.data.len(), 24);
    }
}
