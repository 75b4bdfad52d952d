//! Both codecs end to end: round trips, determinism, named mismatches,
//! corruption and wrong bases.

use std::collections::BTreeMap;

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
