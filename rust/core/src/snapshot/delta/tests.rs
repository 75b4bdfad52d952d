//! Both codecs end to end: round trips, determinism, named mismatches,
//! corruption and wrong bases.

use std::collections::BTreeMap;

use super::types::MAX_CHUNK_ELEMS;
use super::*;
use crate::snapshot::checksum::adler32;
use crate::snapshot::safetensors::{Dtype, TensorView};
use crate::snapshot::SnapshotError;

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn views<'a>(items: &'a [(&'a str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<Named<'a>> {
    items.iter().map(|(n, d, s, data)| Named { name: n, view: TensorView { dtype: *d, shape: s, data } }).collect()
}

fn checkpoint(seed: u32, n: usize, change_every: usize) -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    let base: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
    let w: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, x)| if seed > 0 && i % change_every == 0 { x + 1e-3 * ((i as f32) * 1.3).cos() } else { *x })
        .collect();
    let bf: Vec<u8> = w.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
    vec![
        ("w", Dtype::F32, vec![n / 10, 10], f32s(&w)),
        ("b", Dtype::BF16, vec![n], bf),
        ("i", Dtype::I64, vec![3], [1i64, -2, seed as i64].iter().flat_map(|x| x.to_le_bytes()).collect()),
    ]
}

#[test]
fn both_formats_round_trip() {
    for change_every in [1, 10] {
        let old = checkpoint(0, 50_000, change_every);
        let new = checkpoint(1, 50_000, change_every);
        for fmt in [Format::ArcV2, Format::Rsd1] {
            let opts = EncodeOptions { format: fmt, level: 3, chunk_elems: 7000 };
            let (bytes, stats) = match fmt {
                Format::ArcV2 => encode_arc_v2(&views(&old), &views(&new), 3).unwrap(),
                Format::Rsd1 => encode_rsd1(&views(&old), &views(&new), opts, &BTreeMap::new()).unwrap(),
            };
            assert!(stats.encoded_bytes < stats.raw_bytes, "{fmt:?} {change_every}");
            let (decoded, dstats) = decode_to_vecs(&views(&old), &bytes).unwrap();
            for (d, (name, dtype, shape, data)) in decoded.iter().zip(&new) {
                assert_eq!(&d.name, name);
                assert_eq!(d.dtype, *dtype);
                assert_eq!(&d.shape, shape);
                assert_eq!(&d.data, data, "{fmt:?} {name}");
                assert_eq!(dstats.adler32[*name], adler32(1, data));
            }
        }
    }
}

#[test]
fn rsd1_is_deterministic_and_detects_wrong_base_and_corruption() {
    let old = checkpoint(0, 30_000, 3);
    let new = checkpoint(1, 30_000, 3);
    let opts = EncodeOptions { chunk_elems: 4096, ..Default::default() };
    let (a, _) = encode_rsd1(&views(&old), &views(&new), opts, &BTreeMap::new()).unwrap();
    let (b, _) = encode_rsd1(&views(&old), &views(&new), opts, &BTreeMap::new()).unwrap();
    assert_eq!(a, b);
    // Wrong base: named tensor and chunk.
    match decode_to_vecs(&views(&new), &a) {
        Err(SnapshotError::Checksum { tensor, chunk: Some(0), .. }) => assert_eq!(tensor, "w"),
        other => panic!("{other:?}"),
    }
    // Flip a payload byte near the end.
    let mut bad = a.clone();
    let n = bad.len();
    bad[n - 10] ^= 0x40;
    assert!(matches!(decode_to_vecs(&views(&old), &bad), Err(SnapshotError::Checksum { .. })));
    // Truncation.
    assert!(decode_to_vecs(&views(&old), &a[..n - 100]).is_err());
    assert!(decode_to_vecs(&views(&old), &a[..20]).is_err());
}

