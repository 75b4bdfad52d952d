//! arc_v2: per tensor, one zstd frame of `old ^ new`, stored in a
//! safetensors file as 1-D U8 blobs, with the new tensors' Adler-32 in
//! `__metadata__`.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::types::{index_by_name, pair, Named, OwnedTensor, Stats};
use super::zstd_frame::{decompress_exact, delta_cctx, encode_err};
use crate::snapshot::checksum::adler32;
use crate::snapshot::safetensors::{self, Dtype, SafeTensors, TensorMeta};
use crate::snapshot::SnapshotError;

/// arc_v2 tensors at least this large are compressed by zstd's own workers.
const MT_FRAME_BYTES: usize = 64 << 20;

fn xor_into(dst: &mut [u8], a: &[u8], b: &[u8]) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = x ^ y;
    }
}

/// XOR block fed to zstd at a time: small enough to stay in L2 while zstd
/// reads it, so a tensor's XOR never exists whole in memory.
const XOR_BLOCK: usize = 256 << 10;

/// One zstd frame of `old ^ new` that records its content size (the reference
/// decoder, python-zstd, requires it). The XOR is produced block by block into
/// a reused buffer and streamed into the compressor; a large tensor is still
/// one frame, split across zstd's own `workers` when non-zero.
fn xor_frame(name: &str, old: &[u8], new: &[u8], level: i32, workers: u32) -> Result<Vec<u8>, SnapshotError> {
    use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective as EndDirective;
    use zstd::zstd_safe::{InBuffer, OutBuffer};
    let code = |c: usize| encode_err(name, zstd::zstd_safe::get_error_name(c));
    let mut cctx = delta_cctx(level, workers).map_err(code)?;
    cctx.set_pledged_src_size(Some(new.len() as u64)).map_err(code)?;
    // compress_bound leaves room for the worst case, so no call below can
    // run out of output space (the capacity is only reserved, not touched).
    let mut out: Vec<u8> = Vec::with_capacity(zstd::zstd_safe::compress_bound(new.len()));
    let mut block = vec![0u8; XOR_BLOCK.min(new.len())];
    for (a, b) in old.chunks(XOR_BLOCK).zip(new.chunks(XOR_BLOCK)) {
        let x = &mut block[..b.len()];
        xor_into(x, a, b);
        let mut input = InBuffer::around(x);
        while input.pos() < x.len() {
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            cctx.compress_stream2(&mut output, &mut input, EndDirective::ZSTD_e_continue).map_err(code)?;
        }
    }
    loop {
        let pos = out.len();
        let mut output = OutBuffer::around_pos(&mut out, pos);
        let mut input = InBuffer::around(&[]);
        let remaining = cctx.compress_stream2(&mut output, &mut input, EndDirective::ZSTD_e_end).map_err(code)?;
        if remaining == 0 {
            break;
        }
        if out.len() == out.capacity() {
            out.reserve(remaining.max(1 << 16));
        }
    }
    out.shrink_to_fit();
    Ok(out)
}

/// Encode to an arc_v2 safetensors image.
pub fn encode_arc_v2(base: &[Named<'_>], new: &[Named<'_>], level: i32) -> Result<(Vec<u8>, Stats), SnapshotError> {
    let pairs = pair(base, new)?;
    let blobs: Vec<(Vec<u8>, u32)> = pairs
        .par_iter()
        .map(|(b, n)| {
            let workers = if n.view.data.len() >= MT_FRAME_BYTES { rayon::current_num_threads() as u32 } else { 0 };
            let frame = xor_frame(n.name, b.view.data, n.view.data, level, workers)?;
            Ok((frame, adler32(1, n.view.data)))
        })
        .collect::<Result<_, SnapshotError>>()?;
    let metas: Vec<TensorMeta> = pairs
        .iter()
        .zip(&blobs)
        .map(|((_, n), (f, _))| TensorMeta { name: n.name.to_string(), dtype: Dtype::U8, shape: vec![f.len()] })
        .collect();
    let metadata: BTreeMap<String, String> =
        pairs.iter().zip(&blobs).map(|((_, n), (_, a))| (n.name.to_string(), a.to_string())).collect();
    let mut out = Vec::new();
    safetensors::write_to(&mut out, &metas, &metadata, |i| &blobs[i].0)?;
    let stats = Stats {
        tensors: pairs.len(),
        raw_bytes: pairs.iter().map(|(_, n)| n.view.data.len() as u64).sum(),
        encoded_bytes: out.len() as u64,
        adler32: pairs.iter().zip(&blobs).map(|((_, n), (_, a))| (n.name.to_string(), *a)).collect(),
    };
    Ok((out, stats))
}

/// Decode an arc_v2 delta against `base`; every tensor is verified before
/// anything is returned.
pub fn decode_arc_v2(base: &[Named<'_>], delta: &SafeTensors) -> Result<Vec<OwnedTensor>, SnapshotError> {
    let index = index_by_name(base, "base")?;
    let entries = delta.tensors();
    if entries.len() != base.len() {
        return Err(SnapshotError::Invalid(format!(
            "delta has {} tensors, base has {}: the key sets must match",
            entries.len(),
            base.len()
        )));
    }
    entries
        .par_iter()
        .map(|(name, blob)| {
            let b = index.get(name).ok_or_else(|| SnapshotError::mismatch(name, "in the delta but not in the base"))?;
            if blob.dtype != Dtype::U8 || blob.shape.len() != 1 {
                return Err(SnapshotError::mismatch(name, "arc_v2 entries must be 1-D U8 blobs"));
            }
            let want: u32 = delta
                .metadata
                .get(*name)
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| SnapshotError::mismatch(name, "no Adler-32 checksum in the delta's metadata"))?;
            let x = decompress_exact(name, None, blob.data, b.view.data.len())?;
            let mut data = vec![0u8; x.len()];
            xor_into(&mut data, &x, b.view.data);
            let got = adler32(1, &data);
            if got != want {
                return Err(SnapshotError::Checksum {
                    tensor: name.to_string(),
                    chunk: None,
                    message: format!("Adler-32 {got} != {want} recorded: wrong base or corrupted delta"),
                });
            }
            Ok(OwnedTensor { name: name.to_string(), dtype: b.view.dtype, shape: b.view.shape.to_vec(), data })
        })
        .collect()
}
