//! Bindings of checksums and delta codecs. Buffers are read in place (any
//! C-contiguous buffer-protocol object) with the GIL released.

use std::collections::BTreeMap;
use std::path::PathBuf;

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use rollstream_core::snapshot::delta::{self, EncodeOptions, Format, Named, Stats};
use rollstream_core::snapshot::safetensors::{Dtype, TensorView};
use rollstream_core::snapshot::SnapshotError;
use rollstream_core::snapshot::{checkpoint, checksum, safetensors};

use crate::errors;

/// A held numpy array and its bytes. Invariant: the slice is only used
/// while `_array` (which keeps the array's memory alive) is held by the same
/// struct. (The buffer protocol is not in Python 3.10's limited API, so
/// `rollstream.snapshots` hands every buffer over as a numpy array.)
struct Bytes {
    _array: Py<PyUntypedArray>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the memory is owned by a numpy array kept alive by `_array`; it is
// only read. Mutation from another thread during the call would be a caller
// bug (the same contract as `zlib.adler32` releasing the GIL).
unsafe impl Send for Bytes {}
unsafe impl Sync for Bytes {}

impl Bytes {
    fn get(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "{what} must be a numpy array, got {}",
                obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        if !arr.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("{what} must be C-contiguous")));
        }
        // numpy guarantees an array's byte size fits isize; checked anyway.
        let len = arr
            .shape()
            .iter()
            .try_fold(arr.dtype().itemsize(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| PyValueError::new_err(format!("{what} is larger than memory")))?;
        // SAFETY: a valid PyArrayObject; `data` points at `len` bytes of a
        // C-contiguous array.
        let ptr = unsafe { (*numpy::npyffi::_PyArray_GET_ITEM_DATA(arr.as_array_ptr())).data as *const u8 };
        Ok(Bytes { _array: arr.clone().unbind(), ptr, len })
    }

    fn slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: see the type's invariant.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

pub fn snapshot_error(py: Python<'_>, e: SnapshotError) -> PyErr {
    let msg = e.to_string();
    match e {
        SnapshotError::Io { path, .. } => {
            errors::raise(py, errors::snapshot_io_error, (msg, Some(path), None::<String>))
        }
        SnapshotError::Corrupt { path, .. } => {
            errors::raise(py, errors::snapshot_corrupt_error, (msg, Some(path), None::<String>))
        }
        SnapshotError::Mismatch { tensor, .. } => {
            errors::raise(py, errors::tensor_mismatch_error, (msg, None::<String>, Some(tensor)))
        }
        SnapshotError::Checksum { tensor, .. } => {
            errors::raise(py, errors::checksum_mismatch_error, (msg, None::<String>, Some(tensor)))
        }
        SnapshotError::Invalid(m) => PyValueError::new_err(m),
    }
}

/// `zlib.adler32(data, value)`, SIMD and on all cores for large buffers.
#[pyfunction]
#[pyo3(signature = (data, value=1))]
pub fn adler32(py: Python<'_>, data: &Bound<'_, PyAny>, value: u32) -> PyResult<u32> {
    let b = Bytes::get(data, "data")?;
    Ok(py.detach(|| checksum::adler32(value, b.slice())))
}

/// XXH3-64 of a buffer.
#[pyfunction]
pub fn xxh3_64(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<u64> {
    let b = Bytes::get(data, "data")?;
    Ok(py.detach(|| checksum::xxh3(b.slice())))
}

fn stats_dict<'py>(py: Python<'py>, s: Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("tensors", s.tensors)?;
    d.set_item("raw_bytes", s.raw_bytes)?;
    d.set_item("encoded_bytes", s.encoded_bytes)?;
    d.set_item("adler32", s.adler32.into_iter().collect::<BTreeMap<_, _>>())?;
    Ok(d)
}

fn options(py: Python<'_>, format: &str, level: i32, chunk_elems: usize) -> PyResult<EncodeOptions> {
    EncodeOptions::new(format, level, chunk_elems).map_err(|e| snapshot_error(py, e))
}

#[pyfunction]
#[pyo3(signature = (base, new, out, format="rsd1", level=1, chunk_elems=delta::DEFAULT_CHUNK_ELEMS))]
pub fn encode_delta_files<'py>(
    py: Python<'py>,
    base: PathBuf,
    new: PathBuf,
    out: PathBuf,
    format: &str,
    level: i32,
    chunk_elems: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(py, format, level, chunk_elems)?;
    let stats = py.detach(|| delta::encode_files(&base, &new, &out, opts)).map_err(|e| snapshot_error(py, e))?;
    stats_dict(py, stats)
}

#[pyfunction]
pub fn decode_delta_files<'py>(
    py: Python<'py>,
    base: PathBuf,
    delta_path: PathBuf,
    out: PathBuf,
) -> PyResult<Bound<'py, PyDict>> {
    let stats = py.detach(|| delta::decode_files(&base, &delta_path, &out)).map_err(|e| snapshot_error(py, e))?;
    stats_dict(py, stats)
}

/// (name, safetensors dtype, shape, bytes) held in place.
struct HeldTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Bytes,
}

