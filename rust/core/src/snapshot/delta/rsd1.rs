//! rsd1: the header, the parallel chunked encoder and the windowed,
//! verifying decoder.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::planes::{apply_chunk, chunk_body};
use super::types::{check_chunk_elems, index_by_name, pair, EncodeOptions, Named, Stats};
use super::zstd_frame::{compress_frame, decompress_exact};
use crate::snapshot::checksum::{adler32, adler32_combine, xxh3};
use crate::snapshot::safetensors::{Dtype, TensorMeta};
use crate::snapshot::SnapshotError;

pub const RSD_MAGIC: &[u8; 8] = b"RSDELTA1";
/// The path errors about an rsd1 image name until a caller knows the file
/// (see [`SnapshotError::in_file`]).
pub(super) const RSD_PLACEHOLDER: &str = "<rsd1 delta>";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct RsdChunk {
    /// Offset and length of the zstd frame in the payload.
    pub(super) offset: u64,
    pub(super) length: u64,
    /// Decompressed size of the frame.
    pub(super) raw: u64,
    pub(super) base_xxh3: u64,
    pub(super) new_xxh3: u64,
    pub(super) new_adler32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct RsdTensor {
    pub(super) name: String,
    pub(super) dtype: String,
    pub(super) shape: Vec<usize>,
    pub(super) chunks: Vec<RsdChunk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct RsdHeader {
    pub(super) format: String,
    pub(super) chunk_elems: usize,
    pub(super) level: i32,
    pub(super) tensors: Vec<RsdTensor>,
    #[serde(default)]
    pub(super) metadata: BTreeMap<String, String>,
}

/// Byte ranges of the chunks of a tensor of `len` bytes. Callers check
/// `chunk_elems` first; the arithmetic saturates anyway, so no input can make
/// it wrap to a zero step.
pub(super) fn chunk_ranges(len: usize, w: usize, chunk_elems: usize) -> Vec<(usize, usize)> {
    let step = chunk_elems.saturating_mul(w).max(1);
    (0..len.div_ceil(step).max(1))
        .map(|i| (i.saturating_mul(step).min(len), i.saturating_add(1).saturating_mul(step).min(len)))
        .collect()
}

/// Encode to an rsd1 image.
pub fn encode_rsd1(
    base: &[Named<'_>],
    new: &[Named<'_>],
    opts: EncodeOptions,
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Stats), SnapshotError> {
    check_chunk_elems(opts.chunk_elems).map_err(SnapshotError::Invalid)?;
    let pairs = pair(base, new)?;
    // Flatten (tensor, chunk) so every core stays busy whatever the sizes.
    let jobs: Vec<(usize, usize, usize)> = pairs
        .iter()
        .enumerate()
        .flat_map(|(t, (_, n))| {
            chunk_ranges(n.view.data.len(), n.view.dtype.size(), opts.chunk_elems)
                .into_iter()
                .map(move |(a, b)| (t, a, b))
        })
        .collect();
    let frames: Vec<(Vec<u8>, RsdChunk)> = jobs
        .par_iter()
        .map(|&(t, a, b)| {
            let (bt, nt) = pairs[t];
            let (old, new) = (&bt.view.data[a..b], &nt.view.data[a..b]);
            let body = chunk_body(old, new, nt.view.dtype.size());
            let frame = compress_frame(nt.name, &body, opts.level)?;
            let meta = RsdChunk {
                offset: 0,
                length: frame.len() as u64,
                raw: body.len() as u64,
                base_xxh3: xxh3(old),
                new_xxh3: xxh3(new),
                new_adler32: adler32(1, new),
            };
            Ok((frame, meta))
        })
        .collect::<Result<_, SnapshotError>>()?;
    let mut tensors: Vec<RsdTensor> = pairs
        .iter()
        .map(|(_, n)| RsdTensor {
            name: n.name.to_string(),
            dtype: n.view.dtype.name().to_string(),
            shape: n.view.shape.to_vec(),
            chunks: Vec::new(),
        })
        .collect();
    let mut offset = 0u64;
    let mut stats = Stats { tensors: pairs.len(), ..Default::default() };
    for (&(t, a, b), (frame, meta)) in jobs.iter().zip(&frames) {
        let mut m = meta.clone();
        m.offset = offset;
        offset += frame.len() as u64;
        stats.raw_bytes += (b - a) as u64;
        let prev = stats.adler32.get(&tensors[t].name).copied().unwrap_or(1);
        stats.adler32.insert(tensors[t].name.clone(), adler32_combine(prev, m.new_adler32, (b - a) as u64));
        tensors[t].chunks.push(m);
    }
    let header = RsdHeader {
        format: "rsd1".into(),
        chunk_elems: opts.chunk_elems,
        level: opts.level,
        tensors,
        metadata: metadata.clone(),
    };
    let text = serde_json::to_vec(&header).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    let mut out = Vec::with_capacity(16 + text.len() + offset as usize);
    out.extend_from_slice(RSD_MAGIC);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    for (frame, _) in &frames {
        out.extend_from_slice(frame);
    }
    stats.encoded_bytes = out.len() as u64;
    Ok((out, stats))
}

/// Split an rsd1 image into its validated header and payload: magic, header
/// length within the file, a known format, a chunk size the encoder could
/// have written, tensor names given once, and every chunk inside the payload.
pub(super) fn parse_rsd1(bytes: &[u8]) -> Result<(RsdHeader, &[u8]), SnapshotError> {
    let corrupt = |m: String| SnapshotError::Corrupt { path: RSD_PLACEHOLDER.into(), message: m };
    let (magic, rest) =
        bytes.split_first_chunk::<8>().ok_or_else(|| corrupt("not an rsd1 delta (too short)".into()))?;
    let (hlen, rest) = rest.split_first_chunk::<8>().ok_or_else(|| corrupt("not an rsd1 delta (too short)".into()))?;
    if magic != RSD_MAGIC {
        return Err(corrupt("not an rsd1 delta (bad magic)".into()));
    }
    let hlen = u64::from_le_bytes(*hlen);
    let hend = usize::try_from(hlen)
        .ok()
        .filter(|&h| h <= rest.len())
        .ok_or_else(|| corrupt(format!("header length {hlen} exceeds the file")))?;
    let (text, payload) = rest.split_at(hend);
    let header: RsdHeader = serde_json::from_slice(text).map_err(|e| corrupt(format!("bad header: {e}")))?;
    if header.format != "rsd1" {
        return Err(corrupt(format!("unsupported format {:?}", header.format)));
    }
    check_chunk_elems(header.chunk_elems).map_err(|m| corrupt(format!("header {m}")))?;
    let mut names = std::collections::BTreeSet::new();
    if let Some(t) = header.tensors.iter().find(|t| !names.insert(t.name.as_str())) {
        return Err(corrupt(format!("header names tensor {:?} twice", t.name)));
    }
    for t in &header.tensors {
        for (i, c) in t.chunks.iter().enumerate() {
            let end = c.offset.checked_add(c.length);
            if end.is_none_or(|e| e > payload.len() as u64) {
                return Err(SnapshotError::Checksum {
                    tensor: t.name.clone(),
                    chunk: Some(i),
                    message: "chunk lies outside the file (truncated?)".into(),
                });
            }
        }
    }
    Ok((header, payload))
}

/// Decode an rsd1 image against `base`, handing each verified chunk to
/// `sink(tensor_index, byte_offset, bytes)`. Chunks are processed a window at
/// a time, so memory stays bounded by a few chunks per core. Returns the
/// tensors' descriptions (base order is not assumed: delta order is used).
pub fn decode_rsd1<F>(base: &[Named<'_>], delta: &[u8], sink: F) -> Result<(Vec<TensorMeta>, Stats), SnapshotError>
where
    F: Fn(usize, usize, &[u8]) -> Result<(), SnapshotError> + Sync,
{
    let (header, payload) = parse_rsd1(delta)?;
    let planned = plan(&header, base)?;
    let mut jobs = Vec::new();
    for (ti, (t, (_, b))) in header.tensors.iter().zip(&planned).enumerate() {
        let ranges = chunk_ranges(b.view.data.len(), b.view.dtype.size(), header.chunk_elems);
        if ranges.len() != t.chunks.len() {
            return Err(SnapshotError::mismatch(&t.name, "chunk count does not fit the tensor size"));
        }
        for (ci, (r, c)) in ranges.into_iter().zip(&t.chunks).enumerate() {
            jobs.push((ti, ci, r, c, *b));
        }
    }
    let window = rayon::current_num_threads().max(1) * 2;
    for group in jobs.chunks(window) {
        group.par_iter().try_for_each(|&(ti, ci, (a, b), c, base_t)| {
            let name = &header.tensors[ti].name;
            let old = &base_t.view.data[a..b];
            if xxh3(old) != c.base_xxh3 {
                return Err(SnapshotError::Checksum {
                    tensor: name.clone(),
                    chunk: Some(ci),
                    message: "the base differs from the one this delta was made against".into(),
                });
            }
            let w = base_t.view.dtype.size();
            let n = (b - a) / w;
            // mode + count + gap bytes (at most one per element plus the 255 runs) + planes
            let bound = 5 + n + n / 255 + 1 + (b - a);
            if c.raw as usize > bound {
                return Err(SnapshotError::Checksum {
                    tensor: name.clone(),
                    chunk: Some(ci),
                    message: format!("declared size {} exceeds the bound {bound}", c.raw),
                });
            }
            let frame = &payload[c.offset as usize..(c.offset + c.length) as usize];
            let body = decompress_exact(name, Some(ci), frame, c.raw as usize)?;
            let mut out = vec![0u8; b - a];
            apply_chunk(old, &body, &mut out, w).map_err(|m| SnapshotError::Checksum {
                tensor: name.clone(),
                chunk: Some(ci),
                message: m,
            })?;
            if xxh3(&out) != c.new_xxh3 {
                return Err(SnapshotError::Checksum {
                    tensor: name.clone(),
                    chunk: Some(ci),
                    message: "decoded bytes do not match the recorded XXH3 (corrupted delta)".into(),
                });
            }
            sink(ti, a, &out)
        })?;
    }
    let mut stats = Stats { tensors: header.tensors.len(), encoded_bytes: delta.len() as u64, ..Default::default() };
    for (t, (_, b)) in header.tensors.iter().zip(&planned) {
        let mut a = 1u32;
        let mut total = 0u64;
        for (c, (x, y)) in t.chunks.iter().zip(chunk_ranges(b.view.data.len(), b.view.dtype.size(), header.chunk_elems))
        {
            a = adler32_combine(a, c.new_adler32, (y - x) as u64);
            total += (y - x) as u64;
        }
        stats.raw_bytes += total;
        stats.adler32.insert(t.name.clone(), a);
    }
    Ok((planned.into_iter().map(|(m, _)| m).collect(), stats))
}

/// The delta's tensors (in delta order), each checked against the base
/// tensor of the same name: the same set of names, dtypes and shapes. Only
/// after this may a header's shapes size anything.
pub(super) fn plan<'a, 'b>(
    header: &RsdHeader,
    base: &'b [Named<'a>],
) -> Result<Vec<(TensorMeta, &'b Named<'a>)>, SnapshotError> {
    let index = index_by_name(base, "base")?;
    if header.tensors.len() != base.len() {
        return Err(SnapshotError::Invalid(format!(
            "delta has {} tensors, base has {}",
            header.tensors.len(),
            base.len()
        )));
    }
    header
        .tensors
        .iter()
        .map(|t| {
            let b = *index.get(t.name.as_str()).ok_or_else(|| SnapshotError::mismatch(&t.name, "not in the base"))?;
            let dtype = Dtype::parse(&t.dtype).ok_or_else(|| SnapshotError::mismatch(&t.name, "unknown dtype"))?;
            if dtype != b.view.dtype || t.shape != b.view.shape {
                return Err(SnapshotError::mismatch(
                    &t.name,
                    format!(
                        "delta expects {} {:?}, base has {} {:?}",
                        t.dtype,
                        t.shape,
                        b.view.dtype.name(),
                        b.view.shape
                    ),
                ));
            }
            Ok((TensorMeta { name: t.name.clone(), dtype, shape: t.shape.clone() }, b))
        })
        .collect()
}
