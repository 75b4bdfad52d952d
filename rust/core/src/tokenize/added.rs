//! Splitting text on added tokens, with the semantics of HF `tokenizers`'
//! `AddedVocabulary`: leftmost-longest matching, then `single_word`, `lstrip`
//! and `rstrip` adjustments; tokens with `normalized: false` are matched on
//! the raw text, the others on the normalized remainder.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// An entry of `added_tokens` in tokenizer.json.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AddedToken {
    pub id: u32,
    pub content: String,
    #[serde(default)]
    pub single_word: bool,
    #[serde(default)]
    pub lstrip: bool,
    #[serde(default)]
    pub rstrip: bool,
    #[serde(default = "yes")]
    pub normalized: bool,
    #[serde(default)]
    pub special: bool,
}

fn yes() -> bool {
    true
}

/// One piece of a split: plain text, or an added token's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'t> {
    Text(&'t str),
    Token(u32),
}

/// A set of added tokens matched together (the raw or the normalized set).
#[derive(Debug, Clone)]
pub struct AddedMatcher {
    ac: Option<AhoCorasick>,
    tokens: Vec<AddedToken>,
}

/// `\w` of the regex crate (Unicode), which HF uses for `single_word`.
fn is_word_char(c: char) -> bool {
    use std::sync::LazyLock;
    // A constant pattern (exercised by every test that tokenizes): it cannot fail on input.
    #[allow(clippy::expect_used)]
    static W: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"^\w$").expect("valid regex"));
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    let mut buf = [0u8; 4];
    W.is_match(c.encode_utf8(&mut buf))
}

impl AddedMatcher {
    pub fn new(tokens: Vec<AddedToken>) -> Result<Self, String> {
        if tokens.is_empty() {
            return Ok(AddedMatcher { ac: None, tokens });
        }
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|t| t.content.as_str()))
            .map_err(|e| format!("cannot index added tokens: {e}"))?;
        Ok(AddedMatcher { ac: Some(ac), tokens })
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Split `text` into added tokens and the text between them.
    pub fn split<'t>(&self, text: &'t str, mut f: impl FnMut(Piece<'t>)) {
        let Some(ac) = &self.ac else {
            if !text.is_empty() {
                f(Piece::Text(text));
            }
            return;
        };
        let mut start_offset = 0;
        for m in ac.find_iter(text) {
            let tok = &self.tokens[m.pattern().as_usize()];
            let (mut start, mut stop) = (m.start(), m.end());
            if tok.single_word {
                let start_space = start == 0 || !text[..start].chars().next_back().is_some_and(is_word_char);
                let stop_space = stop == text.len() || !text[stop..].chars().next().is_some_and(is_word_char);
                if !start_space || !stop_space {
                    continue;
                }
            }
            if tok.lstrip {
                let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
                start = trimmed.max(start_offset);
            }
            if tok.rstrip {
                stop += text[stop..].len() - text[stop..].trim_start_matches(char::is_whitespace).len();
            }
            if start_offset < start {
                f(Piece::Text(&text[start_offset..start]));
            }
            f(Piece::Token(tok.id));
            start_offset = stop;
        }
        if start_offset < text.len() {
            f(Piece::Text(&text[start_offset..]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(id: u32, content: &str) -> AddedToken {
        AddedToken {
            id,
            content: content.into(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
        }
    }

    fn split(m: &AddedMatcher, text: &str) -> Vec<String> {
        let mut out = vec![];
        m.split(text, |p| {
            out.push(match p {
                Piece::Text(t) => format!("T({t})"),
                Piece::Token(i) => format!("#{i}"),
            })
        });
        out
    }

    #[test]
    fn leftmost_longest_and_strip() {
        let mut end = tok(3, "<|end|>");
        end.rstrip = true;
        let m = AddedMatcher::new(vec![tok(1, "<|a|>"), tok(2, "<|a|>b"), end]).unwrap();
        assert_eq!(split(&m, "x<|a|>by<|a|>"), ["T(x)", "#2", "T(y)", "#1"]);
        assert_eq!(split(&m, "hi<|end|>\n  there"), ["T(hi)", "#3", "T(there)"]);
    }

    #[test]
    fn single_word_and_lstrip() {
        let mut w = tok(5, "yes");
        w.single_word = true;
        let mut l = tok(6, "<s>");
        l.lstrip = true;
        let m = AddedMatcher::new(vec![w, l]).unwrap();
        assert_eq!(split(&m, "yes eyes"), ["#5", "T( eyes)"]);
        assert_eq!(split(&m, "a   <s>b"), ["T(a)", "#6", "T(b)"]);
    }
}
