//! Bindings of the streaming HTTP client and the AIMD state machine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rollstream_core::aimd::{Aimd, AimdConfig, Signal};
use rollstream_core::http::{
    ClientConfig, HttpError, Progress, StreamClient, StreamOutcome, StreamRequest, DEFAULT_READ_COALESCE_US,
};
use rollstream_core::sse::DEFAULT_MAX_EVENT_BYTES;
use rollstream_core::vllm::DecodeErrorKind;

use crate::streams::output_to_py;

fn duration(name: &str, secs: f64) -> PyResult<Duration> {
    rollstream_core::timeouts::timeout_from_secs(name, secs).map_err(PyValueError::new_err)
}

/// A completed attempt: a 2xx response whose stream decoded to `[DONE]`.
/// `result` is the decoded stream in the form `rollstream.streams` wraps.
#[pyclass(module = "rollstream._core", name = "StreamOk", frozen, get_all)]
pub struct PyStreamOk {
    status: u16,
    result: Py<PyAny>,
    head_s: f64,
    first_byte_s: f64,
    first_token_s: f64,
    total_s: f64,
    request_id: Option<String>,
}

#[pymethods]
impl PyStreamOk {
    #[new]
    #[pyo3(signature = (status, result, head_s, first_byte_s, first_token_s, total_s, request_id=None))]
    fn new(
        status: u16,
        result: Py<PyAny>,
        head_s: f64,
        first_byte_s: f64,
        first_token_s: f64,
        total_s: f64,
        request_id: Option<String>,
    ) -> Self {
        PyStreamOk { status, result, head_s, first_byte_s, first_token_s, total_s, request_id }
    }

    #[getter]
    fn ok(&self) -> bool {
        true
    }

    fn __repr__(&self) -> String {
        format!("StreamOk(status={}, total_s={:.3}, request_id={:?})", self.status, self.total_s, self.request_id)
    }
}

/// How an attempt failed. `kind` is one of `invalid`, `connect`, `timeout`,
/// `transport`, `status` (with `status`, `body`, `retry_after`), `decode`
/// (with `truncated`, `offset`, `excerpt`), `cancelled` or `closed`.
#[pyclass(module = "rollstream._core", name = "StreamFailure", frozen, get_all)]
pub struct PyStreamFailure {
    kind: String,
    message: String,
    tokens: usize,
    status: Option<u16>,
    body: Option<String>,
    retry_after: Option<String>,
    truncated: bool,
    offset: Option<u64>,
    excerpt: Option<String>,
}

#[pymethods]
impl PyStreamFailure {
    #[new]
    #[pyo3(signature = (
        kind, message, tokens=0, *, status=None, body=None, retry_after=None, truncated=false, offset=None,
        excerpt=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: String,
        message: String,
        tokens: usize,
        status: Option<u16>,
        body: Option<String>,
        retry_after: Option<String>,
        truncated: bool,
        offset: Option<u64>,
        excerpt: Option<String>,
    ) -> PyResult<Self> {
        const KINDS: [&str; 8] =
            ["invalid", "connect", "timeout", "transport", "status", "decode", "cancelled", "closed"];
        if !KINDS.contains(&kind.as_str()) {
            return Err(PyValueError::new_err(format!("StreamFailure kind={kind:?} is not one of {KINDS:?}")));
        }
        Ok(PyStreamFailure { kind, message, tokens, status, body, retry_after, truncated, offset, excerpt })
    }

    #[getter]
    fn ok(&self) -> bool {
        false
    }

    fn __repr__(&self) -> String {
        format!("StreamFailure(kind={:?}, message={:?})", self.kind, self.message)
    }
}

fn failure(kind: &str, message: String) -> PyStreamFailure {
    PyStreamFailure {
        kind: kind.to_string(),
        message,
        tokens: 0,
        status: None,
        body: None,
        retry_after: None,
        truncated: false,
        offset: None,
        excerpt: None,
    }
}

