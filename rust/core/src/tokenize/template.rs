//! Chat templates rendered the way transformers renders them: jinja2 with
//! `trim_blocks` and `lstrip_blocks`, loop controls, HF's globals
//! (`raise_exception`, `strftime_now`) and its `tojson` filter (Python's
//! `json.dumps(ensure_ascii=False)`), Python string/dict methods, Python
//! `str()` of printed values, and transformers' `{% generation %}` blocks.

use std::fmt;
use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};

use super::pyfmt::{json_dumps, py_str, JsonOpts};

const NAME: &str = "chat_template";

/// Why a template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// What went wrong (for `raise_exception`, the template's own message).
    pub message: String,
    /// 1-based line in the template source, when known.
    pub line: Option<usize>,
    /// That line of the template source.
    pub source_line: Option<String>,
    /// The template called `raise_exception(...)`.
    pub raised: bool,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(line) = self.line {
            write!(f, " (chat template line {line}")?;
            if let Some(src) = &self.source_line {
                write!(f, ": {}", src.trim())?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateError {}

const RAISE_MARKER: &str = "\u{0}raise_exception\u{0}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: Arc<str>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").field("source_len", &self.source.len()).finish()
    }
}

/// transformers' `{% generation %}` / `{% endgeneration %}` only track
/// assistant spans; they render their body unchanged. Rewriting them as an
/// always-true `if` keeps jinja's whitespace rules (same tag, same `-`/`+`).
// Constant patterns (exercised by the template tests): they cannot fail on input.
#[allow(clippy::expect_used)]
fn rewrite_generation_tags(src: &str) -> String {
    use std::sync::LazyLock;
    static OPEN: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").expect("valid regex"));
    static CLOSE: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").expect("valid regex"));
    let s = OPEN.replace_all(src, "{%${1} if true ${2}%}");
    CLOSE.replace_all(&s, "{%${1} endif ${2}%}").into_owned()
}

fn strftime(now: Option<i64>, fmt: &str) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(fmt).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format {fmt:?}")));
    }
    let text = match now {
        Some(secs) => chrono::DateTime::from_timestamp(secs, 0)
            .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "strftime_now: fixed time out of range"))?
            .naive_utc()
            .format_with_items(items.into_iter())
            .to_string(),
        None => chrono::Local::now().format_with_items(items.into_iter()).to_string(),
    };
    Ok(text)
}

fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    // HF: tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
    let mut positional = args.0.into_iter();
    let mut opts = JsonOpts::default();
    let pick = |name: &str, pos: Option<Value>| -> Result<Option<Value>, Error> {
        let kw: Option<Value> = kwargs.get(name)?;
        Ok(kw.or(pos).filter(|v| !v.is_none() && !v.is_undefined()))
    };
    if let Some(v) = pick("ensure_ascii", positional.next())? {
        opts.ensure_ascii = v.is_true();
    }
    if let Some(v) = pick("indent", positional.next())? {
        opts.indent = Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v.as_i64().unwrap_or(0).max(0)).unwrap_or(0)),
        });
        opts.item_sep = ",".into();
    }
    if let Some(v) = pick("separators", positional.next())? {
        let parts: Vec<Value> = v.try_iter()?.collect();
        match parts.as_slice() {
            [a, b] => {
                opts.item_sep = a.as_str().unwrap_or(",").to_string();
                opts.key_sep = b.as_str().unwrap_or(":").to_string();
            }
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        }
    }
    if let Some(v) = pick("sort_keys", positional.next())? {
        opts.sort_keys = v.is_true();
    }
    kwargs.assert_all_used()?;
    Ok(Value::from(json_dumps(value, &opts)?))
}

