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

mod columns;
mod decoder;
mod event;
mod types;

pub use decoder::{decode_stream, decode_stream_capped, StreamDecoder};
pub use types::{
    ChoiceOutput, DecodeError, DecodeErrorKind, ServerError, StopReason, StreamOutput, StringTable, TopLogprobs, Usage,
    WeightVersionSpan, MAX_CHOICES,
};

#[cfg(test)]
mod tests;
