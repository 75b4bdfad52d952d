//! Reading and writing safetensors files (8-byte little-endian header length,
//! JSON header, tensor data), validated so that no offset, shape or dtype
//! from an untrusted file can point outside it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use memmap2::Mmap;
use serde_json::{Map, Value};

use super::SnapshotError;

/// Largest header accepted (the format's own reference limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Element type of a tensor, by safetensors name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    U16,
    I16,
    F16,
    BF16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
    F8E4M3,
    F8E5M2,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "U16" => Dtype::U16,
            "I16" => Dtype::I16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "U32" => Dtype::U32,
            "I32" => Dtype::I32,
            "F32" => Dtype::F32,
            "U64" => Dtype::U64,
            "I64" => Dtype::I64,
            "F64" => Dtype::F64,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::F32 => "F32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
        }
    }
}

/// A tensor's description and its bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorView<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// An owned tensor description (for writing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

#[derive(Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

#[derive(Debug)]
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A safetensors file, memory-mapped (or an image in memory).
#[derive(Debug)]
pub struct SafeTensors {
    mmap: Storage,
    data_start: usize,
    /// Tensors in file order (by offset).
    entries: Vec<(String, Entry)>,
    pub metadata: BTreeMap<String, String>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Corrupt { path: path.display().to_string(), message: msg.to_string() }
}

impl SafeTensors {
    /// Parse a safetensors image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SnapshotError> {
        Self::parse(Storage::Owned(bytes), Path::new("<memory>"))
    }

    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let file = File::open(path).map_err(|e| SnapshotError::io(path, e))?;
        // SAFETY: the map is read-only. A concurrent writer truncating the
        // file could fault reads; snapshot files are written once, then
        // published by rename, and never modified in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| SnapshotError::io(path, e))?;
        Self::parse(Storage::Mapped(mmap), path)
    }

    fn parse(mmap: Storage, path: &Path) -> Result<Self, SnapshotError> {
        let len = mmap.len() as u64;
        if len < 8 {
            return Err(bad(path, format!("file is {len} bytes, too short for a safetensors header")));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&mmap[..8]);
        let header_len = u64::from_le_bytes(n);
        if header_len > MAX_HEADER || 8 + header_len > len {
            return Err(bad(path, format!("header length {header_len} does not fit the {len}-byte file")));
        }
        let data_start = 8 + header_len as usize;
        let header: Map<String, Value> = serde_json::from_slice(&mmap[8..data_start])
            .map_err(|e| bad(path, format!("header is not a JSON object: {e}")))?;
        let data_len = mmap.len() - data_start;
        let mut entries = Vec::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                let obj = v.as_object().ok_or_else(|| bad(path, "__metadata__ is not an object"))?;
                for (k, val) in obj {
                    let s = val.as_str().ok_or_else(|| bad(path, format!("__metadata__[{k:?}] is not a string")))?;
                    metadata.insert(k.clone(), s.to_string());
                }
                continue;
            }
            let dtype = v
                .get("dtype")
                .and_then(Value::as_str)
                .and_then(Dtype::parse)
                .ok_or_else(|| bad(path, format!("tensor {name:?} has no valid dtype")))?;
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|x| usize::try_from(x).ok())).collect())
                .ok_or_else(|| bad(path, format!("tensor {name:?} has no valid shape")))?;
            let offsets: Vec<usize> = v
                .get("data_offsets")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|x| usize::try_from(x).ok())).collect())
                .ok_or_else(|| bad(path, format!("tensor {name:?} has no valid data_offsets")))?;
            let [start, end] = offsets[..] else {
                return Err(bad(path, format!("tensor {name:?}: data_offsets must be [start, end]")));
            };
            let want = shape
                .iter()
                .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(path, format!("tensor {name:?}: shape {shape:?} overflows")))?;
            if start > end || end > data_len || end - start != want {
                return Err(bad(
                    path,
                    format!(
                        "tensor {name:?}: offsets [{start}, {end}] do not hold {want} bytes of {} {:?} \
                         within {data_len} data bytes",
                        dtype.name(),
                        shape
                    ),
                ));
            }
            entries.push((name, Entry { dtype, shape, start, end }));
        }
        entries.sort_by_key(|(_, e)| (e.start, e.end));
        for w in entries.windows(2) {
            if w[1].1.start < w[0].1.end {
                return Err(bad(path, format!("tensors {:?} and {:?} overlap", w[0].0, w[1].0)));
            }
        }
        Ok(SafeTensors { mmap, data_start, entries, metadata })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The whole file image.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tensor names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, e)| self.view(e))
    }

    fn view<'s>(&'s self, e: &'s Entry) -> TensorView<'s> {
        TensorView {
            dtype: e.dtype,
            shape: &e.shape,
            data: &self.mmap[self.data_start + e.start..self.data_start + e.end],
        }
    }

    /// All tensors in file order.
    pub fn tensors(&self) -> Vec<(&str, TensorView<'_>)> {
        self.entries.iter().map(|(n, e)| (n.as_str(), self.view(e))).collect()
    }
}

