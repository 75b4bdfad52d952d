//! Whole checkpoints on disk: written atomically with the checksums the
//! store's manifest records, and checksummed back for verification. Both run
//! on all cores: a checkpoint is many independent tensors.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use super::atomic::PendingFile;
use super::checksum::{adler32, xxh3};
use super::delta::Named;
use super::safetensors::{self, SafeTensors, TensorMeta};
use super::SnapshotError;

/// `(adler32, xxh3)` of a tensor's bytes.
pub type Sums = (u32, u64);

/// A tensor's dtype name, shape and [`Sums`], as a file holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSums {
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub adler32: u32,
    pub xxh3: u64,
}

fn sums(data: &[u8]) -> Sums {
    (adler32(1, data), xxh3(data))
}

/// Write `tensors` (in this order) to a safetensors file at `path`,
/// published atomically (nothing appears at `path` unless the whole file was
/// written and synced), and return every tensor's [`Sums`].
pub fn write_checkpoint(
    path: &Path,
    tensors: &[Named<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Sums>, SnapshotError> {
    let metas: Vec<TensorMeta> = tensors
        .iter()
        .map(|t| TensorMeta { name: t.name.to_string(), dtype: t.view.dtype, shape: t.view.shape.to_vec() })
        .collect();
    let pending = PendingFile::new(path)?;
    safetensors::write(pending.path(), &metas, metadata, |i| tensors[i].view.data)?;
    pending.publish()?;
    Ok(tensors.par_iter().map(|t| (t.name.to_string(), sums(t.view.data))).collect())
}

/// [`TensorSums`] of every tensor of the safetensors file at `path` (which
/// is fully validated first).
pub fn checkpoint_sums(path: &Path) -> Result<BTreeMap<String, TensorSums>, SnapshotError> {
    let st = SafeTensors::open(path)?;
    Ok(st
        .tensors()
        .par_iter()
        .map(|(name, v)| {
            let (adler32, xxh3) = sums(v.data);
            (name.to_string(), TensorSums { dtype: v.dtype.name(), shape: v.shape.to_vec(), adler32, xxh3 })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::safetensors::{Dtype, TensorView};

    #[test]
    fn written_sums_equal_read_sums_and_nothing_is_left_behind() {
        let dir = std::env::temp_dir().join(format!("rs-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let a: Vec<u8> = (0..24).collect();
        let b = vec![9u8; 4];
        let tensors = [
            Named { name: "a", view: TensorView { dtype: Dtype::F32, shape: &[2, 3], data: &a } },
            Named { name: "b", view: TensorView { dtype: Dtype::BF16, shape: &[2], data: &b } },
        ];
        let written = write_checkpoint(&path, &tensors, &BTreeMap::new()).unwrap();
        let read = checkpoint_sums(&path).unwrap();
        assert_eq!(written.len(), 2);
        for (name, (adler, x)) in &written {
            assert_eq!((read[name].adler32, read[name].xxh3), (*adler, *x), "{name}");
        }
        assert_eq!(read["a"].shape, vec![2, 3]);
        assert_eq!(read["b"].dtype, "BF16");
        // A tensor whose bytes do not fit its shape fails, and publishes nothing.
        let bad = [Named { name: "c", view: TensorView { dtype: Dtype::F32, shape: &[5], data: &b } }];
        let other = dir.join("other.safetensors");
        assert!(write_checkpoint(&other, &bad, &BTreeMap::new()).is_err());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("model.safetensors")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
