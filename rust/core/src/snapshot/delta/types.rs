//! The codecs' vocabulary: formats, options, borrowed and decoded tensors,
//! statistics, and the pairing of base and new tensors by name.

use std::collections::BTreeMap;

use crate::snapshot::safetensors::{Dtype, TensorView};
use crate::snapshot::SnapshotError;

/// Elements per rsd1 chunk by default (4 MiB of f32).
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 20;
/// Largest rsd1 chunk: sparse chunks record their changed-element count in
/// 32 bits, so a chunk may not hold more elements than that can count.
pub const MAX_CHUNK_ELEMS: usize = u32::MAX as usize;

/// `Err` naming the value unless `chunk_elems` is in `1..=MAX_CHUNK_ELEMS`.
pub(crate) fn check_chunk_elems(chunk_elems: usize) -> Result<(), String> {
    if (1..=MAX_CHUNK_ELEMS).contains(&chunk_elems) {
        Ok(())
    } else {
        Err(format!(
            "chunk_elems={chunk_elems} must be in [1, {MAX_CHUNK_ELEMS}] (sparse chunks count elements in 32 bits)"
        ))
    }
}

/// Lowest and highest zstd levels.
pub const LEVELS: std::ops::RangeInclusive<i32> = -7..=22;

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

impl EncodeOptions {
    /// Options from a caller's values, each checked, with errors naming it.
    pub fn new(format: &str, level: i32, chunk_elems: usize) -> Result<Self, SnapshotError> {
        if !LEVELS.contains(&level) {
            return Err(SnapshotError::Invalid(format!(
                "level={level} must be a zstd level in [{}, {}]",
                LEVELS.start(),
                LEVELS.end()
            )));
        }
        check_chunk_elems(chunk_elems).map_err(SnapshotError::Invalid)?;
        Ok(EncodeOptions { format: Format::parse(format)?, level, chunk_elems })
    }
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

/// `tensors` by name, refusing a name given twice (`what` names the list).
pub(super) fn index_by_name<'a, 'b>(
    tensors: &'b [Named<'a>],
    what: &str,
) -> Result<BTreeMap<&'a str, &'b Named<'a>>, SnapshotError> {
    let mut index = BTreeMap::new();
    for t in tensors {
        if index.insert(t.name, t).is_some() {
            return Err(SnapshotError::mismatch(t.name, format!("appears twice in the {what} tensors")));
        }
    }
    Ok(index)
}

/// Pair every tensor of `new` with the same-named tensor of `base`,
/// requiring identical name sets (each name once), dtypes and shapes.
pub(super) fn pair<'a, 'b>(
    base: &'b [Named<'a>],
    new: &'b [Named<'a>],
) -> Result<Vec<(&'b Named<'a>, &'b Named<'a>)>, SnapshotError> {
    let index = index_by_name(base, "base")?;
    index_by_name(new, "new")?;
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