/// Write a safetensors image to `w`. Tensors are laid out in the given
/// order; `data(i)` yields tensor `i`'s bytes, which must match its dtype
/// and shape.
pub fn write_to<'a, W: Write>(
    w: &mut W,
    tensors: &[TensorMeta],
    metadata: &BTreeMap<String, String>,
    mut data: impl FnMut(usize) -> &'a [u8],
) -> Result<(), SnapshotError> {
    let (header, sizes) = header_bytes(tensors, metadata)?;
    let io = |e: std::io::Error| SnapshotError::Io { path: "<output>".into(), message: e.to_string() };
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i);
        if bytes.len() != sizes[i] {
            return Err(SnapshotError::Invalid(format!(
                "tensor {:?}: {} bytes given for {} {:?} ({} bytes)",
                t.name,
                bytes.len(),
                t.dtype.name(),
                t.shape,
                sizes[i]
            )));
        }
        w.write_all(bytes).map_err(io)?;
    }
    Ok(())
}

/// The JSON header (padded to 8 bytes) and each tensor's byte size.
pub fn header_bytes(
    tensors: &[TensorMeta],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>), SnapshotError> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            Value::Object(metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()),
        );
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        if header.contains_key(&t.name) {
            return Err(SnapshotError::Invalid(format!("tensor name {:?} appears twice", t.name)));
        }
        let size = t
            .shape
            .iter()
            .try_fold(t.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| SnapshotError::Invalid(format!("tensor {:?}: shape {:?} overflows", t.name, t.shape)))?;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + size]}),
        );
        offset += size;
        sizes.push(size);
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    while (8 + text.len()) % 8 != 0 {
        text.push(b' ');
    }
    Ok((text, sizes))
}

/// Write a safetensors file at `path` (fsynced). See [`write_to`].
pub fn write<'a>(
    path: &Path,
    tensors: &[TensorMeta],
    metadata: &BTreeMap<String, String>,
    data: impl FnMut(usize) -> &'a [u8],
) -> Result<(), SnapshotError> {
    let file = File::create(path).map_err(|e| SnapshotError::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write_to(&mut w, tensors, metadata, data).map_err(|e| match e {
        SnapshotError::Io { message, .. } => SnapshotError::Io { path: path.display().to_string(), message },
        other => other,
    })?;
    let file = w.into_inner().map_err(|e| SnapshotError::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| SnapshotError::io(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let dir = std::env::temp_dir().join(format!("rs-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        let a: Vec<u8> = (0..24).collect();
        let b: Vec<u8> = vec![7; 2];
        let metas = vec![
            TensorMeta { name: "w".into(), dtype: Dtype::F32, shape: vec![2, 3] },
            TensorMeta { name: "b".into(), dtype: Dtype::BF16, shape: vec![1] },
        ];
        let md: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        write(&path, &metas, &md, |i| if i == 0 { &a } else { &b }).unwrap();
        let st = SafeTensors::open(&path).unwrap();
        assert_eq!(st.get("w").unwrap().data, &a[..]);
        assert_eq!(st.get("b").unwrap().shape, &[1]);
        assert_eq!(st.metadata["format"], "pt");
        // Truncated: offsets point past the end.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(SafeTensors::open(&path), Err(SnapshotError::Corrupt { .. })));
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}").unwrap();
        assert!(SafeTensors::open(&path).is_err());
        assert!(write(&path, &metas, &md, |_| &b).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
