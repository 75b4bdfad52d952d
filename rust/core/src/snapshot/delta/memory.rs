//! Decoding either format into memory.

use std::collections::BTreeMap;

use super::arc_v2::decode_arc_v2;
use super::rsd1::{decode_rsd1, parse_rsd1, RSD_MAGIC};
use super::types::{Named, OwnedTensor, Stats};
use crate::snapshot::checksum::adler32;
use crate::snapshot::safetensors::{Dtype, SafeTensors};
use crate::snapshot::SnapshotError;

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
