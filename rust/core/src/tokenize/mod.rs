//! Client-side tokenization: `tokenizer.json` + chat templates, producing the
//! ids transformers' `apply_chat_template(..., tokenize=True)` produces.
//!
//! - [`TextTokenizer`]: text -> ids. Byte-level BPE vocabularies take the
//!   fast path in [`bpe`], legacy SentencePiece-style BPE (Llama 2, Mistral
//!   v0.1, Phi-3) the one in [`spbpe`]; everything else (Unigram, WordPiece,
//!   unusual pre-tokenizers or normalizers) goes through the `tokenizers`
//!   crate, which also serves `decode` and the parity tests.
//! - [`ChatTokenizer`]: template rendering ([`template`]) + encoding, one
//!   conversation or a batch on all cores.

pub mod added;
pub mod bpe;
pub mod pretok;
pub mod pyfmt;
pub mod spbpe;
pub mod template;

use std::fmt;
use std::str::FromStr;

use minijinja::value::{Value, ValueKind};
use rayon::prelude::*;

use bpe::ByteLevelBpe;
use spbpe::SentencePieceBpe;
pub use template::{ChatTemplate, TemplateError};

/// Why tokenization failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizeError {
    /// The tokenizer files could not be loaded.
    Load(String),
    /// The input is not a valid conversation (bad role, bad content type...).
    Input(String),
    /// The chat template failed (syntax error, `raise_exception`, ...).
    Template(TemplateError),
    /// Encoding or decoding failed inside the tokenizer.
    Encode(String),
}

impl fmt::Display for TokenizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizeError::Load(m) | TokenizeError::Input(m) | TokenizeError::Encode(m) => f.write_str(m),
            TokenizeError::Template(t) => t.fmt(f),
        }
    }
}

impl std::error::Error for TokenizeError {}

/// rollstream's own encoders for the shapes they reproduce exactly.
#[derive(Debug, Clone)]
enum FastEncoder {
    ByteLevel(ByteLevelBpe),
    SentencePiece(SentencePieceBpe),
}

impl FastEncoder {
    fn encode(&self, text: &str, add_special_tokens: bool, out: &mut Vec<u32>) {
        match self {
            FastEncoder::ByteLevel(e) => e.encode(text, add_special_tokens, out),
            FastEncoder::SentencePiece(e) => e.encode(text, add_special_tokens, out),
        }
    }
}

/// Text <-> ids for one vocabulary.
pub struct TextTokenizer {
    hf: tokenizers::Tokenizer,
    fast: Option<FastEncoder>,
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer").field("fast_path", &self.fast.is_some()).finish()
    }
}