#[test]
fn mismatches_are_named() {
    let old = checkpoint(0, 1000, 1);
    let mut new = checkpoint(1, 1000, 1);
    new[0].2 = vec![10, 100];
    match encode_rsd1(&views(&old), &views(&new), EncodeOptions::default(), &BTreeMap::new()) {
        Err(SnapshotError::Mismatch { tensor, .. }) => assert_eq!(tensor, "w"),
        other => panic!("{other:?}"),
    }
    let new = checkpoint(1, 1000, 1);
    assert!(encode_arc_v2(&views(&old[..2]), &views(&new), 3).is_err());
    let (delta, _) = encode_arc_v2(&views(&old), &views(&new), 3).unwrap();
    match decode_to_vecs(&views(&new), &delta) {
        Err(SnapshotError::Checksum { tensor, .. }) => assert!(["w", "b", "i"].contains(&tensor.as_str())),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sparse_updates_compress_well() {
    let old = checkpoint(0, 200_000, 10);
    let new = checkpoint(1, 200_000, 10);
    let (bytes, stats) = encode_rsd1(&views(&old), &views(&new), EncodeOptions::default(), &BTreeMap::new()).unwrap();
    let ratio = stats.raw_bytes as f64 / bytes.len() as f64;
    assert!(ratio > 8.0, "sparse ratio {ratio}");
}

/// An rsd1 image whose JSON header `edit` rewrote (payload unchanged).
fn recraft(image: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let hlen = u64::from_le_bytes(image[8..16].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&image[16..16 + hlen]).unwrap();
    edit(&mut header);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = RSD_MAGIC.to_vec();
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&image[16 + hlen..]);
    out
}

#[test]
fn crafted_rsd1_headers_are_corrupt_not_panics() {
    let old = checkpoint(0, 5000, 3);
    let new = checkpoint(1, 5000, 3);
    let opts = EncodeOptions { chunk_elems: 1000, ..Default::default() };
    let (good, _) = encode_rsd1(&views(&old), &views(&new), opts, &BTreeMap::new()).unwrap();
    let corrupt = |bytes: Vec<u8>, want: &str| match decode_to_vecs(&views(&old), &bytes) {
        Err(SnapshotError::Corrupt { message, .. }) => assert!(message.contains(want), "{message}"),
        other => panic!("expected Corrupt({want}), got {other:?}"),
    };
    // chunk_elems * width used to wrap to 0, then div_ceil(0) panicked.
    for huge in [1u64 << 62, u64::MAX, 1 << 32, 0] {
        corrupt(recraft(&good, |h| h["chunk_elems"] = huge.into()), "chunk_elems");
    }
    // A name given twice used to decode one tensor twice and drop another.
    corrupt(
        recraft(&good, |h| {
            let first = h["tensors"][0].clone();
            h["tensors"][1]["name"] = first["name"].clone();
        }),
        "twice",
    );
    let mut short = good.clone();
    short[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    corrupt(short, "header length");
    corrupt(good[..12].to_vec(), "too short");
    // Shapes the base does not have never size anything.
    let wide = recraft(&good, |h| h["tensors"][0]["shape"] = serde_json::json!([1u64 << 60, 1 << 10]));
    assert!(matches!(decode_to_vecs(&views(&old), &wide), Err(SnapshotError::Mismatch { .. })));
}

#[test]
fn chunk_sizes_and_duplicate_names_are_refused_when_encoding() {
    let old = checkpoint(0, 1000, 1);
    let new = checkpoint(1, 1000, 1);
    for bad in [0, MAX_CHUNK_ELEMS + 1, 1 << 62, usize::MAX] {
        let opts = EncodeOptions { chunk_elems: bad, ..Default::default() };
        match encode_rsd1(&views(&old), &views(&new), opts, &BTreeMap::new()) {
            Err(SnapshotError::Invalid(m)) => assert!(m.contains(&format!("chunk_elems={bad}")), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(EncodeOptions::new("rsd1", 1, bad).is_err());
    }
    // One chunk per tensor at the largest size.
    let opts = EncodeOptions { chunk_elems: MAX_CHUNK_ELEMS, ..Default::default() };
    let (bytes, _) = encode_rsd1(&views(&old), &views(&new), opts, &BTreeMap::new()).unwrap();
    assert_eq!(decode_to_vecs(&views(&old), &bytes).unwrap().0[0].data, new[0].3);
    // `new` naming a tensor twice (and missing another) used to pass the count check.
    let mut twice = views(&new);
    twice[1] = twice[0];
    for fmt in [Format::ArcV2, Format::Rsd1] {
        let r = match fmt {
            Format::ArcV2 => encode_arc_v2(&views(&old), &twice, 1).map(|_| ()),
            Format::Rsd1 => encode_rsd1(&views(&old), &twice, EncodeOptions::default(), &BTreeMap::new()).map(|_| ()),
        };
        match r {
            Err(SnapshotError::Mismatch { tensor, message }) => {
                assert!(message.contains("twice"), "{tensor}: {message}")
            }
            other => panic!("{fmt:?}: {other:?}"),
        }
    }
    assert!(EncodeOptions::new("rsd1", 23, 10).is_err());
    assert!(EncodeOptions::new("zip", 1, 10).is_err());
}
