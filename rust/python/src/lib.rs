//! `rollstream._core`: PyO3 glue over `rollstream-core`. Only type conversion
//! and GIL handling live here; behaviour lives in the core crate.

// A panic here reaches Python as PanicException, which `except Exception`
// misses: errors are PyErr values.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pyo3::prelude::*;

mod errors;
mod masks;
mod router;
mod sampling;
mod snapshots;
mod streams;
mod tokenize;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", rollstream_core::version())?;
    m.add_class::<streams::PyStreamDecoder>()?;
    m.add_function(wrap_pyfunction!(streams::decode_stream, m)?)?;
    m.add_class::<tokenize::PyChatTokenizer>()?;
    m.add_class::<sampling::PyStreamClient>()?;
    m.add_class::<sampling::PyRequestHandle>()?;
    m.add_class::<sampling::PyStreamOk>()?;
    m.add_class::<sampling::PyStreamFailure>()?;
    m.add_class::<sampling::PyAimd>()?;
    m.add_class::<router::PyRouter>()?;
    m.add_function(wrap_pyfunction!(sampling::shutdown_callbacks, m)?)?;
    m.add_function(wrap_pyfunction!(masks::apply_mask_inplace, m)?)?;
    m.add_function(wrap_pyfunction!(masks::mask_to_dense, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::adler32, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::xxh3_64, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::encode_delta_files, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::decode_delta_files, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::encode_delta_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::decode_delta_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::write_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::safetensors_checksums, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::safetensors_header, m)?)?;
    m.add_function(wrap_pyfunction!(snapshots::encode_delta_from_file, m)?)?;
    Ok(())
}