impl TextTokenizer {
    /// Load from the text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self, TokenizeError> {
        let hf = tokenizers::Tokenizer::from_str(json)
            .map_err(|e| TokenizeError::Load(format!("invalid tokenizer.json: {e}")))?;
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| TokenizeError::Load(format!("invalid tokenizer.json: {e}")))?;
        let fast = ByteLevelBpe::from_tokenizer_json(&doc)
            .map(FastEncoder::ByteLevel)
            .or_else(|| SentencePieceBpe::from_tokenizer_json(&doc).map(FastEncoder::SentencePiece));
        Ok(TextTokenizer { hf, fast })
    }

    /// Whether one of rollstream's encoders is in use (else the `tokenizers` crate).
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// Name of the encoder in use: `"byte-level-bpe"`, `"sentencepiece-bpe"` or `"tokenizers"`.
    pub fn encoder_name(&self) -> &'static str {
        match &self.fast {
            Some(FastEncoder::ByteLevel(_)) => "byte-level-bpe",
            Some(FastEncoder::SentencePiece(_)) => "sentencepiece-bpe",
            None => "tokenizers",
        }
    }

    /// Encode `text`; `add_special_tokens` applies the post-processor
    /// (e.g. a BOS), as `tokenizers`' `encode(text, add_special_tokens)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        match &self.fast {
            Some(fast) => {
                let mut out = Vec::with_capacity(text.len() / 3 + 4);
                fast.encode(text, add_special_tokens, &mut out);
                Ok(out)
            }
            None => self.encode_reference(text, add_special_tokens),
        }
    }

    /// Encode with the `tokenizers` crate regardless of the fast path (the
    /// parity oracle).
    pub fn encode_reference(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        self.hf
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Encode(format!("encoding failed: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizeError> {
        self.hf.decode(ids, skip_special_tokens).map_err(|e| TokenizeError::Encode(format!("decoding failed: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.hf.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.hf.get_vocab_size(true)
    }
}

/// Roles accepted by default; anything else is most likely a typo that a
/// permissive template would silently render into a wrong prompt.
pub const DEFAULT_ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool", "function", "ipython"];

/// One conversation to render, with transformers' `apply_chat_template`
/// arguments.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Value,
    pub tools: Option<Value>,
    pub documents: Option<Value>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// Extra template variables (`enable_thinking`, ...).
    pub kwargs: Vec<(String, Value)>,
}

/// A tokenizer plus its chat template and special-token strings.
pub struct ChatTokenizer {
    pub text: TextTokenizer,
    template: Option<ChatTemplate>,
    /// `bos_token`, `eos_token`, ... as template variables.
    special_vars: Vec<(String, Value)>,
    roles: Vec<String>,
}

impl fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("text", &self.text)
            .field("has_template", &self.template.is_some())
            .finish()
    }
}

fn validate_messages(messages: &Value, roles: &[String]) -> Result<(), TokenizeError> {
    if !matches!(messages.kind(), ValueKind::Seq) {
        return Err(TokenizeError::Input(format!("messages must be a list of dicts, got {}", messages.kind())));
    }
    for (i, m) in messages.try_iter().map_err(|e| TokenizeError::Input(e.to_string()))?.enumerate() {
        if m.kind() != ValueKind::Map {
            return Err(TokenizeError::Input(format!("messages[{i}] must be a dict, got {}", m.kind())));
        }
        let role = m.get_attr("role").unwrap_or_default();
        let Some(role) = role.as_str() else {
            return Err(TokenizeError::Input(format!("messages[{i}] needs a string 'role', got {}", role.kind())));
        };
        if !roles.iter().any(|r| r == role) {
            return Err(TokenizeError::Input(format!(
                "messages[{i}] has unknown role '{role}' (expected one of {}; pass extra_roles to allow it)",
                roles.join(", ")
            )));
        }
        let content = m.get_attr("content").unwrap_or_default();
        match content.kind() {
            ValueKind::String | ValueKind::None | ValueKind::Undefined => {}
            ValueKind::Seq => {
                for (j, part) in content.try_iter().map_err(|e| TokenizeError::Input(e.to_string()))?.enumerate() {
                    if part.kind() != ValueKind::Map {
                        return Err(TokenizeError::Input(format!(
                            "messages[{i}]['content'][{j}] must be a dict part like {{'type': 'text', 'text': ...}}, got {}",
                            part.kind()
                        )));
                    }
                }
            }
            other => {
                return Err(TokenizeError::Input(format!(
                    "messages[{i}]['content'] must be a string, a list of parts or None, got {other}"
                )))
            }
        }
    }
    Ok(())
}

/// The text of the final message, for `continue_final_message`.
fn final_message_text(messages: &Value) -> Result<String, TokenizeError> {
    let last = messages
        .try_iter()
        .ok()
        .and_then(|it| it.last())
        .ok_or_else(|| TokenizeError::Input("continue_final_message needs at least one message".into()))?;
    let content = last.get_attr("content").unwrap_or_default();
    if let Some(s) = content.as_str() {
        return Ok(s.to_string());
    }
    if content.kind() == ValueKind::Seq {
        if let Ok(parts) = content.try_iter() {
            let parts: Vec<Value> = parts.collect();
            for part in parts.iter().rev() {
                if let Some(t) = part.get_attr("text").ok().and_then(|t| t.as_str().map(str::to_string)) {
                    return Ok(t);
                }
            }
        }
    }
    Err(TokenizeError::Input(
        "continue_final_message is set but the final message has no text content to continue".into(),
    ))
}

impl ChatTokenizer {
    pub fn new(
        text: TextTokenizer,
        template: Option<ChatTemplate>,
        special_vars: Vec<(String, Value)>,
        extra_roles: &[String],
    ) -> Self {
        let mut roles: Vec<String> = DEFAULT_ROLES.iter().map(|r| r.to_string()).collect();
        roles.extend(extra_roles.iter().cloned());
        ChatTokenizer { text, template, special_vars, roles }
    }

    /// Render one conversation to text, as transformers would.
    pub fn render(&self, req: &ChatRequest) -> Result<String, TokenizeError> {
        let template = self.template.as_ref().ok_or_else(|| {
            TokenizeError::Input("this tokenizer has no chat template (pass chat_template=...)".into())
        })?;
        if req.continue_final_message && req.add_generation_prompt {
            return Err(TokenizeError::Input(
                "continue_final_message and add_generation_prompt are not compatible: use continue_final_message \
                 to continue the last message, add_generation_prompt to start a new assistant message"
                    .into(),
            ));
        }
        validate_messages(&req.messages, &self.roles)?;
        let mut ctx: Vec<(String, Value)> = Vec::with_capacity(self.special_vars.len() + req.kwargs.len() + 4);
        ctx.push(("messages".into(), req.messages.clone()));
        ctx.push(("tools".into(), req.tools.clone().unwrap_or(Value::from(()))));
        ctx.push(("documents".into(), req.documents.clone().unwrap_or(Value::from(()))));
        ctx.push(("add_generation_prompt".into(), Value::from(req.add_generation_prompt)));
        // transformers: {**special_tokens_map, **kwargs}; user kwargs win.
        ctx.extend(self.special_vars.iter().cloned());
        ctx.extend(req.kwargs.iter().cloned());
        let ctx = Value::from_pairs(ctx);
        let mut text = template.render(&ctx).map_err(TokenizeError::Template)?;
        if req.continue_final_message {
            let last = final_message_text(&req.messages)?;
            let needle = last.trim();
            match text.rfind(needle) {
                Some(pos) if !needle.is_empty() => text.truncate(pos + needle.len()),
                _ => {
                    return Err(TokenizeError::Input(
                        "continue_final_message is set but the final message does not appear in the rendered chat"
                            .into(),
                    ))
                }
            }
        }
        Ok(text)
    }

    /// Render and encode one conversation (no extra special tokens: the
    /// template carries them, as with transformers).
    pub fn apply(&self, req: &ChatRequest) -> Result<Vec<u32>, TokenizeError> {
        let text = self.render(req)?;
        self.text.encode(&text, false)
    }

    /// [`apply`](Self::apply) on many conversations, on all cores.
    pub fn apply_batch(&self, reqs: &[ChatRequest]) -> Vec<Result<Vec<u32>, TokenizeError>> {
        reqs.par_iter().map(|r| self.apply(r)).collect()
    }
}
