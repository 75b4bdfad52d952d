//! Bindings of the mask kernel: numpy arrays modified in place, GIL released.

use numpy::{PyArray1, PyArrayDescrMethods, PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyMemoryError;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rollstream_core::masks::{self, MaskError, MaskErrorKind, MaskRef};

fn mask_error(e: MaskError) -> PyErr {
    match e.kind {
        MaskErrorKind::Invalid => PyValueError::new_err(e.to_string()),
        MaskErrorKind::OutOfMemory => PyMemoryError::new_err(e.to_string()),
    }
}

/// Mask rows of a C-contiguous, writeable 2-D float array in place.
/// `fill_bits` is the fill value's bit pattern in the array's element type.
#[pyfunction]
#[pyo3(signature = (logits, row_start, token_ids, offsets, fill_bits, keep=None))]
pub fn apply_mask_inplace(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    row_start: usize,
    token_ids: PyReadonlyArray1<'_, i32>,
    offsets: PyReadonlyArray1<'_, i64>,
    fill_bits: u64,
    keep: Option<PyReadonlyArray1<'_, i64>>,
) -> PyResult<()> {
    if logits.ndim() != 2 || !logits.is_c_contiguous() {
        return Err(PyValueError::new_err("logits must be a C-contiguous 2-D array"));
    }
    // SAFETY: a valid array object; reading its flags.
    let fields = unsafe { &*numpy::npyffi::_PyArray_GET_ITEM_DATA(logits.as_array_ptr()) };
    if fields.flags & numpy::npyffi::NPY_ARRAY_WRITEABLE == 0 {
        return Err(PyValueError::new_err("logits must be writeable"));
    }
    let (rows, vocab) = (logits.shape()[0], logits.shape()[1]);
    let itemsize = logits.dtype().itemsize();
    let ids = token_ids.as_slice()?;
    let offs = offsets.as_slice()?;
    let keep = keep.as_ref().map(|k| k.as_slice()).transpose()?;
    let mask = MaskRef { token_ids: ids, offsets: offs };
    let ptr = fields.data as usize;
    let n = rows * vocab;
    // SAFETY: `ptr` addresses `n` elements of `itemsize` bytes (C-contiguous
    // 2-D array), the array is writeable and kept alive by `logits` for the
    // whole call; the kernel validates every index before writing.
    let run = || -> Result<(), MaskError> {
        match itemsize {
            2 => masks::apply(
                unsafe { std::slice::from_raw_parts_mut(ptr as *mut u16, n) },
                vocab,
                row_start,
                mask,
                fill_bits as u16,
                keep,
            ),
            4 => masks::apply(
                unsafe { std::slice::from_raw_parts_mut(ptr as *mut u32, n) },
                vocab,
                row_start,
                mask,
                fill_bits as u32,
                keep,
            ),
            8 => masks::apply(
                unsafe { std::slice::from_raw_parts_mut(ptr as *mut u64, n) },
                vocab,
                row_start,
                mask,
                fill_bits,
                keep,
            ),
            s => Err(MaskError {
                kind: MaskErrorKind::Invalid,
                row: None,
                message: format!("unsupported element size {s} (float16/bfloat16/float32/float64)"),
            }),
        }
    };
    py.detach(run).map_err(mask_error)
}

/// Dense boolean rows (flattened; reshape to `(rows, vocab)`).
#[pyfunction]
pub fn mask_to_dense<'py>(
    py: Python<'py>,
    token_ids: PyReadonlyArray1<'py, i32>,
    offsets: PyReadonlyArray1<'py, i64>,
    vocab: usize,
) -> PyResult<Bound<'py, PyArray1<bool>>> {
    let ids = token_ids.as_slice()?;
    let offs = offsets.as_slice()?;
    let dense = py.detach(|| masks::to_dense(MaskRef { token_ids: ids, offsets: offs }, vocab)).map_err(mask_error)?;
    Ok(PyArray1::from_vec(py, dense))
}