fn hold(list: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<HeldTensor>> {
    let mut out = Vec::new();
    for item in list.try_iter()? {
        let (name, dtype, shape, data): (String, String, Vec<usize>, Bound<'_, PyAny>) = item?.extract()?;
        let dt = Dtype::parse(&dtype)
            .ok_or_else(|| PyValueError::new_err(format!("{what} tensor {name:?}: unknown dtype {dtype:?}")))?;
        let bytes = Bytes::get(&data, &format!("{what} tensor {name:?}"))?;
        let want = dt.nbytes(&shape);
        if want != Some(bytes.len) {
            let want = want.map_or_else(|| "more than memory".to_string(), |w| w.to_string());
            return Err(PyValueError::new_err(format!(
                "{what} tensor {name:?}: {} bytes for {dtype} {shape:?} ({want} expected)",
                bytes.len
            )));
        }
        out.push(HeldTensor { name, dtype: dt, shape, bytes });
    }
    Ok(out)
}

fn views(held: &[HeldTensor]) -> Vec<Named<'_>> {
    held.iter()
        .map(|t| Named { name: &t.name, view: TensorView { dtype: t.dtype, shape: &t.shape, data: t.bytes.slice() } })
        .collect()
}

#[pyfunction]
#[pyo3(signature = (base, new, format="rsd1", level=1, chunk_elems=delta::DEFAULT_CHUNK_ELEMS))]
pub fn encode_delta_buffers<'py>(
    py: Python<'py>,
    base: &Bound<'py, PyAny>,
    new: &Bound<'py, PyAny>,
    format: &str,
    level: i32,
    chunk_elems: usize,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyDict>)> {
    let opts = options(py, format, level, chunk_elems)?;
    let (b, n) = (hold(base, "base")?, hold(new, "new")?);
    let result = py.detach(|| match opts.format {
        Format::ArcV2 => delta::encode_arc_v2(&views(&b), &views(&n), opts.level),
        Format::Rsd1 => delta::encode_rsd1(&views(&b), &views(&n), opts, &BTreeMap::new()),
    });
    let (bytes, stats) = result.map_err(|e| snapshot_error(py, e))?;
    Ok((PyBytes::new(py, &bytes), stats_dict(py, stats)?))
}

type Decoded<'py> = (Vec<(String, String, Vec<usize>, Bound<'py, PyBytes>)>, Bound<'py, PyDict>);

#[pyfunction]
pub fn decode_delta_buffers<'py>(
    py: Python<'py>,
    base: &Bound<'py, PyAny>,
    delta_bytes: &Bound<'py, PyAny>,
) -> PyResult<Decoded<'py>> {
    let b = hold(base, "base")?;
    let d = Bytes::get(delta_bytes, "delta")?;
    let (tensors, stats) =
        py.detach(|| delta::decode_to_vecs(&views(&b), d.slice())).map_err(|e| snapshot_error(py, e))?;
    let out =
        tensors.into_iter().map(|t| (t.name, t.dtype.name().to_string(), t.shape, PyBytes::new(py, &t.data))).collect();
    Ok((out, stats_dict(py, stats)?))
}

/// Write tensors to a safetensors file (published atomically); returns
/// `{name: (adler32, xxh3)}` of each tensor's bytes.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
pub fn write_safetensors(
    py: Python<'_>,
    path: PathBuf,
    tensors: &Bound<'_, PyAny>,
    metadata: Option<BTreeMap<String, String>>,
) -> PyResult<BTreeMap<String, checkpoint::Sums>> {
    let held = hold(tensors, "tensor")?;
    let metadata = metadata.unwrap_or_default();
    py.detach(|| checkpoint::write_checkpoint(&path, &views(&held), &metadata)).map_err(|e| snapshot_error(py, e))
}

/// (dtype, shape, adler32, xxh3) of a tensor.
type TensorSums = (&'static str, Vec<usize>, u32, u64);

/// `{name: (dtype, shape, adler32, xxh3)}` of every tensor in a safetensors file.
#[pyfunction]
pub fn safetensors_checksums(py: Python<'_>, path: PathBuf) -> PyResult<BTreeMap<String, TensorSums>> {
    let sums = py.detach(|| checkpoint::checkpoint_sums(&path)).map_err(|e| snapshot_error(py, e))?;
    Ok(sums.into_iter().map(|(n, s)| (n, (s.dtype, s.shape, s.adler32, s.xxh3))).collect())
}

/// `{name: (dtype, shape)}` from the header of a safetensors file (the data
/// is not read; the header is fully validated against the file's size).
#[pyfunction]
pub fn safetensors_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let header = py.detach(|| safetensors::read_header(&path)).map_err(|e| snapshot_error(py, e))?;
    let out = PyDict::new(py);
    for t in header.tensors {
        out.set_item(t.name, (t.dtype, PyTuple::new(py, t.shape)?))?;
    }
    Ok(out)
}

/// Delta from a base safetensors file to tensors held in memory.
#[pyfunction]
#[pyo3(signature = (base, new, out, format="rsd1", level=1, chunk_elems=delta::DEFAULT_CHUNK_ELEMS))]
pub fn encode_delta_from_file<'py>(
    py: Python<'py>,
    base: PathBuf,
    new: &Bound<'py, PyAny>,
    out: PathBuf,
    format: &str,
    level: i32,
    chunk_elems: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(py, format, level, chunk_elems)?;
    let n = hold(new, "new")?;
    let stats =
        py.detach(|| delta::encode_from_file(&base, &views(&n), &out, opts)).map_err(|e| snapshot_error(py, e))?;
    stats_dict(py, stats)
}
