//! Delta codecs between two checkpoints with the same tensors.
//!
//! **arc_v2** (Fireworks' format, decodable by `fireworks-delta-compression`):
//! per tensor, the XOR of the raw little-endian bytes of the old and new
//! tensor, compressed as one zstd frame that records its content size, stored
//! in a safetensors file as 1-D U8 tensors under the original names, with
//! `__metadata__` mapping each name to the decimal Adler-32 of the new tensor.
//!
//! **rsd1** (rollstream's format): tensors are cut into chunks of
//! `chunk_elems` elements, so all cores work and decoding holds only a few
//! chunks in memory. Per chunk, the element-wise integer difference of the
//! bit patterns (zigzagged: small weight updates become small numbers) is
//! split into byte planes, so unchanged high bytes form long zero runs; when
//! few elements changed, a bitmap of the changed ones plus their planes is
//! stored instead. One zstd frame per chunk. Every chunk records XXH3 of its
//! base and new bytes, so a wrong base or a corrupted byte is found and named
//! (tensor, chunk) before any output is published. The output is a function
//! of the inputs only (no timing-dependent choices), and there is no pickle.
//!
//! File layout: `b"RSDELTA1"`, u64 LE header length, JSON header, payload.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::checksum::{adler32, adler32_combine, xxh3};
use super::safetensors::{self, Dtype, SafeTensors, TensorMeta, TensorView};
use super::SnapshotError;

pub const RSD_MAGIC: &[u8; 8] = b"RSDELTA1";
/// Elements per rsd1 chunk by default (4 MiB of f32).
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 20;
/// A chunk with fewer changed elements than this fraction is stored sparsely.
const SPARSE_BELOW: f64 = 0.25;
/// arc_v2 tensors at least this large are compressed by zstd's own workers.
const MT_FRAME_BYTES: usize = 64 << 20;
const MODE_DENSE: u8 = 0;
const MODE_SPARSE: u8 = 1;

/// Which delta format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    ArcV2,
    Rsd1,
}

impl Format {
    pub fn parse(s: &str) -> Result<Self, SnapshotError> {
        match s {
            "arc_v2" => Ok(Format::ArcV2),
            "rsd1" => Ok(Format::Rsd1),
            other => Err(SnapshotError::Invalid(format!("unknown delta format {other:?} (use 'arc_v2' or 'rsd1')"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::ArcV2 => "arc_v2",
            Format::Rsd1 => "rsd1",
        }
    }
}

/// Encoding parameters.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub format: Format,
    pub level: i32,
    pub chunk_elems: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        // Level 1: measured faster than 3 and (on weight deltas, whose bytes
        // are mostly literals) no worse in ratio.
        EncodeOptions { format: Format::Rsd1, level: 1, chunk_elems: DEFAULT_CHUNK_ELEMS }
    }
}

/// A named tensor borrowed from somewhere (a file map or caller memory).
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    pub name: &'a str,
    pub view: TensorView<'a>,
}

/// A decoded tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// What an encode or decode did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub tensors: usize,
    pub raw_bytes: u64,
    pub encoded_bytes: u64,
    /// Adler-32 (decimal strings, as arc_v2 records them) of each new tensor.
    pub adler32: BTreeMap<String, u32>,
}

