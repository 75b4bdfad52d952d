//! Fast path for byte-level BPE vocabularies (GPT-2, Llama 3, Qwen,
//! DeepSeek's Qwen distills, ...), built from the same `tokenizer.json` and
//! producing exactly the ids of HF `tokenizers` (proven by the parity tests).
//!
//! Pipeline, as in `tokenizers`: added tokens are split out (raw, then on
//! the normalized remainder), the rest is NFC-normalized when configured,
//! pre-tokenized by the split regex, mapped to bytes, and each piece is merged
//! by merge rank: repeatedly the adjacent pair with the lowest rank (leftmost
//! on ties) until none applies. The symbols form a linked list and the
//! candidate pairs a binary heap keyed by (rank, position), invalidated
//! lazily, so a piece of n bytes costs O(n log n) (a 100,000-letter word
//! used to go through O(n^2) `Vec::remove`s and scans).

use std::borrow::Cow;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;
use serde_json::Value;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use super::added::{AddedMatcher, AddedToken, Piece};
use super::pretok::{SplitPattern, GPT2_PATTERN};

const NO_MERGE: u32 = u32::MAX;

/// Pieces up to this many bytes are memoized (longer ones are rare and
/// would mostly evict useful entries).
const CACHE_MAX_PIECE: usize = 48;
/// Entries per thread before the memo is reset.
const CACHE_CAPACITY: usize = 1 << 17;

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

type PieceCache = FxHashMap<Box<[u8]>, Box<[u32]>>;

thread_local! {
    /// Per-thread memo of piece -> ids, tagged with the tokenizer it belongs
    /// to (natural text repeats its words; the merge loop runs once each).
    static PIECE_CACHE: RefCell<(u64, PieceCache)> = RefCell::new((0, FxHashMap::default()));
}

/// Merge ranks of a BPE model and the merge loop over them, with a
/// per-thread memo of piece -> ids.
#[derive(Debug, Clone)]
pub(crate) struct MergeTable {
    /// Identifies this vocabulary in the per-thread piece cache.
    instance: u64,
    /// `(left << 32) | right` -> `(rank, merged id)`.
    merges: FxHashMap<u64, (u32, u32)>,
}

/// No neighbour (the ends of the symbol list).
const NONE: usize = usize::MAX;

/// One symbol of a piece being merged, in a doubly linked list over the
/// piece's initial symbols. `rank`/`merged` describe the pair this symbol
/// starts with its `next`; `rank` is [`NO_MERGE`] when there is none, and
/// for symbols merged away into their left neighbour.
#[derive(Debug, Clone, Copy)]
struct Sym {
    id: u32,
    prev: usize,
    next: usize,
    rank: u32,
    merged: u32,
}

/// The merge loop's buffers, reused across pieces.
#[derive(Debug, Default)]
pub(crate) struct MergeScratch {
    syms: Vec<Sym>,
    /// Candidate merges `(rank, position of the left symbol)`, lowest first.
    /// Entries are never removed when a merge changes a pair: an entry is
    /// acted on only if its symbol still starts a pair of that rank.
    heap: BinaryHeap<Reverse<(u32, usize)>>,
}

