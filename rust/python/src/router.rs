//! Binding of the sticky least-loaded router (`rollstream_core::router`).

use std::sync::Mutex;

use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rollstream_core::router::{EngineState, Route, Router, RouterError};

fn state_from(name: &str) -> PyResult<EngineState> {
    match name {
        "active" => Ok(EngineState::Active),
        "paused" => Ok(EngineState::Paused),
        "down" => Ok(EngineState::Down),
        other => {
            Err(PyValueError::new_err(format!("engine state must be 'active', 'paused' or 'down', got {other:?}")))
        }
    }
}

fn state_name(state: EngineState) -> &'static str {
    match state {
        EngineState::Active => "active",
        EngineState::Paused => "paused",
        EngineState::Down => "down",
    }
}

fn router_err(e: RouterError) -> PyErr {
    match e {
        RouterError::UnknownEngine(_) => PyKeyError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// `_core.Router()`: engines by id (their base URL), sessions by key.
#[pyclass(name = "Router", module = "rollstream._core")]
pub struct PyRouter {
    inner: Mutex<Router>,
}

impl PyRouter {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Router>> {
        self.inner.lock().map_err(|_| PyRuntimeError::new_err("router state poisoned by a panic"))
    }
}

#[pymethods]
impl PyRouter {
    #[new]
    fn new() -> Self {
        Self { inner: Mutex::new(Router::new()) }
    }

    fn add(&self, id: &str) -> PyResult<usize> {
        Ok(self.lock()?.add(id))
    }

    fn remove(&self, id: &str) -> PyResult<usize> {
        self.lock()?.remove(id).map_err(router_err)
    }

    fn set_state(&self, id: &str, state: &str) -> PyResult<()> {
        let state = state_from(state)?;
        self.lock()?.set_state(id, state).map_err(router_err)
    }

    /// `(slot, id)` of the chosen engine, `(-1, "wait")` when every
    /// candidate is paused or down, `(-1, "none")` when there is no engine.
    #[pyo3(signature = (session=None))]
    fn route(&self, session: Option<&str>) -> PyResult<(i64, String)> {
        let mut r = self.lock()?;
        Ok(match r.route(session) {
            Route::Engine(slot) => {
                let id = r.id_of(slot).unwrap_or_default().to_owned();
                (slot as i64, id)
            }
            Route::Wait => (-1, "wait".to_owned()),
            Route::NoEngine => (-1, "none".to_owned()),
        })
    }

    fn done(&self, slot: usize) -> PyResult<()> {
        self.lock()?.done(slot).map_err(router_err)
    }

    fn finish_session(&self, session: &str) -> PyResult<bool> {
        Ok(self.lock()?.finish_session(session))
    }

    fn session_engine(&self, session: &str) -> PyResult<Option<String>> {
        let r = self.lock()?;
        Ok(r.session_engine(session).and_then(|s| r.id_of(s)).map(str::to_owned))
    }

    /// `[(id, state, outstanding, sessions)]` in slot order.
    fn loads(&self) -> PyResult<Vec<(String, &'static str, u32, u32)>> {
        Ok(self.lock()?.loads().into_iter().map(|l| (l.id, state_name(l.state), l.outstanding, l.sessions)).collect())
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.lock()?.len())
    }

    #[getter]
    fn session_count(&self) -> PyResult<usize> {
        Ok(self.lock()?.session_count())
    }
}
