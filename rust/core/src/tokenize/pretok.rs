//! Pre-tokenization by regex split (HF `Split(pattern, Isolated)` and
//! `ByteLevel(use_regex=true)`), on the `regex` crate's automata instead of a
//! backtracking engine.
//!
//! Byte-level BPE vocabularies (GPT-2, cl100k/Llama 3, Qwen, DeepSeek) end
//! their patterns with `\s+(?!\S)|\s+`, the only lookaround they use. We match
//! `P|\s+` instead and restore the lookahead's effect exactly: when the match
//! came from the whitespace alternative (P does not match at that position),
//! a run of two or more whitespace characters followed by a non-space gives
//! back its last character, which then starts the next piece. That is what
//! backtracking into `\s+(?!\S)` produces.

use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};

/// GPT-2's pattern, used by `ByteLevel(use_regex=true)`.
pub const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

const LOOKAHEAD_TAIL: &str = r"|\s+(?!\S)|\s+";

/// A compiled split pattern.
#[derive(Debug, Clone)]
pub struct SplitPattern {
    /// `P|\s+`, or the whole pattern when it has no lookahead tail.
    combined: Regex,
    /// `P` alone (searched anchored), to tell which alternative produced a
    /// whitespace match.
    head: Option<Regex>,
}

impl SplitPattern {
    /// Compile `pattern`; None when it uses features this fast path does not
    /// reproduce exactly (other lookarounds, backreferences, ...).
    pub fn new(pattern: &str) -> Option<Self> {
        if let Some(head) = pattern.strip_suffix(LOOKAHEAD_TAIL) {
            let combined = Regex::new(&format!("{head}|\\s+")).ok()?;
            let head = Regex::new(head).ok()?;
            Some(SplitPattern { combined, head: Some(head) })
        } else {
            Regex::new(pattern).ok().map(|combined| SplitPattern { combined, head: None })
        }
    }

    /// Call `f` with each piece of `text` in order: matches and the gaps
    /// between them (HF's `Isolated` behaviour). Pieces are never empty.
    pub fn split<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        let mut pos = 0;
        while pos < text.len() {
            // Pieces are usually contiguous: an anchored search needs one
            // forward pass; fall back to a search for the next match.
            let anchored = Input::new(text).range(pos..).anchored(Anchored::Yes);
            let found =
                self.combined.search(&anchored).or_else(|| self.combined.search(&Input::new(text).range(pos..)));
            let Some(m) = found else { break };
            let (start, mut end) = (m.start(), m.end());
            if start > pos {
                f(&text[pos..start]);
            }
            if end == start {
                // Empty match: advance one character so the loop progresses.
                let step = text[start..].chars().next().map_or(1, char::len_utf8);
                f(&text[start..start + step]);
                pos = start + step;
                continue;
            }
            if let Some(head) = &self.head {
                let piece = &text[start..end];
                if end < text.len()
                    && piece.chars().all(char::is_whitespace)
                    && !head.is_match(Input::new(text).range(start..).anchored(Anchored::Yes))
                {
                    // From `\s+`: emulate `\s+(?!\S)` backtracking.
                    let mut chars = piece.char_indices();
                    if let (Some(_), Some((last, _))) = (chars.next(), chars.next_back()) {
                        end = start + last;
                    }
                }
            }
            f(&text[start..end]);
            pos = end;
        }
        if pos < text.len() {
            f(&text[pos..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    fn pieces(p: &SplitPattern, text: &str) -> Vec<String> {
        let mut out = vec![];
        p.split(text, |s| out.push(s.to_string()));
        out
    }

    #[test]
    fn whitespace_lookahead_is_emulated() {
        let p = SplitPattern::new(QWEN).unwrap();
        assert_eq!(pieces(&p, "a   b"), ["a", "  ", " b"]);
        assert_eq!(pieces(&p, "a b"), ["a", " b"]);
        assert_eq!(pieces(&p, "a  "), ["a", "  "]);
        assert_eq!(pieces(&p, "  \n  x"), ["  \n", " ", " x"]);
        assert_eq!(pieces(&p, "x \t!"), ["x", " ", "\t", "!"]);
        assert_eq!(pieces(&p, "It's 2024!!\n\n"), ["It", "'s", " ", "2", "0", "2", "4", "!!\n\n"]);
    }

    #[test]
    fn gpt2_pattern() {
        let p = SplitPattern::new(GPT2_PATTERN).unwrap();
        assert_eq!(pieces(&p, "Hello  world\n\n x"), ["Hello", " ", " world", "\n\n", " x"]);
    }

    #[test]
    fn unsupported_patterns_are_refused() {
        assert!(SplitPattern::new(r"(?<=a)b").is_none());
        assert!(SplitPattern::new(r"a(?!b)").is_none());
    }
}