/// Pair every tensor of `new` with the same-named tensor of `base`,
/// requiring identical name sets, dtypes and shapes.
fn pair<'a, 'b>(
    base: &'b [Named<'a>],
    new: &'b [Named<'a>],
) -> Result<Vec<(&'b Named<'a>, &'b Named<'a>)>, SnapshotError> {
    let index: BTreeMap<&str, &Named<'a>> = base.iter().map(|t| (t.name, t)).collect();
    if index.len() != base.len() {
        return Err(SnapshotError::Invalid("base has duplicate tensor names".into()));
    }
    let mut out = Vec::with_capacity(new.len());
    for n in new {
        let b = index.get(n.name).ok_or_else(|| SnapshotError::mismatch(n.name, "not in the base checkpoint"))?;
        if b.view.dtype != n.view.dtype || b.view.shape != n.view.shape {
            return Err(SnapshotError::mismatch(
                n.name,
                format!(
                    "base is {} {:?}, new is {} {:?}",
                    b.view.dtype.name(),
                    b.view.shape,
                    n.view.dtype.name(),
                    n.view.shape
                ),
            ));
        }
        out.push((*b, n));
    }
    if out.len() != base.len() {
        let newnames: std::collections::BTreeSet<&str> = new.iter().map(|t| t.name).collect();
        let missing = base.iter().find(|t| !newnames.contains(t.name)).map(|t| t.name).unwrap_or("?");
        return Err(SnapshotError::mismatch(missing, "in the base checkpoint but not in the new one"));
    }
    Ok(out)
}

fn encode_err(tensor: &str, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Invalid(format!("tensor {tensor:?}: zstd compression failed: {e}"))
}

/// Decompress one frame whose content size must be exactly `expected`
/// (checked before allocating).
fn decompress_exact(
    tensor: &str,
    chunk: Option<usize>,
    frame: &[u8],
    expected: usize,
) -> Result<Vec<u8>, SnapshotError> {
    let declared = zstd::zstd_safe::get_frame_content_size(frame).map_err(|_| SnapshotError::Checksum {
        tensor: tensor.to_string(),
        chunk,
        message: "not a zstd frame".into(),
    })?;
    if declared != Some(expected as u64) {
        return Err(SnapshotError::Checksum {
            tensor: tensor.to_string(),
            chunk,
            message: format!("zstd frame declares {declared:?} bytes, expected {expected}"),
        });
    }
    let out = zstd::bulk::decompress(frame, expected).map_err(|e| SnapshotError::Checksum {
        tensor: tensor.to_string(),
        chunk,
        message: format!("zstd: {e}"),
    })?;
    if out.len() != expected {
        return Err(SnapshotError::Checksum {
            tensor: tensor.to_string(),
            chunk,
            message: format!("decompressed {} bytes, expected {expected}", out.len()),
        });
    }
    Ok(out)
}

/// A compressor for delta payloads. At level 1 (the default) the frame
/// uses a 64-entry hash table and 7-byte minimum matches: XOR deltas and
/// byte planes of Adam-like and sparse updates match runs of unchanged bytes
/// close behind, so the tiny table finds them as well as level 1's default
/// one while staying in L1, and short matches in changed mantissas are noise.
/// Measured on benches/bench_snapshots.py: 1.1-1.4x faster than plain level
/// 1 with a slightly better ratio, for both arc_v2 and rsd1.
fn delta_cctx(level: i32, workers: u32) -> Result<zstd::zstd_safe::CCtx<'static>, usize> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level))?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true))?;
    if level == 1 {
        cctx.set_parameter(CParameter::HashLog(6))?;
        cctx.set_parameter(CParameter::MinMatch(7))?;
    }
    if workers > 1 {
        cctx.set_parameter(CParameter::NbWorkers(workers))?;
    }
    Ok(cctx)
}

/// One-shot compression of `body` into a frame that records its size.
fn compress_frame(name: &str, body: &[u8], level: i32) -> Result<Vec<u8>, SnapshotError> {
    let code = |c: usize| encode_err(name, zstd::zstd_safe::get_error_name(c));
    let mut cctx = delta_cctx(level, 0).map_err(code)?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(body.len()));
    cctx.compress2(&mut out, body).map_err(code)?;
    Ok(out)
}

fn xor_into(dst: &mut [u8], a: &[u8], b: &[u8]) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = x ^ y;
    }
}

// --------------------------------------------------------------------------
// arc_v2

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
    let index: BTreeMap<&str, &Named<'_>> = base.iter().map(|t| (t.name, t)).collect();
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

