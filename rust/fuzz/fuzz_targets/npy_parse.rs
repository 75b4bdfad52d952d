//! `.npy` payloads (routed experts) through the reader: an error, or an
//! array whose bytes are exactly its shape times its item size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollstream_core::npy::parse_npy;

fuzz_target!(|data: &[u8]| {
    // Half the inputs get a valid magic, version and header length, so the
    // fuzzer spends its time on the header dict and the data.
    let image = match data.split_first() {
        Some((&m, rest)) if m % 2 == 1 => {
            let split = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |p| p + 1);
            let mut img = b"\x93NUMPY\x01\x00".to_vec();
            img.extend_from_slice(&(split.min(usize::from(u16::MAX)) as u16).to_le_bytes());
            img.extend_from_slice(rest);
            img
        }
        _ => data.to_vec(),
    };
    if let Ok(a) = parse_npy(&image) {
        let elems = a.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        assert_eq!(elems.and_then(|e| e.checked_mul(a.dtype.itemsize())), Some(a.data.len()));
    }
});
