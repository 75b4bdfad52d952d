//! Property tests of the stream core on the recorded vLLM bodies:
//! any chunking gives the same result; any mutation gives a result or an
//! error, never a panic; any truncation is reported as truncated or invalid.

use std::path::PathBuf;

use proptest::prelude::*;
use rollstream_core::vllm::{decode_stream, DecodeErrorKind, StreamDecoder};

fn streams() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/streams");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/data/streams exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "sse") {
            out.push(std::fs::read(&path).expect("readable stream"));
        }
    }
    out.sort_by_key(Vec::len);
    assert_eq!(out.len(), 4);
    out
}

/// A small recorded stream, cut to its first `events` events plus `[DONE]`.
fn small(body: &[u8], events: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let lines: Vec<&[u8]> = body.split_inclusive(|&b| b == b'\n').collect();
    for ev in lines.chunks(2).filter(|ev| !ev[0].starts_with(b"data: [DONE]")).take(events) {
        for line in ev {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

fn decode_in_chunks(
    body: &[u8],
    cuts: &[usize],
) -> Result<rollstream_core::vllm::StreamOutput, rollstream_core::vllm::DecodeError> {
    let mut d = StreamDecoder::new();
    let mut prev = 0;
    for &c in cuts {
        let c = c.min(body.len()).max(prev);
        d.feed(&body[prev..c])?;
        prev = c;
    }
    d.feed(&body[prev..])?;
    d.finish()
}

#[test]
fn every_recorded_stream_decodes() {
    for body in streams() {
        let out = decode_stream(&body).expect("recorded stream decodes");
        assert!(out.done);
        assert!(!out.choices.is_empty());
        for c in &out.choices {
            assert!(!c.token_ids.is_empty());
            assert_eq!(c.logprobs.len(), c.token_ids.len());
            assert!(c.finish_reason.is_some());
        }
    }
}

#[test]
fn byte_at_a_time_equals_whole() {
    for body in streams() {
        let body = small(&body, 40);
        let cuts: Vec<usize> = (1..body.len()).collect();
        assert_eq!(decode_in_chunks(&body, &cuts).unwrap(), decode_stream(&body).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_chunking_gives_the_same_result(which in 0usize..4, mut cuts in proptest::collection::vec(0usize..200_000, 0..64)) {
        let bodies = streams();
        let body = &bodies[which];
        cuts.sort_unstable();
        let whole = decode_stream(body).unwrap();
        prop_assert_eq!(decode_in_chunks(body, &cuts).unwrap(), whole);
    }

    #[test]
    fn mutations_never_panic(which in 0usize..4, edits in proptest::collection::vec((0usize..100_000, any::<u8>()), 1..8)) {
        let bodies = streams();
        let mut body = small(&bodies[which], 30);
        for (at, byte) in edits {
            let n = body.len();
            body[at % n] = byte;
        }
        // Either a result or a typed error; reaching here means no panic.
        let _ = decode_stream(&body);
    }

    #[test]
    fn truncation_is_never_silent(which in 0usize..4, cut in 0usize..100_000) {
        let bodies = streams();
        let body = small(&bodies[which], 30);
        let cut = cut % body.len();
        let err = decode_stream(&body[..cut]).unwrap_err();
        prop_assert!(matches!(err.kind, DecodeErrorKind::Truncated | DecodeErrorKind::Protocol), "{}", err);
    }
}
