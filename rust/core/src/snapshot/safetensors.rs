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

    /// Bytes of a tensor of this dtype and `shape`, or None when that
    /// overflows `usize` (a shape no buffer can hold).
    pub fn nbytes(self, shape: &[usize]) -> Option<usize> {
        shape.iter().try_fold(self.size(), |acc, &d| acc.checked_mul(d))
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

/// One tensor as a header describes it, validated against the file: its
/// byte range lies inside the data section, does not overlap another's, and
/// (for the dtypes rollstream knows) holds exactly `shape` elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEntry {
    pub name: String,
    /// The dtype as written (newer safetensors dtypes such as `F8_E8M0` or
    /// `F4` are kept by name, not refused: header checks compare names).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range in the data section (after the header).
    pub start: usize,
    pub end: usize,
}

/// A parsed safetensors header: tensors in file order (by offset) and the
/// `__metadata__` strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub tensors: Vec<HeaderEntry>,
    pub metadata: BTreeMap<String, String>,
}

/// The members of a JSON object in document order, duplicates kept, so a
/// header naming a tensor twice is refused instead of silently losing one
/// (`serde_json::Map` keeps only the last).
struct Members(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = map.next_entry::<String, Value>()? {
                    out.push(kv);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A list of non-negative integers that fit `usize`, or None.
fn usizes(v: Option<&Value>) -> Option<Vec<usize>> {
    v?.as_array()?.iter().map(|d| d.as_u64().and_then(|x| usize::try_from(x).ok())).collect()
}

/// Validate the length prefix of a safetensors file of `file_len` bytes:
/// the header it announces must fit the file and [`MAX_HEADER`].
fn header_len(prefix: [u8; 8], file_len: u64, path: &Path) -> Result<usize, SnapshotError> {
    let n = u64::from_le_bytes(prefix);
    let fits = n <= MAX_HEADER && n <= file_len.saturating_sub(8);
    match usize::try_from(n) {
        Ok(len) if fits => Ok(len),
        _ => Err(bad(path, format!("header length {n} does not fit the {file_len}-byte file"))),
    }
}

/// Parse and validate a header (the JSON text) against a data section of
/// `data_len` bytes. Everything a file can claim is checked here, once, for
/// every reader (codecs, checksums, `rollstream._core.safetensors_header`).
pub fn parse_header(json: &[u8], data_len: usize, path: &Path) -> Result<Header, SnapshotError> {
    let Members(members) =
        serde_json::from_slice(json).map_err(|e| bad(path, format!("header is not a JSON object: {e}")))?;
    let mut header = Header::default();
    let mut seen = std::collections::BTreeSet::new();
    for (name, v) in members {
        if !seen.insert(name.clone()) {
            return Err(bad(path, format!("header names {name:?} twice")));
        }
        if name == "__metadata__" {
            let obj = v.as_object().ok_or_else(|| bad(path, "__metadata__ is not an object"))?;
            for (k, val) in obj {
                let s = val.as_str().ok_or_else(|| bad(path, format!("__metadata__[{k:?}] is not a string")))?;
                header.metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        header.tensors.push(parse_entry(name, &v, data_len, path)?);
    }
    header.tensors.sort_by_key(|e| (e.start, e.end));
    for w in header.tensors.windows(2) {
        if w[1].start < w[0].end {
            return Err(bad(path, format!("tensors {:?} and {:?} overlap", w[0].name, w[1].name)));
        }
    }
    Ok(header)
}

/// One tensor's header entry, checked against the data section.
fn parse_entry(name: String, v: &Value, data_len: usize, path: &Path) -> Result<HeaderEntry, SnapshotError> {
    let dtype = v
        .get("dtype")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| bad(path, format!("tensor {name:?} has no valid dtype")))?
        .to_string();
    let shape = usizes(v.get("shape")).ok_or_else(|| bad(path, format!("tensor {name:?} has no valid shape")))?;
    let offsets =
        usizes(v.get("data_offsets")).ok_or_else(|| bad(path, format!("tensor {name:?} has no valid data_offsets")))?;
    let [start, end] = offsets[..] else {
        return Err(bad(path, format!("tensor {name:?}: data_offsets must be [start, end]")));
    };
    let elems = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(path, format!("tensor {name:?}: shape {shape:?} overflows")))?;
    // Only known dtypes have a byte size to check; unknown ones keep their range.
    let want = match Dtype::parse(&dtype) {
        Some(d) => Some(
            elems
                .checked_mul(d.size())
                .ok_or_else(|| bad(path, format!("tensor {name:?}: shape {shape:?} overflows")))?,
        ),
        None => None,
    };
    if start > end || end > data_len || want.is_some_and(|w| end - start != w) {
        return Err(bad(
            path,
            format!(
                "tensor {name:?}: offsets [{start}, {end}] do not hold {} of {dtype} {shape:?} \
                 within {data_len} data bytes",
                want.map_or_else(|| "the bytes".to_string(), |w| format!("{w} bytes"))
            ),
        ));
    }
    Ok(HeaderEntry { name, dtype, shape, start, end })
}

/// Read and validate only the header of the safetensors file at `path` (the
/// tensor data is never read).
pub fn read_header(path: &Path) -> Result<Header, SnapshotError> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| SnapshotError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| SnapshotError::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|_| bad(path, format!("file is {file_len} bytes, too short for a safetensors header")))?;
    let n = header_len(prefix, file_len, path)?;
    let mut json = vec![0u8; n];
    file.read_exact(&mut json).map_err(|e| SnapshotError::io(path, e))?;
    // `header_len` bounded `n` by the file, so this cannot underflow.
    let data_len = usize::try_from(file_len - 8 - n as u64).map_err(|_| bad(path, "file too large"))?;
    parse_header(&json, data_len, path)
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

    /// Validate the whole image with [`parse_header`]; the codecs need a
    /// byte size per element, so every dtype must be one rollstream knows.
    fn parse(mmap: Storage, path: &Path) -> Result<Self, SnapshotError> {
        let len = mmap.len() as u64;
        let prefix: [u8; 8] = mmap
            .get(..8)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| bad(path, format!("file is {len} bytes, too short for a safetensors header")))?;
        let data_start = 8 + header_len(prefix, len, path)?;
        let header = parse_header(&mmap[8..data_start], mmap.len() - data_start, path)?;
        let entries = header
            .tensors
            .into_iter()
            .map(|e| {
                let dtype = Dtype::parse(&e.dtype)
                    .ok_or_else(|| bad(path, format!("tensor {:?} has unsupported dtype {:?}", e.name, e.dtype)))?;
                Ok((e.name, Entry { dtype, shape: e.shape, start: e.start, end: e.end }))
            })
            .collect::<Result<_, SnapshotError>>()?;
        Ok(SafeTensors { mmap, data_start, entries, metadata: header.metadata })
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
            .dtype
            .nbytes(&t.shape)
            .ok_or_else(|| SnapshotError::Invalid(format!("tensor {:?}: shape {:?} overflows", t.name, t.shape)))?;
        let end = offset
            .checked_add(size)
            .ok_or_else(|| SnapshotError::Invalid(format!("tensor {:?}: the checkpoint's size overflows", t.name)))?;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
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

    fn image(header: &str, data: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    #[test]
    fn header_claims_are_checked_once_for_every_reader() {
        let p = Path::new("<t>");
        let one = |h: &str, data: usize| parse_header(h.as_bytes(), data, p);
        let ok = one(r#"{"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, 6)
            .unwrap();
        assert_eq!(ok.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"], "file order");
        let bad = [
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
                "twice",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                "overlap",
            ),
            (r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, "within 3 data bytes"),
            (r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[3,1]}}"#, "offsets"),
            (r#"{"a":{"dtype":"F64","shape":[4611686018427387904, 4],"data_offsets":[0,0]}}"#, "overflows"),
            (r#"{"a":{"dtype":"","shape":[1],"data_offsets":[0,1]}}"#, "dtype"),
            (r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#, "shape"),
            (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#, "[start, end]"),
            (r#"{"__metadata__":{"k":1}}"#, "not a string"),
            (r#"[1]"#, "JSON object"),
        ];
        for (h, want) in bad {
            let e = one(h, 3).unwrap_err().to_string();
            assert!(e.contains(want), "{h}: {e}");
        }
        // A dtype rollstream cannot decode is kept by name by the header
        // reader, and refused (not misread) by the codecs' reader.
        let exotic = r#"{"s":{"dtype":"F8_E8M0","shape":[4],"data_offsets":[0,4]}}"#;
        assert_eq!(one(exotic, 4).unwrap().tensors[0].dtype, "F8_E8M0");
        let e = SafeTensors::from_bytes(image(exotic, 4)).unwrap_err().to_string();
        assert!(e.contains("unsupported dtype"), "{e}");
        // Length prefixes past the file, or past any sane header, are refused.
        for prefix in [u64::MAX, MAX_HEADER + 1, 40] {
            let mut img = image("{}", 8);
            img[..8].copy_from_slice(&prefix.to_le_bytes());
            assert!(SafeTensors::from_bytes(img).is_err(), "{prefix}");
        }
        assert!(SafeTensors::from_bytes(vec![1, 2, 3]).is_err());
    }

    #[test]
    fn read_header_reads_only_the_header_and_agrees_with_open() {
        let dir = std::env::temp_dir().join(format!("rs-st-h-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.safetensors");
        std::fs::write(&path, image(r#"{"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}}"#, 6)).unwrap();
        let h = read_header(&path).unwrap();
        assert_eq!((h.tensors[0].dtype.as_str(), h.tensors[0].shape.as_slice()), ("BF16", &[3][..]));
        assert_eq!(SafeTensors::open(&path).unwrap().get("w").unwrap().shape, &[3]);
        std::fs::write(&path, &image(r#"{"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}}"#, 6)[..20]).unwrap();
        assert!(matches!(read_header(&path), Err(SnapshotError::Corrupt { .. })));
        std::fs::write(&path, b"abc").unwrap();
        assert!(matches!(read_header(&path), Err(SnapshotError::Corrupt { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
