//! Bindings of the chat tokenizer: Python objects -> template values (under
//! the GIL), then rendering and encoding with the GIL released.

use std::sync::Arc;

use minijinja::value::Value;
use numpy::PyArray1;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use rollstream_core::tokenize::{ChatRequest, ChatTemplate, ChatTokenizer, TextTokenizer, TokenizeError};

use crate::errors;

const MAX_DEPTH: usize = 64;

/// Convert a JSON-like Python object (dict, list, tuple, str, int, float,
/// bool, None) to a template value. `path` names the position for errors.
fn to_value(obj: &Bound<'_, PyAny>, path: &mut String, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(PyTypeError::new_err(format!("{path} is nested more than {MAX_DEPTH} levels deep")));
    }
    if obj.is_none() {
        return Ok(Value::from(()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::from(s.to_str()?.to_string()));
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::from(b.is_true()));
    }
    if let Ok(i) = obj.cast::<PyInt>() {
        return match i.extract::<i64>() {
            Ok(v) => Ok(Value::from(v)),
            Err(_) => Ok(Value::from(i.extract::<i128>()?)),
        };
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Ok(Value::from(f.value()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut pairs = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            let key = to_value(&k, path, depth + 1)?;
            let len = path.len();
            path.push_str(&format!("[{}]", k.repr()?));
            let val = to_value(&v, path, depth + 1)?;
            path.truncate(len);
            pairs.push((key, val));
        }
        return Ok(Value::from_pairs(pairs));
    }
    let seq: Option<Vec<Bound<'_, PyAny>>> = if let Ok(l) = obj.cast::<PyList>() {
        Some(l.iter().collect())
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        Some(t.iter().collect())
    } else {
        None
    };
    if let Some(items) = seq {
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            out.push(to_value(item, path, depth + 1)?);
            path.truncate(len);
        }
        return Ok(Value::from(out));
    }
    Err(PyTypeError::new_err(format!(
        "{path} has type {} which a chat template cannot use (use dict, list, str, int, float, bool or None)",
        obj.get_type().name()?
    )))
}

