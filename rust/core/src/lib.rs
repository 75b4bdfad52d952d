//! rollstream-core: the hot path of rollstream, in plain Rust (no Python).
//!
//! - [`sse`]: incremental WHATWG Server-Sent-Events framing.
//! - [`vllm`]: vLLM stream decoding straight into columnar buffers.
//! - [`npy`]: the `.npy` payloads vLLM uses for routed experts.

pub mod npy;
pub mod sse;
pub mod vllm;

/// Version of the core crate.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