impl MergeTable {
    pub(crate) fn from_model(model: &Value, by_token: &FxHashMap<&str, u32>) -> Option<Self> {
        let mut merges = FxHashMap::default();
        for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => s.split_once(' ')?,
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(a), Value::String(b)] => (a.as_str(), b.as_str()),
                    _ => return None,
                },
                _ => return None,
            };
            let (ia, ib) = (*by_token.get(a)?, *by_token.get(b)?);
            let merged = *by_token.get(format!("{a}{b}").as_str())?;
            let key = (u64::from(ia) << 32) | u64::from(ib);
            // A repeated pair keeps its last rank, as `tokenizers` (collecting into a map) does.
            merges.insert(key, (rank as u32, merged));
        }
        Some(MergeTable { instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed), merges })
    }

    #[inline]
    fn pair(&self, a: u32, b: u32) -> (u32, u32) {
        self.merges.get(&((u64::from(a) << 32) | u64::from(b))).copied().unwrap_or((NO_MERGE, 0))
    }

    /// Ids of a piece (`key` are its bytes): from the memo, or by merging
    /// the symbols `init` pushes.
    pub(crate) fn cached(
        &self,
        key: &[u8],
        out: &mut Vec<u32>,
        scratch: &mut MergeScratch,
        init: impl FnOnce(&mut Vec<u32>),
    ) {
        if key.len() > CACHE_MAX_PIECE {
            let start = out.len();
            init(out);
            self.merge_tail(out, start, scratch);
            return;
        }
        PIECE_CACHE.with(|cell| {
            let mut guard = cell.borrow_mut();
            let (owner, cache) = &mut *guard;
            if *owner != self.instance {
                *owner = self.instance;
                cache.clear();
            }
            if let Some(ids) = cache.get(key) {
                out.extend_from_slice(ids);
                return;
            }
            let start = out.len();
            init(out);
            self.merge_tail(out, start, scratch);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(key.into(), out[start..].into());
        });
    }

    /// Merge the symbols `out[start..]` in place: repeatedly the adjacent
    /// pair of lowest rank, leftmost on ties, as `tokenizers` does.
    ///
    /// Invariants: the heap holds an entry `(r, i)` for every live symbol
    /// `i` whose pair with its next symbol has rank `r` (and maybe stale
    /// entries); a popped entry is stale unless `syms[i].rank == r`. A stale
    /// entry whose key equals a live pair's is that pair's own key, so acting
    /// on it is the same merge. Positions are the symbols' initial indices,
    /// so list order, and "leftmost", is index order. Symbol 0 is never
    /// merged away (merges remove the right symbol).
    fn merge_tail(&self, out: &mut Vec<u32>, start: usize, scratch: &mut MergeScratch) {
        let n = out.len() - start;
        if n < 2 {
            return;
        }
        let MergeScratch { syms, heap } = scratch;
        syms.clear();
        heap.clear();
        syms.extend(out[start..].iter().enumerate().map(|(i, &id)| Sym {
            id,
            prev: i.checked_sub(1).unwrap_or(NONE),
            next: if i + 1 < n { i + 1 } else { NONE },
            rank: NO_MERGE,
            merged: 0,
        }));
        for i in 0..n - 1 {
            self.link(syms, heap, i, i + 1);
        }
        while let Some(Reverse((rank, at))) = heap.pop() {
            let sym = syms[at];
            if sym.rank != rank {
                continue;
            }
            let gone = sym.next;
            let after = syms[gone].next;
            syms[gone].rank = NO_MERGE;
            syms[at].id = sym.merged;
            syms[at].next = after;
            if after == NONE {
                syms[at].rank = NO_MERGE;
            } else {
                syms[after].prev = at;
                self.link(syms, heap, at, after);
            }
            if sym.prev != NONE {
                self.link(syms, heap, sym.prev, at);
            }
        }
        out.truncate(start);
        let mut i = 0;
        while i != NONE {
            out.push(syms[i].id);
            i = syms[i].next;
        }
    }

    /// Record the pair `left`,`right` (adjacent symbols) and queue it when a
    /// merge applies.
    #[inline]
    fn link(&self, syms: &mut [Sym], heap: &mut BinaryHeap<Reverse<(u32, usize)>>, left: usize, right: usize) {
        let (rank, merged) = self.pair(syms[left].id, syms[right].id);
        syms[left].rank = rank;
        syms[left].merged = merged;
        if rank != NO_MERGE {
            heap.push(Reverse((rank, left)));
        }
    }
}

/// GPT-2's byte -> printable character map (inverse used to read the vocab).
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        map[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    map
}

fn decode_byte_level(token: &str, inverse: &FxHashMap<char, u8>) -> Option<Vec<u8>> {
    token.chars().map(|c| inverse.get(&c).copied()).collect()
}