impl ChatTemplate {
    /// Compile `source`. `fixed_time` (Unix seconds, UTC) pins what
    /// `strftime_now` sees, for reproducible renders.
    pub fn new(source: &str, fixed_time: Option<i64>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| TemplateError { message: e.to_string(), line: None, source_line: None, raised: false })?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            let mut s = String::new();
            py_str(value, &mut s);
            out.write_str(&s).map_err(|_| Error::new(ErrorKind::WriteFailure, "write failed"))
        });
        env.add_function("raise_exception", |msg: Value| -> Result<Value, Error> {
            let mut text = String::new();
            py_str(&msg, &mut text);
            Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISE_MARKER}{text}")))
        });
        env.add_function("strftime_now", move |fmt: &str| strftime(fixed_time, fmt));
        env.add_filter("tojson", tojson);
        let source: Arc<str> = Arc::from(rewrite_generation_tags(source));
        env.add_template_owned(NAME, source.to_string()).map_err(|e| convert(&e, &source))?;
        Ok(ChatTemplate { env, source })
    }

    /// Render with `ctx` (a map of template variables).
    pub fn render(&self, ctx: &Value) -> Result<String, TemplateError> {
        let tmpl = self.env.get_template(NAME).map_err(|e| convert(&e, &self.source))?;
        tmpl.render(ctx).map_err(|e| convert(&e, &self.source))
    }
}

fn convert(e: &Error, source: &str) -> TemplateError {
    // The innermost cause carries the template's own message.
    let mut root: &dyn std::error::Error = e;
    let mut line = e.line();
    while let Some(next) = root.source() {
        if let Some(me) = next.downcast_ref::<Error>() {
            line = me.line().or(line);
        }
        root = next;
    }
    let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.to_string());
    let root_detail = root.downcast_ref::<Error>().and_then(|r| r.detail()).unwrap_or(&detail).to_string();
    let (message, raised) = if let Some(m) = root_detail.strip_prefix(RAISE_MARKER) {
        (m.to_string(), true)
    } else if let Some(m) = detail.strip_prefix(RAISE_MARKER) {
        (m.to_string(), true)
    } else {
        (format!("{}: {}", e.kind(), detail), false)
    };
    let source_line = line.and_then(|l| source.lines().nth(l.saturating_sub(1))).map(str::to_string);
    TemplateError { message, line, source_line, raised }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, ctx: serde_json::Value) -> Result<String, TemplateError> {
        ChatTemplate::new(src, Some(1_795_000_000))?.render(&Value::from(minijinja::value::Serde(ctx)))
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n  {{ m.role }}: {{ m.content }}\n{% endfor %}\n";
        let out = render(src, serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!(out, "  user: hi\n");
    }

    #[test]
    fn raise_exception_reports_message_and_line() {
        let src = "line one\n{% if true %}{{ raise_exception('Roles must alternate') }}{% endif %}";
        let e = render(src, serde_json::json!({})).unwrap_err();
        assert!(e.raised);
        assert_eq!(e.message, "Roles must alternate");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = ChatTemplate::new("ok\n{% if %}", None).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(!e.raised);
    }

    #[test]
    fn tojson_python_style_and_pycompat() {
        let out = render(
            "{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|{{ 'a,b'.split(',') }}|{{ x.startswith('he') }}|{{ flag }}",
            serde_json::json!({"tools": [{"n": 1.5}], "x": "hello", "flag": false}),
        )
        .unwrap();
        assert_eq!(out, "[{\"n\": 1.5}]|[\n  {\n    \"n\": 1.5\n  }\n]|['a', 'b']|True|False");
    }

    #[test]
    fn generation_blocks_and_loop_controls() {
        let out = render(
            "{% for i in [1,2,3] %}{% if i == 2 %}{% continue %}{% endif %}{%- generation -%} {{ i }} {%- endgeneration -%}{% endfor %}",
            serde_json::json!({}),
        )
        .unwrap();
        assert_eq!(out, "13");
    }

    #[test]
    fn strftime_now_is_pinnable() {
        assert_eq!(render("{{ strftime_now('%d %B %Y') }}", serde_json::json!({})).unwrap(), "18 November 2026");
    }
}