fn root_value(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Value> {
    to_value(obj, &mut name.to_string(), 0)
}

pub fn tokenize_error(py: Python<'_>, e: TokenizeError) -> PyErr {
    tokenize_error_in(py, e, "")
}

/// The Python exception for `e`, its message prefixed with `context` (which
/// conversation of a batch), every other attribute kept.
fn tokenize_error_in(py: Python<'_>, e: TokenizeError, context: &str) -> PyErr {
    match e {
        TokenizeError::Template(t) => errors::raise(
            py,
            errors::template_error,
            (format!("{context}{t}"), t.message, t.line, t.source_line, t.raised),
        ),
        TokenizeError::Input(m) => errors::raise(py, errors::chat_format_error, (format!("{context}{m}"),)),
        TokenizeError::Load(m) | TokenizeError::Encode(m) => {
            errors::raise(py, errors::tokenizer_error, (format!("{context}{m}"),))
        }
    }
}

/// Low-level chat tokenizer; `rollstream.ChatTokenizer` is the public API.
#[pyclass(module = "rollstream._core", name = "ChatTokenizer", frozen)]
pub struct PyChatTokenizer {
    inner: Arc<ChatTokenizer>,
}

fn request(
    messages: &Bound<'_, PyAny>,
    tools: Option<&Bound<'_, PyAny>>,
    documents: Option<&Bound<'_, PyAny>>,
    add_generation_prompt: bool,
    continue_final_message: bool,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<ChatRequest> {
    let mut extra = Vec::new();
    if let Some(kw) = kwargs {
        for (k, v) in kw.iter() {
            let key: String = k.extract()?;
            let val = root_value(&v, &key)?;
            extra.push((key, val));
        }
    }
    Ok(ChatRequest {
        messages: root_value(messages, "messages")?,
        tools: tools.filter(|t| !t.is_none()).map(|t| root_value(t, "tools")).transpose()?,
        documents: documents.filter(|d| !d.is_none()).map(|d| root_value(d, "documents")).transpose()?,
        add_generation_prompt,
        continue_final_message,
        kwargs: extra,
    })
}

#[pymethods]
impl PyChatTokenizer {
    #[new]
    #[pyo3(signature = (tokenizer_json, chat_template=None, special_tokens=None, extra_roles=Vec::new(), fixed_time=None))]
    fn new(
        py: Python<'_>,
        tokenizer_json: &str,
        chat_template: Option<&str>,
        special_tokens: Option<&Bound<'_, PyDict>>,
        extra_roles: Vec<String>,
        fixed_time: Option<i64>,
    ) -> PyResult<Self> {
        let mut vars = Vec::new();
        if let Some(st) = special_tokens {
            for (k, v) in st.iter() {
                let key: String = k.extract()?;
                let val = root_value(&v, &key)?;
                vars.push((key, val));
            }
        }
        let json = tokenizer_json.to_string();
        let template = chat_template.map(str::to_string);
        let built = py.detach(move || -> Result<ChatTokenizer, TokenizeError> {
            let text = TextTokenizer::from_json(&json)?;
            let template =
                template.map(|t| ChatTemplate::new(&t, fixed_time)).transpose().map_err(TokenizeError::Template)?;
            Ok(ChatTokenizer::new(text, template, vars, &extra_roles))
        });
        let inner = built.map_err(|e| tokenize_error(py, e))?;
        Ok(PyChatTokenizer { inner: Arc::new(inner) })
    }

    #[getter]
    fn has_fast_path(&self) -> bool {
        self.inner.text.has_fast_path()
    }

    #[getter]
    fn encoder(&self) -> &'static str {
        self.inner.text.encoder_name()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.text.vocab_size()
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.text.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.text.id_to_token(id)
    }

    #[pyo3(signature = (messages, tools=None, documents=None, add_generation_prompt=true, continue_final_message=false, kwargs=None))]
    #[allow(clippy::too_many_arguments)]
    fn render(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        tools: Option<&Bound<'_, PyAny>>,
        documents: Option<&Bound<'_, PyAny>>,
        add_generation_prompt: bool,
        continue_final_message: bool,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let req = request(messages, tools, documents, add_generation_prompt, continue_final_message, kwargs)?;
        let inner = &self.inner;
        py.detach(|| inner.render(&req)).map_err(|e| tokenize_error(py, e))
    }

    #[pyo3(signature = (messages, tools=None, documents=None, add_generation_prompt=true, continue_final_message=false, kwargs=None))]
    #[allow(clippy::too_many_arguments)]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        tools: Option<&Bound<'py, PyAny>>,
        documents: Option<&Bound<'py, PyAny>>,
        add_generation_prompt: bool,
        continue_final_message: bool,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Vec<u32>> {
        let req = request(messages, tools, documents, add_generation_prompt, continue_final_message, kwargs)?;
        let inner = &self.inner;
        py.detach(|| inner.apply(&req)).map_err(|e| tokenize_error(py, e))
    }

    /// Many conversations on all cores: list of int64 arrays.
    #[pyo3(signature = (conversations, tools=None, documents=None, add_generation_prompt=true, continue_final_message=false, kwargs=None))]
    #[allow(clippy::too_many_arguments)]
    fn apply_batch<'py>(
        &self,
        py: Python<'py>,
        conversations: &Bound<'py, PyAny>,
        tools: Option<&Bound<'py, PyAny>>,
        documents: Option<&Bound<'py, PyAny>>,
        add_generation_prompt: bool,
        continue_final_message: bool,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
        let mut reqs = Vec::new();
        for conv in conversations.try_iter()? {
            reqs.push(request(&conv?, tools, documents, add_generation_prompt, continue_final_message, kwargs)?);
        }
        let inner = &self.inner;
        let results = py.detach(|| inner.apply_batch(&reqs));
        let mut out = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            let ids = r.map_err(|e| tokenize_error_in(py, e, &format!("conversation {i}: ")))?;
            out.push(PyArray1::from_vec(py, ids.into_iter().map(i64::from).collect()));
        }
        Ok(out)
    }

    #[pyo3(signature = (text, add_special_tokens=false))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let inner = &self.inner;
        py.detach(|| inner.text.encode(text, add_special_tokens)).map_err(|e| tokenize_error(py, e))
    }

    /// Encode with the `tokenizers` crate, bypassing the fast path (parity checks).
    #[pyo3(signature = (text, add_special_tokens=false))]
    fn encode_reference(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let inner = &self.inner;
        py.detach(|| inner.text.encode_reference(text, add_special_tokens)).map_err(|e| tokenize_error(py, e))
    }

    #[pyo3(signature = (texts, add_special_tokens=false))]
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        add_special_tokens: bool,
    ) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
        use rayon::prelude::*;
        let inner = &self.inner;
        let results: Vec<Result<Vec<u32>, TokenizeError>> =
            py.detach(|| texts.par_iter().map(|t| inner.text.encode(t, add_special_tokens)).collect());
        results
            .into_iter()
            .map(|r| {
                r.map(|ids| PyArray1::from_vec(py, ids.into_iter().map(i64::from).collect()))
                    .map_err(|e| tokenize_error(py, e))
            })
            .collect()
    }

    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn decode(&self, py: Python<'_>, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        let inner = &self.inner;
        py.detach(|| inner.text.decode(&ids, skip_special_tokens)).map_err(|e| tokenize_error(py, e))
    }
}
