//! Bindings of the streaming HTTP client and the AIMD state machine.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rollstream_core::aimd::{Aimd, AimdConfig, Signal};
use rollstream_core::http::{ClientConfig, HttpError, Progress, StreamClient, StreamOutcome, StreamRequest};
use rollstream_core::sse::DEFAULT_MAX_EVENT_BYTES;
use rollstream_core::vllm::DecodeErrorKind;

use crate::streams::output_to_py;

fn duration(name: &str, secs: f64) -> PyResult<Duration> {
    rollstream_core::timeouts::timeout_from_secs(name, secs).map_err(PyValueError::new_err)
}

fn outcome_to_py<'py>(py: Python<'py>, o: StreamOutcome) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ok", true)?;
    d.set_item("status", o.status)?;
    d.set_item("result", output_to_py(py, o.output)?)?;
    d.set_item("head_s", o.timings.head)?;
    d.set_item("first_byte_s", o.timings.first_byte)?;
    d.set_item("first_token_s", o.timings.first_token)?;
    d.set_item("total_s", o.timings.total)?;
    d.set_item("request_id", o.request_id)?;
    Ok(d)
}

fn error_to_py<'py>(py: Python<'py>, e: HttpError) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ok", false)?;
    d.set_item("message", e.to_string())?;
    let (kind, tokens) = match &e {
        HttpError::Invalid(_) => ("invalid", 0),
        HttpError::Connect(_) => ("connect", 0),
        HttpError::Timeout { tokens, .. } => ("timeout", *tokens),
        HttpError::Transport { tokens, .. } => ("transport", *tokens),
        HttpError::Status { status, body, retry_after } => {
            d.set_item("status", *status)?;
            d.set_item("body", body)?;
            d.set_item("retry_after", retry_after)?;
            ("status", 0)
        }
        HttpError::Decode { error, tokens } => {
            d.set_item("truncated", error.kind == DecodeErrorKind::Truncated)?;
            d.set_item("offset", error.offset)?;
            ("decode", *tokens)
        }
        HttpError::Cancelled => ("cancelled", 0),
    };
    d.set_item("kind", kind)?;
    d.set_item("tokens", tokens)?;
    Ok(d)
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

/// Streaming HTTP/1.1 client running on its own Rust threads.
///
/// Invariant: no runtime thread is inside Python once `close()` (or
/// `shutdown_callbacks()`) returned. Callbacks count themselves in
/// `ACTIVE_CALLBACKS` before checking the closed flags, and the closers set
/// their flag first, then wait for the count to drain.
#[pyclass(module = "rollstream._core", name = "StreamClient", frozen)]
pub struct PyStreamClient {
    inner: Mutex<Option<Arc<StreamClient>>>,
    closed: Arc<AtomicBool>,
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
    #[pyo3(signature = (worker_threads=1, connect_timeout=10.0, pool_idle_timeout=90.0, *, max_event_bytes=DEFAULT_MAX_EVENT_BYTES))]
    fn new(
        worker_threads: usize,
        connect_timeout: f64,
        pool_idle_timeout: f64,
        max_event_bytes: usize,
    ) -> PyResult<Self> {
        let cfg = ClientConfig {
            worker_threads,
            connect_timeout: duration("connect_timeout", connect_timeout)?,
            pool_idle_timeout: duration("pool_idle_timeout", pool_idle_timeout)?,
            max_event_bytes,
            ..ClientConfig::default()
        };
        let client = StreamClient::new(cfg).map_err(|e| PyRuntimeError::new_err(format!("cannot start: {e}")))?;
        Ok(PyStreamClient { inner: Mutex::new(Some(Arc::new(client))), closed: Arc::new(AtomicBool::new(false)) })
    }

    /// Start a streaming POST; `callback(dict)` runs once, on a Rust thread,
    /// when it ends (see rollstream._http for the dict's keys).
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
        let closed = self.closed.clone();
        let progress = client.submit(
            req,
            Box::new(move |result| {
                ACTIVE_CALLBACKS.fetch_add(1, Ordering::SeqCst);
                if closed.load(Ordering::SeqCst) || SHUTDOWN.load(Ordering::SeqCst) {
                    ACTIVE_CALLBACKS.fetch_sub(1, Ordering::SeqCst);
                    // `callback` is released without the GIL (pyo3 defers it).
                    return;
                }
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
                ACTIVE_CALLBACKS.fetch_sub(1, Ordering::SeqCst);
            }),
        );
        Ok(PyRequestHandle { progress })
    }

    #[getter]
    fn in_flight(&self) -> u64 {
        self.inner.lock().ok().and_then(|g| g.as_ref().map(|c| c.in_flight())).unwrap_or(0)
    }

    /// Stop the client's threads: in-flight requests are dropped and no
    /// callback runs after this returns.
    fn close(&self, py: Python<'_>) {
        self.closed.store(true, Ordering::SeqCst);
        let client = self.inner.lock().ok().and_then(|mut g| g.take());
        drain_callbacks(py, Duration::from_secs(10));
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
}

#[pymethods]
impl PyAimd {
    #[new]
    #[pyo3(signature = (initial_window, min_window, max_window, target, interval=32, cooldown=1.0))]
    fn new(
        initial_window: f64,
        min_window: f64,
        max_window: f64,
        target: f64,
        interval: u32,
        cooldown: f64,
    ) -> PyResult<Self> {
        let cfg =
            AimdConfig { initial_window, min_window, max_window, target, interval, cooldown, ..Default::default() };
        let a = Aimd::new(cfg).map_err(PyValueError::new_err)?;
        Ok(PyAimd { inner: Mutex::new(a) })
    }

    #[getter]
    fn window(&self) -> PyResult<usize> {
        self.with(|a| a.window())
    }

    /// Queue time (seconds) reported by the server; returns the new window.
    fn queue_time(&self, seconds: f64, now: f64) -> PyResult<usize> {
        self.with(|a| {
            a.observe(Signal::QueueTime(seconds), now);
            a.window()
        })
    }

    fn first_token(&self, seconds: f64, now: f64) -> PyResult<usize> {
        self.with(|a| {
            a.observe(Signal::FirstToken(seconds), now);
            a.window()
        })
    }

    fn congestion(&self, retry_attempt: u32, now: f64) -> PyResult<usize> {
        self.with(|a| {
            a.observe(Signal::Congestion { retry_attempt }, now);
            a.window()
        })
    }

    fn step<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(|a| a.step(now))?;
        let d = PyDict::new(py);
        d.set_item("window", s.window)?;
        d.set_item("window_before", s.window_before)?;
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