/// The byte-level BPE fast path. Built only for configurations it reproduces
/// exactly; [`ByteLevelBpe::from_tokenizer_json`] returns None otherwise.
#[derive(Debug, Clone)]
pub struct ByteLevelBpe {
    vocab: FxHashMap<Vec<u8>, u32>,
    byte_ids: [u32; 256],
    table: MergeTable,
    ignore_merges: bool,
    split: SplitPattern,
    nfc: bool,
    added_raw: AddedMatcher,
    added_normalized: AddedMatcher,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

pub(crate) fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

pub(crate) fn is_empty_or_null(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

/// The split pattern of a supported pre-tokenizer configuration.
fn split_pattern(pre: &Value) -> Option<SplitPattern> {
    let byte_level_plain = |v: &Value| {
        str_field(v, "type") == Some("ByteLevel")
            && v.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
            && v.get("use_regex").and_then(Value::as_bool) == Some(false)
    };
    match str_field(pre, "type")? {
        "ByteLevel" => {
            let prefix_space = pre.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(true);
            let use_regex = pre.get("use_regex").and_then(Value::as_bool).unwrap_or(true);
            (!prefix_space && use_regex).then(|| SplitPattern::new(GPT2_PATTERN)).flatten()
        }
        "Sequence" => {
            let list = pre.get("pretokenizers")?.as_array()?;
            let [split, byte_level] = list.as_slice() else { return None };
            if str_field(split, "type") != Some("Split")
                || str_field(split, "behavior") != Some("Isolated")
                || split.get("invert").and_then(Value::as_bool) != Some(false)
                || !byte_level_plain(byte_level)
            {
                return None;
            }
            let pattern = split.get("pattern")?;
            if let Some(re) = str_field(pattern, "Regex") {
                SplitPattern::new(re)
            } else {
                SplitPattern::new(&regex::escape(str_field(pattern, "String")?))
            }
        }
        _ => None,
    }
}

/// Special-token ids the post-processor adds around a single sequence.
pub(crate) fn post_processor(post: Option<&Value>) -> Option<(Vec<u32>, Vec<u32>)> {
    let Some(post) = post.filter(|p| !p.is_null()) else {
        return Some((vec![], vec![]));
    };
    match str_field(post, "type")? {
        "ByteLevel" => Some((vec![], vec![])),
        "Sequence" => {
            let mut out = (vec![], vec![]);
            for p in post.get("processors")?.as_array()? {
                let (pre, suf) = post_processor(Some(p))?;
                out.0.extend(pre);
                out.1.extend(suf);
            }
            Some(out)
        }
        "TemplateProcessing" => {
            let specials = post.get("special_tokens")?;
            let mut prefix = vec![];
            let mut suffix = vec![];
            let mut seen_a = false;
            for item in post.get("single")?.as_array()? {
                if let Some(seq) = item.get("Sequence") {
                    if str_field(seq, "id") != Some("A") || seen_a {
                        return None;
                    }
                    seen_a = true;
                } else if let Some(sp) = item.get("SpecialToken") {
                    let name = str_field(sp, "id")?;
                    let ids = specials.get(name)?.get("ids")?.as_array()?;
                    let ids: Option<Vec<u32>> =
                        ids.iter().map(|i| i.as_u64().and_then(|x| u32::try_from(x).ok())).collect();
                    if seen_a { &mut suffix } else { &mut prefix }.extend(ids?);
                } else {
                    return None;
                }
            }
            seen_a.then_some((prefix, suffix))
        }
        _ => None,
    }
}

fn nfc(text: &str) -> Cow<'_, str> {
    if text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.nfc().collect())
    }
}