fn outcome_to_py(py: Python<'_>, o: StreamOutcome) -> PyResult<Py<PyAny>> {
    let ok = PyStreamOk {
        status: o.status,
        result: output_to_py(py, o.output)?.into_any().unbind(),
        head_s: o.timings.head,
        first_byte_s: o.timings.first_byte,
        first_token_s: o.timings.first_token,
        total_s: o.timings.total,
        request_id: o.request_id,
    };
    Ok(Py::new(py, ok)?.into_any())
}

fn error_to_py(py: Python<'_>, e: HttpError) -> PyResult<Py<PyAny>> {
    let mut f = failure("", e.to_string());
    f.kind = match e {
        HttpError::Invalid(_) => "invalid",
        HttpError::Connect(_) => "connect",
        HttpError::Timeout { tokens, .. } => {
            f.tokens = tokens;
            "timeout"
        }
        HttpError::Transport { tokens, .. } => {
            f.tokens = tokens;
            "transport"
        }
        HttpError::Status { status, body, retry_after } => {
            f.status = Some(status);
            f.body = Some(body);
            f.retry_after = retry_after;
            "status"
        }
        HttpError::Decode { error, tokens } => {
            f.tokens = tokens;
            f.truncated = error.kind == DecodeErrorKind::Truncated;
            f.offset = Some(error.offset);
            f.excerpt = Some(error.excerpt);
            "decode"
        }
        HttpError::Cancelled => "cancelled",
        HttpError::Closed => "closed",
    }
    .to_string();
    Ok(Py::new(py, f)?.into_any())
}

/// Handle of one in-flight request.
#[pyclass(module = "rollstream._core", name = "RequestHandle", frozen)]
pub struct PyRequestHandle {
    progress: Arc<Progress>,
}

#[pymethods]
impl PyRequestHandle {
    /// Drop the connection (vLLM aborts the generation); the callback then
    /// reports kind "cancelled".
    fn cancel(&self) {
        self.progress.cancel();
    }

    #[getter]
    fn tokens(&self) -> u64 {
        self.progress.tokens()
    }
}

