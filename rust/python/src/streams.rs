//! Bindings of the vLLM stream decoder: results become numpy arrays without
//! a Python object per token.

use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use rollstream_core::sse::DEFAULT_MAX_EVENT_BYTES;
use rollstream_core::vllm::{self, ChoiceOutput, DecodeError, DecodeErrorKind, StopReason, StreamOutput, TopLogprobs};

use crate::errors;

/// Chunks at least this large are decoded with the GIL released; below it the
/// release/re-acquire costs more than it frees.
const DETACH_BYTES: usize = 64 * 1024;

pub fn decode_error(py: Python<'_>, e: DecodeError) -> PyErr {
    let cls = match e.kind {
        DecodeErrorKind::Truncated => errors::stream_truncated,
        DecodeErrorKind::Protocol => errors::stream_protocol,
    };
    errors::raise(py, cls, (e.message, e.offset, e.excerpt))
}

fn top_to_py<'py>(py: Python<'py>, top: Option<TopLogprobs>) -> PyResult<Bound<'py, PyAny>> {
    let Some(t) = top else {
        return Ok(py.None().into_bound(py));
    };
    let td = PyDict::new(py);
    td.set_item("offsets", PyArray1::from_vec(py, t.offsets))?;
    td.set_item("token_ids", PyArray1::from_vec(py, t.token_ids))?;
    td.set_item("token_bytes", PyBytes::new(py, &t.tokens.bytes))?;
    td.set_item("token_offsets", PyArray1::from_vec(py, t.tokens.offsets))?;
    td.set_item("logprobs", PyArray1::from_vec(py, t.logprobs))?;
    Ok(td.into_any())
}

fn choice_to_py<'py>(py: Python<'py>, c: ChoiceOutput) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("index", c.index)?;
    d.set_item("token_ids", PyArray1::from_vec(py, c.token_ids))?;
    d.set_item("logprobs", PyArray1::from_vec(py, c.logprobs))?;
    d.set_item("has_logprobs", c.has_logprobs)?;
    d.set_item("ranks", PyArray1::from_vec(py, c.ranks))?;
    d.set_item("top_logprobs", top_to_py(py, c.top_logprobs)?)?;
    d.set_item("prompt_logprobs", PyArray1::from_vec(py, c.prompt_logprobs))?;
    d.set_item("prompt_top_logprobs", top_to_py(py, c.prompt_top_logprobs)?)?;
    d.set_item("text", c.text)?;
    d.set_item("reasoning", c.reasoning)?;
    d.set_item("finish_reason", c.finish_reason)?;
    match c.stop_reason {
        Some(StopReason::Token(t)) => d.set_item("stop_reason", t)?,
        Some(StopReason::Text(s)) => d.set_item("stop_reason", s)?,
        None => d.set_item("stop_reason", py.None())?,
    }
    match c.prompt_token_ids {
        Some(p) => d.set_item("prompt_token_ids", PyArray1::from_vec(py, p))?,
        None => d.set_item("prompt_token_ids", py.None())?,
    }
    match c.routed_experts {
        Some(a) => {
            let arr = PyArray1::from_vec(py, a.data);
            d.set_item("routed_experts", (a.dtype.name(), a.shape, arr))?;
        }
        None => d.set_item("routed_experts", py.None())?,
    }
    match c.sampling_mask {
        Some((ids, offs)) => {
            d.set_item("sampling_mask", (PyArray1::from_vec(py, ids), PyArray1::from_vec(py, offs)))?
        }
        None => d.set_item("sampling_mask", py.None())?,
    }
    let wv = PyList::empty(py);
    for w in c.weight_versions {
        wv.append((w.version, w.start, w.end))?;
    }
    d.set_item("weight_versions", wv)?;
    Ok(d)
}

