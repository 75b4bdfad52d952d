//! rollstream-core: the hot path of rollstream, in plain Rust (no Python).
//!
//! - [`sse`]: incremental WHATWG Server-Sent-Events framing.
//! - [`vllm`]: vLLM stream decoding straight into columnar buffers.
//! - [`aimd`]: the adaptive concurrency window.
//! - [`http`]: the sampler's streaming HTTP/1.1 data plane (tokio + hyper).
//! - [`masks`]: applying sampling masks to logits.
//! - [`json`]: the strict, allocation-free JSON reader behind [`vllm`].
//! - [`tokenize`]: tokenizer.json + chat templates, transformers-exact.
//! - [`snapshot`]: checksums, safetensors, arc_v2 and rsd1 delta codecs.
//! - [`npy`]: the `.npy` payloads vLLM uses for routed experts.
//! - [`router`]: sticky least-loaded routing over several engines.
//! - [`timeouts`]: float seconds from callers, validated into durations.

// Malformed input must come back as an error value, never a panic (see
// STYLE.md): outside tests, unwrap/expect/panic need a local, argued allow.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod aimd;
pub mod http;
pub mod json;
pub mod masks;
pub mod npy;
pub mod router;
pub mod snapshot;
pub mod sse;
pub mod timeouts;
pub mod tokenize;
pub mod vllm;

/// Version of the core crate.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