/// Completion callbacks currently inside (or entering) Python, over all clients.
static ACTIVE_CALLBACKS: AtomicUsize = AtomicUsize::new(0);
/// Set at interpreter exit: no callback may enter Python any more.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// Wait (GIL released) until no callback is inside Python, at most `timeout`.
fn drain_callbacks(py: Python<'_>, timeout: Duration) {
    py.detach(|| {
        let deadline = Instant::now() + timeout;
        while ACTIVE_CALLBACKS.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// Called at interpreter exit (registered by `rollstream._http`): CPython
/// terminates foreign threads that try to enter the interpreter while it
/// finalizes, which would abort the process from a Rust thread. After this,
/// completion callbacks are dropped instead of run.
#[pyfunction]
pub fn shutdown_callbacks(py: Python<'_>) {
    SHUTDOWN.store(true, Ordering::SeqCst);
    drain_callbacks(py, Duration::from_secs(10));
}

/// Callbacks of the requests in flight, by request number.
type Pending = Arc<Mutex<HashMap<u64, Py<PyAny>>>>;

/// Streaming HTTP/1.1 client running on its own Rust threads.
///
/// Invariants:
/// - no runtime thread is inside Python once `close()` (or
///   `shutdown_callbacks()`) returned. Callbacks count themselves in
///   `ACTIVE_CALLBACKS` before checking the closed flags, and the closers set
///   their flag first, then wait for the count to drain;
/// - every submitted callback is called exactly once: it lives in `pending`
///   until whoever removes it (the request's completion, or `close()` for the
///   requests still in flight, with a `closed` failure) calls it.
#[pyclass(module = "rollstream._core", name = "StreamClient", frozen)]
pub struct PyStreamClient {
    inner: Mutex<Option<Arc<StreamClient>>>,
    closed: Arc<AtomicBool>,
    pending: Pending,
    next_id: AtomicU64,
}

impl Drop for PyStreamClient {
    fn drop(&mut self) {
        // Cannot wait here (the GIL is held and a callback may want it):
        // just stop new callbacks; the runtime shuts down in the background.
        self.closed.store(true, Ordering::SeqCst);
    }
}

#[pymethods]
impl PyStreamClient {
    #[new]
    #[pyo3(signature = (worker_threads=1, connect_timeout=10.0, pool_idle_timeout=90.0, *, max_event_bytes=DEFAULT_MAX_EVENT_BYTES, read_coalesce=DEFAULT_READ_COALESCE_US as f64 * 1e-6))]
    fn new(
        worker_threads: usize,
        connect_timeout: f64,
        pool_idle_timeout: f64,
        max_event_bytes: usize,
        read_coalesce: f64,
    ) -> PyResult<Self> {
        if !(read_coalesce.is_finite() && (0.0..=0.1).contains(&read_coalesce)) {
            return Err(PyValueError::new_err(format!(
                "read_coalesce={read_coalesce} must be between 0 and 0.1 seconds"
            )));
        }
        let cfg = ClientConfig {
            worker_threads,
            connect_timeout: duration("connect_timeout", connect_timeout)?,
            pool_idle_timeout: duration("pool_idle_timeout", pool_idle_timeout)?,
            max_event_bytes,
            // In [0, 0.1] s (checked above): the cast cannot wrap.
            read_coalesce: Duration::from_micros((read_coalesce * 1e6).round() as u64),
            ..ClientConfig::default()
        };
        let client = StreamClient::new(cfg).map_err(|e| PyRuntimeError::new_err(format!("cannot start: {e}")))?;
        Ok(PyStreamClient {
            inner: Mutex::new(Some(Arc::new(client))),
            closed: Arc::new(AtomicBool::new(false)),
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
        })
    }

    /// Start a streaming POST; `callback(StreamOk | StreamFailure)` runs
    /// exactly once: on a Rust thread when the attempt ends, or on the
    /// closing thread (a `closed` failure) when `close()` comes first.
    #[pyo3(signature = (url, headers, body, idle_timeout, total_timeout, callback))]
    fn submit(
        &self,
        url: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        idle_timeout: f64,
        total_timeout: f64,
        callback: Py<PyAny>,
    ) -> PyResult<PyRequestHandle> {
        let req = StreamRequest {
            url,
            headers,
            body,
            idle_timeout: duration("idle_timeout", idle_timeout)?,
            total_timeout: duration("total_timeout", total_timeout)?,
        };
        let client = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("client lock poisoned"))?
            .clone()
            .ok_or_else(|| PyRuntimeError::new_err("StreamClient is closed"))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().map_err(|_| PyRuntimeError::new_err("client lock poisoned"))?.insert(id, callback);
        let closed = self.closed.clone();
        let pending = self.pending.clone();
        let progress = client.submit(
            req,
            Box::new(move |result| {
                ACTIVE_CALLBACKS.fetch_add(1, Ordering::SeqCst);
                if closed.load(Ordering::SeqCst) || SHUTDOWN.load(Ordering::SeqCst) {
                    // close() fails this request's callback itself (at exit
                    // nobody is waiting any more).
                    ACTIVE_CALLBACKS.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                let callback = pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(callback) = callback {
                    Python::attach(|py| {
                        let arg = match result {
                            Ok(o) => outcome_to_py(py, o),
                            Err(e) => error_to_py(py, e),
                        };
                        let call = arg.and_then(|a| callback.call1(py, (a,)));
                        if let Err(err) = call {
                            err.write_unraisable(py, Some(callback.bind(py)));
                        }
                        drop(callback);
                    });
                }
                ACTIVE_CALLBACKS.fetch_sub(1, Ordering::SeqCst);
            }),
        );
        Ok(PyRequestHandle { progress })
    }

    #[getter]
    fn in_flight(&self) -> u64 {
        self.inner.lock().ok().and_then(|g| g.as_ref().map(|c| c.in_flight())).unwrap_or(0)
    }

    /// Stop the client's threads. Requests still in flight are abandoned
    /// (their connections dropped) and their callbacks called here, with a
    /// `closed` failure; no callback runs on a Rust thread after this returns.
    fn close(&self, py: Python<'_>) {
        self.closed.store(true, Ordering::SeqCst);
        let client = self.inner.lock().ok().and_then(|mut g| g.take());
        drain_callbacks(py, Duration::from_secs(10));
        let orphans: Vec<Py<PyAny>> =
            self.pending.lock().map(|mut p| p.drain().map(|(_, cb)| cb).collect()).unwrap_or_default();
        for callback in orphans {
            let call = error_to_py(py, HttpError::Closed).and_then(|a| callback.call1(py, (a,)));
            if let Err(err) = call {
                err.write_unraisable(py, Some(callback.bind(py)));
            }
        }
        py.detach(move || drop(client));
    }
}

/// The AIMD window (rollstream.AdaptiveConcurrencyController wraps it).
#[pyclass(module = "rollstream._core", name = "Aimd", frozen)]
pub struct PyAimd {
    inner: Mutex<Aimd>,
}

impl PyAimd {
    fn with<T>(&self, f: impl FnOnce(&mut Aimd) -> T) -> PyResult<T> {
        let mut g = self.inner.lock().map_err(|_| PyRuntimeError::new_err("AIMD lock poisoned"))?;
        Ok(f(&mut g))
    }

    fn observe(&self, signal: Signal, now: f64) -> PyResult<usize> {
        self.with(|a| {
            a.observe(signal, now);
            a.window()
        })
    }
}

#[pymethods]
impl PyAimd {
    #[new]
    #[pyo3(signature = (
        initial_window, min_window, max_window, target, *, additive_increase=1.0, decrease=0.5, alpha=0.3,
        interval=32, cooldown=1.0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        initial_window: f64,
        min_window: f64,
        max_window: f64,
        target: f64,
        additive_increase: f64,
        decrease: f64,
        alpha: f64,
        interval: u32,
        cooldown: f64,
    ) -> PyResult<Self> {
        let cfg = AimdConfig {
            initial_window,
            min_window,
            max_window,
            target,
            interval,
            alpha,
            additive_increase,
            decrease,
            // A request failing again and again shrinks twice as hard.
            severe_decrease: decrease * decrease,
            cooldown,
            ..Default::default()
        };
        let a = Aimd::new(cfg).map_err(PyValueError::new_err)?;
        Ok(PyAimd { inner: Mutex::new(a) })
    }

    #[getter]
    fn window(&self) -> PyResult<usize> {
        self.with(|a| a.window())
    }

    #[getter]
    fn ema(&self) -> PyResult<Option<f64>> {
        self.with(|a| a.ema())
    }

    /// Queue time (seconds) reported by the server; returns the new window.
    fn queue_time(&self, seconds: f64, now: f64) -> PyResult<usize> {
        self.observe(Signal::QueueTime(seconds), now)
    }

    /// Client-measured time to first token of a request that prefilled
    /// `prefill_tokens` tokens; returns the new window.
    fn first_token(&self, seconds: f64, prefill_tokens: u64, now: f64) -> PyResult<usize> {
        self.observe(Signal::FirstToken { seconds, prefill_tokens }, now)
    }

    /// A 429/503/transport failure on the (1-based) `retry_attempt`-th try.
    fn congestion(&self, retry_attempt: u32, now: f64) -> PyResult<usize> {
        self.observe(Signal::Congestion { retry_attempt }, now)
    }

    fn step<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(|a| a.step(now))?;
        let d = PyDict::new(py);
        d.set_item("window_before", s.window_before)?;
        d.set_item("window", s.window)?;
        d.set_item("adjusted", s.adjusted)?;
        d.set_item("avg_pq", s.avg_queue)?;
        d.set_item("ema_pq", s.ema_queue)?;
        d.set_item("queue_samples", s.queue_samples)?;
        d.set_item("ttft_samples", s.ttft_samples)?;
        d.set_item("congestion_events", s.congestion_events)?;
        d.set_item("shrinks", s.shrinks)?;
        d.set_item("grows", s.grows)?;
        Ok(d)
    }
}
