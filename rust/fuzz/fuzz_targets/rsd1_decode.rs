//! rsd1 images (raw, edited, or with a fuzzed header) decoded against a
//! fixed base: an error, or tensors shaped like the base's; an edited valid
//! image decodes to exactly the new checkpoint or fails (XXH3 per chunk),
//! never to other data. Never a panic, never an unbounded allocation.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use rollstream_core::snapshot::delta::{decode_to_vecs, RSD_MAGIC};

fuzz_target!(|data: &[u8]| {
    let f = common::fixture();
    let (made, image) = common::make(&f.rsd1, RSD_MAGIC, data);
    if let Ok((out, _)) = decode_to_vecs(&f.base(), &image) {
        assert!(f.well_formed(&out), "decoded tensors do not fit the base");
        if made == common::Made::Edited {
            assert!(f.is_new(&out), "an edited rsd1 delta decoded to different data");
        }
    }
});