impl ByteLevelBpe {
    /// Build the fast path from a parsed `tokenizer.json`, or None when the
    /// configuration is outside what it reproduces exactly.
    pub fn from_tokenizer_json(doc: &Value) -> Option<Self> {
        let model = doc.get("model")?;
        if str_field(model, "type") != Some("BPE")
            || model.get("byte_fallback").and_then(Value::as_bool) == Some(true)
            || !model.get("dropout").is_none_or(Value::is_null)
            || !is_empty_or_null(model.get("continuing_subword_prefix"))
            || !is_empty_or_null(model.get("end_of_word_suffix"))
        {
            return None;
        }
        let nfc = match doc.get("normalizer") {
            None | Some(Value::Null) => false,
            Some(n) if str_field(n, "type") == Some("NFC") => true,
            Some(_) => return None,
        };
        let split = split_pattern(doc.get("pre_tokenizer")?)?;
        let (prefix, suffix) = post_processor(doc.get("post_processor"))?;

        let b2c = byte_to_char();
        let inverse: FxHashMap<char, u8> = b2c.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let mut vocab = FxHashMap::default();
        let mut by_token: FxHashMap<&str, u32> = FxHashMap::default();
        for (tok, id) in model.get("vocab")?.as_object()? {
            let id = u32::try_from(id.as_u64()?).ok()?;
            vocab.insert(decode_byte_level(tok, &inverse)?, id);
            by_token.insert(tok.as_str(), id);
        }
        let mut byte_ids = [NO_MERGE; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *vocab.get(&vec![b as u8])?;
        }
        let table = MergeTable::from_model(model, &by_token)?;
        let ignore_merges = model.get("ignore_merges").and_then(Value::as_bool).unwrap_or(false);

        let mut raw = vec![];
        let mut normalized = vec![];
        if let Some(list) = doc.get("added_tokens").and_then(Value::as_array) {
            for t in list {
                let mut tok: AddedToken = serde_json::from_value(t.clone()).ok()?;
                if tok.normalized {
                    if nfc {
                        tok.content = nfc_owned(&tok.content);
                    }
                    normalized.push(tok);
                } else {
                    raw.push(tok);
                }
            }
        }
        Some(ByteLevelBpe {
            vocab,
            byte_ids,
            table,
            ignore_merges,
            split,
            nfc,
            added_raw: AddedMatcher::new(raw).ok()?,
            added_normalized: AddedMatcher::new(normalized).ok()?,
            prefix,
            suffix,
        })
    }

    /// Append the ids of `text` to `out`.
    pub fn encode(&self, text: &str, add_special_tokens: bool, out: &mut Vec<u32>) {
        if add_special_tokens {
            out.extend_from_slice(&self.prefix);
        }
        let mut scratch = MergeScratch::default();
        let table = &self.table;
        let byte_ids = &self.byte_ids;
        self.added_raw.split(text, |piece| match piece {
            Piece::Token(id) => out.push(id),
            Piece::Text(t) => {
                let norm = if self.nfc { nfc(t) } else { Cow::Borrowed(t) };
                self.added_normalized.split(&norm, |p| match p {
                    Piece::Token(id) => out.push(id),
                    Piece::Text(t2) => self.split.split(t2, |w| {
                        let w = w.as_bytes();
                        if w.len() == 1 {
                            out.push(byte_ids[usize::from(w[0])]);
                        } else if let Some(id) = self.ignore_merges.then(|| self.vocab.get(w)).flatten() {
                            out.push(*id);
                        } else {
                            table.cached(w, out, &mut scratch, |sym| {
                                sym.extend(w.iter().map(|&b| byte_ids[usize::from(b)]));
                            });
                        }
                    }),
                });
            }
        });
        if add_special_tokens {
            out.extend_from_slice(&self.suffix);
        }
    }
}

