//! Arbitrary bytes, split at an arbitrary point, through the SSE + vLLM
//! decoder: must return a result or an error, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollstream_core::vllm::StreamDecoder;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut d = StreamDecoder::new();
    if d.feed(&data[..split]).is_ok() && d.feed(&data[split..]).is_ok() {
        let _ = d.finish();
    }
});
