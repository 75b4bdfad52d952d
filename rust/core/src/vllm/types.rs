//! What a decoded stream is made of: per-choice columns, usage, metrics,
//! the server's error event, and the decoder's own error type.

use std::fmt;

use crate::npy::NpyArray;
use crate::sse::EventTooLarge;

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

/// A runaway event is a protocol violation: no valid vLLM event is that large.
impl From<EventTooLarge> for DecodeError {
    fn from(e: EventTooLarge) -> Self {
        DecodeError {
            kind: DecodeErrorKind::Protocol,
            offset: e.offset,
            message: e.to_string(),
            excerpt: String::new(),
        }
    }
}

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
    pub(super) fn push(&mut self, s: &str) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.bytes.extend_from_slice(s.as_bytes());
        self.offsets.push(self.bytes.len() as i64);
    }

    /// Append strings `from..to` of `other` (one copy of their bytes).
    pub(super) fn extend_from(&mut self, other: &StringTable, from: usize, to: usize) {
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
