//! Safetensors images through the one header parser: the codecs' reader
//! (`SafeTensors::from_bytes`) and the header-only one (`parse_header`).
//! Whatever they accept must describe tensors inside the data, sized as
//! their dtype and shape say.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rollstream_core::snapshot::safetensors::{parse_header, Dtype, SafeTensors};

fuzz_target!(|data: &[u8]| {
    // Half the inputs are a header (JSON) with a data section of 64 bytes.
    let image = match data.split_first() {
        Some((&m, rest)) if m % 2 == 1 => {
            let mut img = (rest.len() as u64).to_le_bytes().to_vec();
            img.extend_from_slice(rest);
            img.extend_from_slice(&[0u8; 64]);
            img
        }
        _ => data.to_vec(),
    };
    if let Some(json) = image.get(8..) {
        let n = u64::from_le_bytes(image[..8].try_into().expect("8 bytes"));
        if let Some(h) = usize::try_from(n).ok().and_then(|n| json.get(..n)) {
            let data_len = json.len() - h.len();
            if let Ok(header) = parse_header(h, data_len, Path::new("<fuzz>")) {
                for t in &header.tensors {
                    assert!(t.start <= t.end && t.end <= data_len, "{t:?} outside {data_len} bytes");
                    if let Some(d) = Dtype::parse(&t.dtype) {
                        assert_eq!(d.nbytes(&t.shape), Some(t.end - t.start), "{t:?}");
                    }
                }
            }
        }
    }
    if let Ok(st) = SafeTensors::from_bytes(image) {
        for (_, v) in st.tensors() {
            assert_eq!(v.dtype.nbytes(v.shape), Some(v.data.len()));
        }
    }
});
