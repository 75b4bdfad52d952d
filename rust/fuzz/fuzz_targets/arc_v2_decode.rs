//! arc_v2 images (raw, edited, or with a fuzzed safetensors header) decoded
//! against a fixed base: an error or tensors shaped like the base's. (arc_v2
//! verifies with Adler-32, which edits can defeat, so no exact-data oracle.)
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use rollstream_core::snapshot::delta::decode_to_vecs;

fuzz_target!(|data: &[u8]| {
    let f = common::fixture();
    let (_, image) = common::make(&f.arc_v2, b"", data);
    if image.starts_with(b"RSDELTA1") {
        return; // rsd1_decode's ground
    }
    if let Ok((out, _)) = decode_to_vecs(&f.base(), &image) {
        assert!(f.well_formed(&out), "decoded tensors do not fit the base");
    }
});