fn nfc_owned(s: &str) -> String {
    nfc(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Value {
        let b2c = byte_to_char();
        let mut vocab = serde_json::Map::new();
        for (b, c) in b2c.iter().enumerate() {
            vocab.insert(c.to_string(), Value::from(b));
        }
        for (i, t) in ["ab", "abc", "Ġa", "bc"].iter().enumerate() {
            vocab.insert((*t).to_string(), Value::from(256 + i));
        }
        serde_json::json!({
            "added_tokens": [{"id": 300, "content": "<|x|>", "special": true, "normalized": false}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|x|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {"<|x|>": {"id": "<|x|>", "ids": [300], "tokens": ["<|x|>"]}}},
            "model": {"type": "BPE", "vocab": vocab, "merges": ["a b", "ab c", "Ġ a", "b c"]}
        })
    }

    #[test]
    fn merges_by_rank_and_added_tokens() {
        let bpe = ByteLevelBpe::from_tokenizer_json(&tiny()).unwrap();
        let mut out = vec![];
        bpe.encode("abc<|x|> abc", false, &mut out);
        // "abc": (a,b) rank 0 then (ab,c) rank 1; " abc": (a,b) beats (Ġ,a), so Ġ stays alone.
        assert_eq!(out, vec![257, 300, 32, 257]);
        out.clear();
        bpe.encode("bc", true, &mut out);
        assert_eq!(out, vec![300, 259]);
    }

    #[test]
    fn unsupported_configurations_fall_back() {
        let mut doc = tiny();
        doc["model"]["byte_fallback"] = Value::Bool(true);
        assert!(ByteLevelBpe::from_tokenizer_json(&doc).is_none());
        let mut doc = tiny();
        doc["normalizer"] = serde_json::json!({"type": "Lowercase"});
        assert!(ByteLevelBpe::from_tokenizer_json(&doc).is_none());
    }

    /// A byte-level BPE `tokenizer.json` whose merges are random: each joins
    /// two existing tokens over a small alphabet (so long runs and ties are
    /// common), ranked in the order drawn.
    fn random_model(seed: u64, n_merges: usize) -> Value {
        let b2c = byte_to_char();
        let mut vocab = serde_json::Map::new();
        for (b, c) in b2c.iter().enumerate() {
            vocab.insert(c.to_string(), Value::from(b));
        }
        let mut tokens: Vec<String> = b"abcd ".iter().map(|&b| b2c[usize::from(b)].to_string()).collect();
        let mut merges = Vec::new();
        let mut state = seed | 1;
        let mut next = |m: usize| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as usize % m
        };
        while merges.len() < n_merges {
            let (a, b) = (tokens[next(tokens.len())].clone(), tokens[next(tokens.len())].clone());
            let joined = format!("{a}{b}");
            if vocab.contains_key(&joined) {
                if next(8) == 0 {
                    break; // the alphabet is exhausted for this seed
                }
                continue;
            }
            vocab.insert(joined.clone(), Value::from(vocab.len()));
            merges.push(Value::from(format!("{a} {b}")));
            tokens.push(joined);
        }
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges}
        })
    }

    fn both(doc: &Value, text: &str) -> (Vec<u32>, Vec<u32>) {
        let ours = ByteLevelBpe::from_tokenizer_json(doc).expect("a byte-level model");
        let reference =
            <tokenizers::Tokenizer as std::str::FromStr>::from_str(&doc.to_string()).expect("a valid tokenizer.json");
        let mut out = Vec::new();
        ours.encode(text, false, &mut out);
        (out, reference.encode_fast(text, false).expect("encodes").get_ids().to_vec())
    }

    #[test]
    fn a_100k_letter_word_merges_like_tokenizers() {
        let doc = random_model(7, 60);
        for text in ["a".repeat(100_000), "ab".repeat(50_000), "abcd".repeat(25_000)] {
            let (ours, reference) = both(&doc, &text);
            assert_eq!(ours, reference, "{}...", &text[..8]);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        #[test]
        fn merges_equal_the_tokenizers_crate(
            seed in proptest::prelude::any::<u64>(),
            n_merges in 1usize..80,
            runs in proptest::collection::vec((0usize..5, 1usize..200), 0..40),
        ) {
            let doc = random_model(seed, n_merges);
            let text: String = runs.iter().map(|&(c, k)| std::iter::repeat_n(char::from(b"abcd "[c]), k).collect::<String>()).collect();
            let (ours, reference) = both(&doc, &text);
            proptest::prop_assert_eq!(ours, reference);
        }
    }
}