/// Convert a decoded stream to the plain structure `rollstream.streams`
/// wraps in dataclasses.
pub fn output_to_py<'py>(py: Python<'py>, out: StreamOutput) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let choices = PyList::empty(py);
    for c in out.choices {
        choices.append(choice_to_py(py, c)?)?;
    }
    d.set_item("choices", choices)?;
    match out.usage {
        Some(u) => {
            let ud = PyDict::new(py);
            ud.set_item("prompt_tokens", u.prompt_tokens)?;
            ud.set_item("completion_tokens", u.completion_tokens)?;
            ud.set_item("total_tokens", u.total_tokens)?;
            ud.set_item("cached_tokens", u.cached_tokens)?;
            d.set_item("usage", ud)?;
        }
        None => d.set_item("usage", py.None())?,
    }
    let m = PyDict::new(py);
    for (k, v) in out.metrics {
        m.set_item(k, v)?;
    }
    d.set_item("metrics", m)?;
    d.set_item("request_id", out.request_id)?;
    d.set_item("model", out.model)?;
    match out.error {
        Some(e) => {
            let ed = PyDict::new(py);
            ed.set_item("message", e.message)?;
            ed.set_item("type", e.error_type)?;
            ed.set_item("code", e.code)?;
            ed.set_item("param", e.param)?;
            ed.set_item("offset", e.offset)?;
            d.set_item("error", ed)?;
        }
        None => d.set_item("error", py.None())?,
    }
    d.set_item("done", out.done)?;
    d.set_item("events", out.events)?;
    d.set_item("bytes", out.bytes)?;
    Ok(d)
}

/// Incremental decoder of one vLLM SSE response body.
#[pyclass(module = "rollstream._core", name = "StreamDecoder")]
pub struct PyStreamDecoder {
    inner: Option<vllm::StreamDecoder>,
}

impl PyStreamDecoder {
    fn inner(&mut self) -> PyResult<&mut vllm::StreamDecoder> {
        self.inner.as_mut().ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("StreamDecoder already finished"))
    }
}

#[pymethods]
impl PyStreamDecoder {
    #[new]
    #[pyo3(signature = (*, max_event_bytes=DEFAULT_MAX_EVENT_BYTES))]
    fn new(max_event_bytes: usize) -> Self {
        Self { inner: Some(vllm::StreamDecoder::with_max_event_bytes(max_event_bytes)) }
    }

    /// Feed the next chunk of the body.
    fn feed(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let dec = self.inner()?;
        let res = if data.len() >= DETACH_BYTES { py.detach(|| dec.feed(data)) } else { dec.feed(data) };
        res.map_err(|e| decode_error(py, e))
    }

    /// End of body: the decoded stream, or StreamTruncatedError.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dec = self
            .inner
            .take()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("StreamDecoder already finished"))?;
        let out = dec.finish().map_err(|e| decode_error(py, e))?;
        output_to_py(py, out)
    }

    /// What was decoded so far, without requiring a complete body.
    fn partial<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dec = self
            .inner
            .take()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("StreamDecoder already finished"))?;
        output_to_py(py, dec.into_partial())
    }

    #[getter]
    fn events(&mut self) -> PyResult<u64> {
        Ok(self.inner()?.events())
    }

    #[getter]
    fn tokens(&mut self) -> PyResult<usize> {
        Ok(self.inner()?.tokens())
    }

    #[getter]
    fn done(&mut self) -> PyResult<bool> {
        Ok(self.inner()?.is_done())
    }
}

/// Decode a complete body (GIL released while parsing).
#[pyfunction]
#[pyo3(signature = (body, *, max_event_bytes=DEFAULT_MAX_EVENT_BYTES))]
pub fn decode_stream<'py>(py: Python<'py>, body: &[u8], max_event_bytes: usize) -> PyResult<Bound<'py, PyDict>> {
    let out = py.detach(|| vllm::decode_stream_capped(body, max_event_bytes)).map_err(|e| decode_error(py, e))?;
    output_to_py(py, out)
}
