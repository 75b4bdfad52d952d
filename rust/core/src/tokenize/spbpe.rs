//! Fast path for SentencePiece-style BPE (Llama 2, Mistral v0.1, Phi-3):
//! the "legacy" `tokenizer.json` shape with normalizer
//! `Sequence[Prepend("▁"), Replace(" ", "▁")]`, no pre-tokenizer and
//! `byte_fallback`.
//!
//! `tokenizers` merges each normalized piece as one word, thousands of
//! characters long. When no vocabulary entry has a '▁' after a non-'▁'
//! character (checked at load), no merge can cross the start of a '▁' run,
//! so the word splits there into independent segments whose merges never
//! interact: the concatenated result is identical, and segments (words) can
//! be memoized.

use rustc_hash::FxHashMap;
use serde_json::Value;

use super::added::{AddedMatcher, AddedToken, Piece};
use super::bpe::{is_empty_or_null, post_processor, str_field, MergeScratch, MergeTable};

const SPACE: char = '\u{2581}';

#[derive(Debug, Clone)]
pub struct SentencePieceBpe {
    char_ids: FxHashMap<char, u32>,
    byte_tokens: [u32; 256],
    table: MergeTable,
    added: AddedMatcher,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

fn legacy_normalizer(n: &Value) -> bool {
    if str_field(n, "type") != Some("Sequence") {
        return false;
    }
    let Some(list) = n.get("normalizers").and_then(Value::as_array) else { return false };
    match list.as_slice() {
        [prepend, replace] => {
            str_field(prepend, "type") == Some("Prepend")
                && str_field(prepend, "prepend") == Some("\u{2581}")
                && str_field(replace, "type") == Some("Replace")
                && replace.get("pattern").and_then(|p| str_field(p, "String")) == Some(" ")
                && str_field(replace, "content") == Some("\u{2581}")
        }
        _ => false,
    }
}

impl SentencePieceBpe {
    pub fn from_tokenizer_json(doc: &Value) -> Option<Self> {
        let model = doc.get("model")?;
        if str_field(model, "type") != Some("BPE")
            || model.get("byte_fallback").and_then(Value::as_bool) != Some(true)
            || model.get("ignore_merges").and_then(Value::as_bool) == Some(true)
            || !model.get("dropout").is_none_or(Value::is_null)
            || !is_empty_or_null(model.get("continuing_subword_prefix"))
            || !is_empty_or_null(model.get("end_of_word_suffix"))
            || !legacy_normalizer(doc.get("normalizer")?)
            || !doc.get("pre_tokenizer").is_none_or(Value::is_null)
        {
            return None;
        }
        let (prefix, suffix) = post_processor(doc.get("post_processor"))?;
        let mut by_token: FxHashMap<&str, u32> = FxHashMap::default();
        let mut char_ids = FxHashMap::default();
        for (tok, id) in model.get("vocab")?.as_object()? {
            let id = u32::try_from(id.as_u64()?).ok()?;
            // The segmentation invariant: '▁' only in a leading run.
            let body = tok.trim_start_matches(SPACE);
            if body.contains(SPACE) {
                return None;
            }
            let mut chars = tok.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                char_ids.insert(c, id);
            }
            by_token.insert(tok.as_str(), id);
        }
        let mut byte_tokens = [0u32; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = *by_token.get(format!("<0x{b:02X}>").as_str())?;
        }
        let table = MergeTable::from_model(model, &by_token)?;
        let mut added = vec![];
        if let Some(list) = doc.get("added_tokens").and_then(Value::as_array) {
            for t in list {
                let tok: AddedToken = serde_json::from_value(t.clone()).ok()?;
                if tok.normalized {
                    // Matching on the normalized text is not reproduced here.
                    return None;
                }
                added.push(tok);
            }
        }
        Some(SentencePieceBpe { char_ids, byte_tokens, table, added: AddedMatcher::new(added).ok()?, prefix, suffix })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool, out: &mut Vec<u32>) {
        if add_special_tokens {
            out.extend_from_slice(&self.prefix);
        }
        let mut scratch = MergeScratch::default();
        let mut normalized = String::new();
        self.added.split(text, |piece| match piece {
            Piece::Token(id) => out.push(id),
            Piece::Text(t) => {
                normalized.clear();
                normalized.push(SPACE);
                for c in t.chars() {
                    normalized.push(if c == ' ' { SPACE } else { c });
                }
                self.encode_word(&normalized, out, &mut scratch);
            }
        });
        if add_special_tokens {
            out.extend_from_slice(&self.suffix);
        }
    }

    fn encode_word(&self, word: &str, out: &mut Vec<u32>, scratch: &mut MergeScratch) {
        let mut seg_start = 0;
        let mut prev_space = false;
        for (i, c) in word.char_indices() {
            let space = c == SPACE;
            if space && !prev_space && i > seg_start {
                self.encode_segment(&word[seg_start..i], out, scratch);
                seg_start = i;
            }
            prev_space = space;
        }
        if seg_start < word.len() {
            self.encode_segment(&word[seg_start..], out, scratch);
        }
    }

    fn encode_segment(&self, seg: &str, out: &mut Vec<u32>, scratch: &mut MergeScratch) {
        self.table.cached(seg.as_bytes(), out, scratch, |sym| {
            for c in seg.chars() {
                match self.char_ids.get(&c) {
                    Some(&id) => sym.push(id),
                    None => {
                        let mut buf = [0u8; 4];
                        sym.extend(c.encode_utf8(&mut buf).bytes().map(|b| self.byte_tokens[usize::from(b)]));
                    }
                }
            }
        });
    }
}