// --------------------------------------------------------------------------
// rsd1

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RsdChunk {
    /// Offset and length of the zstd frame in the payload.
    offset: u64,
    length: u64,
    /// Decompressed size of the frame.
    raw: u64,
    base_xxh3: u64,
    new_xxh3: u64,
    new_adler32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RsdTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    chunks: Vec<RsdChunk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RsdHeader {
    format: String,
    chunk_elems: usize,
    level: i32,
    tensors: Vec<RsdTensor>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// Sparse chunks list the changed elements by their gaps: one byte per
/// changed element holding the number of unchanged elements before it, with
/// 255 meaning "255 more, continue". (Measured: zstd codes these gap bytes
/// within 1% of their entropy, a packed bitmap 19% above it.)
fn push_gap(out: &mut Vec<u8>, mut gap: usize) {
    while gap >= 255 {
        out.push(255);
        gap -= 255;
    }
    out.push(gap as u8);
}

macro_rules! zigzag_impl {
    ($enc:ident, $dec:ident, $u:ty, $i:ty) => {
        /// Zigzagged wrapping differences `new - old` of `$u` elements as byte
        /// planes (`planes[p * m + j]` = byte `p` of value `j`); when
        /// `sparse`, only the changed elements, preceded by their count
        /// (u32 LE) and gap bytes.
        fn $enc(old: &[u8], new: &[u8], out: &mut Vec<u8>, sparse: bool) {
            const W: usize = std::mem::size_of::<$u>();
            let n = new.len() / W;
            let mut vals: Vec<$u> = Vec::with_capacity(if sparse { n / 4 } else { n });
            let mut gaps = Vec::new();
            let mut last = 0usize;
            for j in 0..n {
                let mut a = [0u8; W];
                let mut b = [0u8; W];
                a.copy_from_slice(&old[j * W..j * W + W]);
                b.copy_from_slice(&new[j * W..j * W + W]);
                let d = <$u>::from_le_bytes(b).wrapping_sub(<$u>::from_le_bytes(a)) as $i;
                let z = ((d << 1) ^ (d >> (<$i>::BITS - 1))) as $u;
                if !sparse {
                    vals.push(z);
                } else if z != 0 {
                    push_gap(&mut gaps, j - last);
                    last = j + 1;
                    vals.push(z);
                }
            }
            let m = vals.len();
            if sparse {
                out.extend_from_slice(&(m as u32).to_le_bytes());
                out.extend_from_slice(&gaps);
            }
            let start = out.len();
            out.resize(start + m * W, 0);
            for (j, v) in vals.iter().enumerate() {
                for (p, byte) in v.to_le_bytes().iter().enumerate() {
                    out[start + p * m + j] = *byte;
                }
            }
        }

        /// Inverse of the encoder: `new = old + unzigzag(z)` into `dst`.
        fn $dec(old: &[u8], body: &[u8], dst: &mut [u8], sparse: bool) -> Result<(), String> {
            const W: usize = std::mem::size_of::<$u>();
            let n = old.len() / W;
            // Positions of the stored values (None: every element, in order).
            let mut positions: Option<Vec<usize>> = None;
            let mut planes = body;
            if sparse {
                let (count, rest) = body.split_first_chunk::<4>().ok_or("sparse chunk without its count")?;
                let m = u32::from_le_bytes(*count) as usize;
                if m > n {
                    return Err(format!("sparse chunk claims {m} changed elements of {n}"));
                }
                let mut pos = Vec::with_capacity(m);
                let mut next = 0usize;
                let mut run = 0usize;
                let mut used = 0usize;
                while pos.len() < m {
                    let &g = rest.get(used).ok_or("sparse chunk ends inside its gaps")?;
                    used += 1;
                    run += usize::from(g);
                    if g == 255 {
                        continue;
                    }
                    let at = next + run;
                    if at >= n {
                        return Err("a gap points past the chunk".into());
                    }
                    pos.push(at);
                    next = at + 1;
                    run = 0;
                }
                planes = &rest[used..];
                positions = Some(pos);
            }
            let m = positions.as_ref().map_or(n, Vec::len);
            if planes.len() != m * W {
                return Err(format!("chunk holds {} plane bytes, expected {}", planes.len(), m * W));
            }
            dst.copy_from_slice(old);
            for k in 0..m {
                let j = positions.as_ref().map_or(k, |p| p[k]);
                let mut bytes = [0u8; W];
                for (p, byte) in bytes.iter_mut().enumerate() {
                    *byte = planes[p * m + k];
                }
                let z = <$u>::from_le_bytes(bytes);
                let d = ((z >> 1) as $i) ^ -((z & 1) as $i);
                let mut a = [0u8; W];
                a.copy_from_slice(&old[j * W..j * W + W]);
                let v = <$u>::from_le_bytes(a).wrapping_add(d as $u);
                dst[j * W..j * W + W].copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }
    };
}

zigzag_impl!(enc_u8, dec_u8, u8, i8);
zigzag_impl!(enc_u16, dec_u16, u16, i16);
zigzag_impl!(enc_u32, dec_u32, u32, i32);
zigzag_impl!(enc_u64, dec_u64, u64, i64);

fn count_changed(old: &[u8], new: &[u8], w: usize) -> usize {
    old.chunks_exact(w).zip(new.chunks_exact(w)).filter(|(a, b)| a != b).count()
}

/// The raw (pre-zstd) body of one chunk: mode byte, then planes.
fn chunk_body(old: &[u8], new: &[u8], w: usize) -> Vec<u8> {
    let n = new.len() / w;
    let sparse = (count_changed(old, new, w) as f64) < SPARSE_BELOW * n as f64;
    let mut out = Vec::with_capacity(1 + new.len() + if sparse { 4 + n / 4 } else { 0 });
    out.push(if sparse { MODE_SPARSE } else { MODE_DENSE });
    match w {
        1 => enc_u8(old, new, &mut out, sparse),
        2 => enc_u16(old, new, &mut out, sparse),
        4 => enc_u32(old, new, &mut out, sparse),
        _ => enc_u64(old, new, &mut out, sparse),
    }
    out
}

fn apply_chunk(old: &[u8], body: &[u8], dst: &mut [u8], w: usize) -> Result<(), String> {
    let (&mode, rest) = body.split_first().ok_or("empty chunk")?;
    let sparse = match mode {
        MODE_DENSE => false,
        MODE_SPARSE => true,
        m => return Err(format!("unknown chunk mode {m}")),
    };
    match w {
        1 => dec_u8(old, rest, dst, sparse),
        2 => dec_u16(old, rest, dst, sparse),
        4 => dec_u32(old, rest, dst, sparse),
        _ => dec_u64(old, rest, dst, sparse),
    }
}

/// Byte ranges of the chunks of a tensor of `len` bytes.
fn chunk_ranges(len: usize, w: usize, chunk_elems: usize) -> Vec<(usize, usize)> {
    let step = chunk_elems * w;
    (0..len.div_ceil(step).max(1)).map(|i| (i * step, ((i + 1) * step).min(len))).collect()
}

/// Encode to an rsd1 image.
pub fn encode_rsd1(
    base: &[Named<'_>],
    new: &[Named<'_>],
    opts: EncodeOptions,
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Stats), SnapshotError> {
    if opts.chunk_elems == 0 {
        return Err(SnapshotError::Invalid("chunk_elems must be positive".into()));
    }
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

fn parse_rsd1(bytes: &[u8]) -> Result<(RsdHeader, &[u8]), SnapshotError> {
    let corrupt = |m: String| SnapshotError::Corrupt { path: "<rsd1 delta>".into(), message: m };
    if bytes.len() < 16 || &bytes[..8] != RSD_MAGIC {
        return Err(corrupt("not an rsd1 delta (bad magic)".into()));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[8..16]);
    let hlen = u64::from_le_bytes(n);
    if hlen > (bytes.len() - 16) as u64 {
        return Err(corrupt(format!("header length {hlen} exceeds the file")));
    }
    let hend = 16 + hlen as usize;
    let header: RsdHeader =
        serde_json::from_slice(&bytes[16..hend]).map_err(|e| corrupt(format!("bad header: {e}")))?;
    if header.format != "rsd1" || header.chunk_elems == 0 {
        return Err(corrupt(format!("unsupported format {:?}", header.format)));
    }
    let payload = &bytes[hend..];
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
    let index: BTreeMap<&str, &Named<'_>> = base.iter().map(|t| (t.name, t)).collect();
    if header.tensors.len() != base.len() {
        return Err(SnapshotError::Invalid(format!(
            "delta has {} tensors, base has {}",
            header.tensors.len(),
            base.len()
        )));
    }
    let mut metas = Vec::with_capacity(header.tensors.len());
    let mut jobs = Vec::new();
    for (ti, t) in header.tensors.iter().enumerate() {
        let b = index.get(t.name.as_str()).ok_or_else(|| SnapshotError::mismatch(&t.name, "not in the base"))?;
        let dtype = Dtype::parse(&t.dtype).ok_or_else(|| SnapshotError::mismatch(&t.name, "unknown dtype"))?;
        if dtype != b.view.dtype || t.shape != b.view.shape {
            return Err(SnapshotError::mismatch(
                &t.name,
                format!("delta expects {} {:?}, base has {} {:?}", t.dtype, t.shape, b.view.dtype.name(), b.view.shape),
            ));
        }
        let ranges = chunk_ranges(b.view.data.len(), dtype.size(), header.chunk_elems);
        if ranges.len() != t.chunks.len() {
            return Err(SnapshotError::mismatch(&t.name, "chunk count does not fit the tensor size"));
        }
        for (ci, (r, c)) in ranges.into_iter().zip(&t.chunks).enumerate() {
            jobs.push((ti, ci, r, c, *b));
        }
        metas.push(TensorMeta { name: t.name.clone(), dtype, shape: t.shape.clone() });
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
    for (t, m) in header.tensors.iter().zip(&metas) {
        let mut a = 1u32;
        let mut total = 0u64;
        for (c, (x, y)) in t.chunks.iter().zip(chunk_ranges(
            m.shape.iter().product::<usize>() * m.dtype.size(),
            m.dtype.size(),
            header.chunk_elems,
        )) {
            a = adler32_combine(a, c.new_adler32, (y - x) as u64);
            total += (y - x) as u64;
        }
        stats.raw_bytes += total;
        stats.adler32.insert(t.name.clone(), a);
    }
    Ok((metas, stats))
}

/// Decode either format into memory.
pub fn decode_to_vecs(base: &[Named<'_>], delta: &[u8]) -> Result<(Vec<OwnedTensor>, Stats), SnapshotError> {
    if delta.starts_with(RSD_MAGIC) {
        let sizes: BTreeMap<&str, (Dtype, Vec<usize>, usize)> =
            base.iter().map(|t| (t.name, (t.view.dtype, t.view.shape.to_vec(), t.view.data.len()))).collect();
        let (header, _) = parse_rsd1(delta)?;
        let buffers: Vec<std::sync::Mutex<Vec<u8>>> = header
            .tensors
            .iter()
            .map(|t| std::sync::Mutex::new(vec![0u8; sizes.get(t.name.as_str()).map_or(0, |s| s.2)]))
            .collect();
        let (metas, stats) = decode_rsd1(base, delta, |ti, off, bytes| {
            let mut buf = buffers[ti].lock().map_err(|_| SnapshotError::Invalid("poisoned lock".into()))?;
            buf[off..off + bytes.len()].copy_from_slice(bytes);
            Ok(())
        })?;
        let tensors = metas
            .into_iter()
            .zip(buffers)
            .map(|(m, b)| OwnedTensor {
                name: m.name,
                dtype: m.dtype,
                shape: m.shape,
                data: b.into_inner().unwrap_or_default(),
            })
            .collect();
        Ok((tensors, stats))
    } else {
        let st = SafeTensors::from_bytes(delta.to_vec())?;
        let tensors = decode_arc_v2(base, &st)?;
        let stats = Stats {
            tensors: tensors.len(),
            raw_bytes: tensors.iter().map(|t| t.data.len() as u64).sum(),
            encoded_bytes: delta.len() as u64,
            adler32: tensors.iter().map(|t| (t.name.clone(), adler32(1, &t.data))).collect(),
        };
        Ok((tensors, stats))
    }
}

// --------------------------------------------------------------------------
// Files, published atomically.

/// A temporary file next to `dest`, renamed onto it by `publish`; removed
/// if dropped unpublished, so a failure never leaves a partial result where
/// the result would live.
pub struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
    published: bool,
}

impl PendingFile {
    pub fn new(dest: &Path) -> Result<Self, SnapshotError> {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(SnapshotError::Invalid(format!("output directory {} does not exist", parent.display())));
        }
        let name =
            dest.file_name().ok_or_else(|| SnapshotError::Invalid(format!("bad output path {}", dest.display())))?;
        let nonce: u64 =
            xxh3(format!("{:?}{:?}", std::time::SystemTime::now(), std::thread::current().id()).as_bytes());
        let tmp = parent.join(format!(".{}.{}.{nonce:016x}.tmp", name.to_string_lossy(), std::process::id()));
        Ok(PendingFile { tmp, dest: dest.to_path_buf(), published: false })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn publish(mut self) -> Result<(), SnapshotError> {
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| SnapshotError::io(&self.dest, e))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn named(st: &SafeTensors) -> Vec<Named<'_>> {
    st.tensors().into_iter().map(|(name, view)| Named { name, view }).collect()
}

/// Write `bytes` to `dest` atomically (temporary file, fsync, rename).
pub fn publish_bytes(dest: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let pending = PendingFile::new(dest)?;
    write_all(pending.path(), bytes)?;
    pending.publish()
}

/// Encode a delta from a base file to tensors given in memory.
pub fn encode_from_file(
    base_path: &Path,
    new: &[Named<'_>],
    out_path: &Path,
    opts: EncodeOptions,
) -> Result<Stats, SnapshotError> {
    let base = SafeTensors::open(base_path)?;
    let (bytes, stats) = match opts.format {
        Format::ArcV2 => encode_arc_v2(&named(&base), new, opts.level)?,
        Format::Rsd1 => encode_rsd1(&named(&base), new, opts, &base.metadata)?,
    };
    publish_bytes(out_path, &bytes)?;
    Ok(stats)
}

fn write_all(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(|e| SnapshotError::io(path, e))?;
    f.write_all(bytes).map_err(|e| SnapshotError::io(path, e))?;
    f.sync_all().map_err(|e| SnapshotError::io(path, e))
}

/// Encode the delta from `base_path` to `new_path` (safetensors files) into
/// `out_path`, published atomically.
pub fn encode_files(
    base_path: &Path,
    new_path: &Path,
    out_path: &Path,
    opts: EncodeOptions,
) -> Result<Stats, SnapshotError> {
    let base = SafeTensors::open(base_path)?;
    let new = SafeTensors::open(new_path)?;
    let (bytes, stats) = match opts.format {
        Format::ArcV2 => encode_arc_v2(&named(&base), &named(&new), opts.level)?,
        Format::Rsd1 => encode_rsd1(&named(&base), &named(&new), opts, &new.metadata)?,
    };
    publish_bytes(out_path, &bytes)?;
    Ok(stats)
}

/// Apply the delta at `delta_path` (either format) to `base_path` and write
/// the new checkpoint to `out_path`. Everything is verified before the output
/// is published; the base is only read.
pub fn decode_files(base_path: &Path, delta_path: &Path, out_path: &Path) -> Result<Stats, SnapshotError> {
    let base = SafeTensors::open(base_path)?;
    let file = File::open(delta_path).map_err(|e| SnapshotError::io(delta_path, e))?;
    // SAFETY: read-only map of a published (never rewritten) file.
    let delta = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| SnapshotError::io(delta_path, e))?;
    let pending = PendingFile::new(out_path)?;
    let stats = if delta.starts_with(RSD_MAGIC) {
        decode_rsd1_file(&base, &delta, pending.path())?
    } else {
        let st = SafeTensors::open(delta_path)?;
        let tensors = decode_arc_v2(&named(&base), &st)?;
        let metas: Vec<TensorMeta> = tensors
            .iter()
            .map(|t| TensorMeta { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() })
            .collect();
        safetensors::write(pending.path(), &metas, &base.metadata, |i| &tensors[i].data)?;
        Stats {
            tensors: tensors.len(),
            raw_bytes: tensors.iter().map(|t| t.data.len() as u64).sum(),
            encoded_bytes: delta.len() as u64,
            adler32: tensors.iter().map(|t| (t.name.clone(), adler32(1, &t.data))).collect(),
        }
    };
    pending.publish()?;
    Ok(stats)
}

/// Decode rsd1 straight into a pre-sized output file (positioned writes):
/// memory stays bounded by the decoding window.
fn decode_rsd1_file(base: &SafeTensors, delta: &[u8], out: &Path) -> Result<Stats, SnapshotError> {
    use std::os::unix::fs::FileExt;

    let (header, _) = parse_rsd1(delta)?;
    let metas: Vec<TensorMeta> = header
        .tensors
        .iter()
        .map(|t| {
            Ok(TensorMeta {
                name: t.name.clone(),
                dtype: Dtype::parse(&t.dtype).ok_or_else(|| SnapshotError::mismatch(&t.name, "unknown dtype"))?,
                shape: t.shape.clone(),
            })
        })
        .collect::<Result<_, SnapshotError>>()?;
    let metadata = if header.metadata.is_empty() { base.metadata.clone() } else { header.metadata.clone() };
    let (head, sizes) = safetensors::header_bytes(&metas, &metadata)?;
    let mut starts = Vec::with_capacity(sizes.len());
    let mut pos = 8 + head.len() as u64;
    for s in &sizes {
        starts.push(pos);
        pos += *s as u64;
    }
    let file = File::create(out).map_err(|e| SnapshotError::io(out, e))?;
    file.set_len(pos).map_err(|e| SnapshotError::io(out, e))?;
    let mut prefix = (head.len() as u64).to_le_bytes().to_vec();
    prefix.extend_from_slice(&head);
    file.write_all_at(&prefix, 0).map_err(|e| SnapshotError::io(out, e))?;
    let (_, stats) = decode_rsd1(&named(base), delta, |ti, off, bytes| {
        file.write_all_at(bytes, starts[ti] + off as u64).map_err(|e| SnapshotError::io(out, e))
    })?;
    file.sync_all().map_err(|e| SnapshotError::io(out, e))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (bytes, stats) =
            encode_rsd1(&views(&old), &views(&new), EncodeOptions::default(), &BTreeMap::new()).unwrap();
        let ratio = stats.raw_bytes as f64 / bytes.len() as f64;
        assert!(ratio > 8.0, "sparse ratio {ratio}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_chunk_bodies_never_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            w in proptest::sample::select(vec![1usize, 2, 4, 8]),
            n in 0usize..64,
        ) {
            let old = vec![7u8; n * w];
            let mut dst = vec![0u8; n * w];
            let _ = apply_chunk(&old, &body, &mut dst, w);
        }

        #[test]
        fn chunk_transform_round_trips(
            old in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flips in proptest::collection::vec((0usize..512, proptest::prelude::any::<u8>()), 0..40),
            w in proptest::sample::select(vec![1usize, 2, 4, 8]),
        ) {
            let len = old.len() / w * w;
            let old = &old[..len];
            let mut new = old.to_vec();
            for (i, b) in flips {
                if len > 0 {
                    new[i % len] = b;
                }
            }
            let body = chunk_body(old, &new, w);
            let mut dst = vec![0u8; len];
            apply_chunk(old, &body, &mut dst, w).unwrap();
            proptest::prop_assert_eq!(dst, new);
        }
    }
}
