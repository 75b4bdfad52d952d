//! The codecs on files: inputs memory-mapped, outputs published atomically.

use std::fs::File;
use std::path::Path;

use super::arc_v2::{decode_arc_v2, encode_arc_v2};
use super::rsd1::{decode_rsd1, encode_rsd1, parse_rsd1, plan, RSD_MAGIC};
use super::types::{EncodeOptions, Format, Named, Stats};
use crate::snapshot::atomic::{publish_bytes, PendingFile};
use crate::snapshot::checksum::adler32;
use crate::snapshot::safetensors::{self, SafeTensors, TensorMeta};
use crate::snapshot::SnapshotError;

fn named(st: &SafeTensors) -> Vec<Named<'_>> {
    st.tensors().into_iter().map(|(name, view)| Named { name, view }).collect()
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
        decode_rsd1_file(&base, &delta, pending.path()).map_err(|e| e.in_file(delta_path))?
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
    let base_tensors = named(base);
    // Sized from the base's tensors, never from the delta's claims.
    let metas: Vec<TensorMeta> = plan(&header, &base_tensors)?.into_iter().map(|(m, _)| m).collect();
    let metadata = if header.metadata.is_empty() { base.metadata.clone() } else { header.metadata.clone() };
    let (head, sizes) = safetensors::header_bytes(&metas, &metadata)?;
    let mut starts = Vec::with_capacity(sizes.len());
    let mut pos = 8 + head.len() as u64;
    for s in &sizes {
        starts.push(pos);
        pos = pos.checked_add(*s as u64).ok_or_else(|| SnapshotError::Invalid("output size overflows".into()))?;
    }
    let file = File::create(out).map_err(|e| SnapshotError::io(out, e))?;
    file.set_len(pos).map_err(|e| SnapshotError::io(out, e))?;
    let mut prefix = (head.len() as u64).to_le_bytes().to_vec();
    prefix.extend_from_slice(&head);
    file.write_all_at(&prefix, 0).map_err(|e| SnapshotError::io(out, e))?;
    let (_, stats) = decode_rsd1(&base_tensors, delta, |ti, off, bytes| {
        file.write_all_at(bytes, starts[ti] + off as u64).map_err(|e| SnapshotError::io(out, e))
    })?;
    file.sync_all().map_err(|e| SnapshotError::io(out, e))?;
    Ok(stats)
}
