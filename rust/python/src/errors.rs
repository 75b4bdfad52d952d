//! Raising the exception classes defined in `rollstream._exceptions`, so the
//! hierarchy (and its docs) live in one Python module.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

macro_rules! exc {
    ($fn_name:ident, $cls:literal) => {
        pub fn $fn_name<'py>(py: Python<'py>) -> PyResult<&'py Bound<'py, PyType>> {
            static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            CELL.import(py, "rollstream._exceptions", $cls)
        }
    };
}

exc!(stream_truncated, "StreamTruncatedError");
exc!(stream_protocol, "StreamProtocolError");
exc!(template_error, "TemplateError");
exc!(chat_format_error, "ChatFormatError");
exc!(tokenizer_error, "TokenizerError");
exc!(snapshot_io_error, "SnapshotIOError");
exc!(snapshot_corrupt_error, "SnapshotCorruptError");
exc!(tensor_mismatch_error, "TensorMismatchError");
exc!(checksum_mismatch_error, "ChecksumMismatchError");

/// Build an instance of `cls(*args)` as a `PyErr`; if the class cannot be
/// imported, that import error is returned instead (never a panic).
pub fn raise<'py, A>(py: Python<'py>, cls: fn(Python<'py>) -> PyResult<&'py Bound<'py, PyType>>, args: A) -> PyErr
where
    A: pyo3::PyErrArguments + Send + Sync + 'static,
{
    match cls(py) {
        Ok(ty) => PyErr::from_type(ty.clone(), args),
        Err(e) => e,
    }
}
