//! Parsing one SSE event's JSON. One event is parsed completely into
//! reusable scratch buffers (a choice's `index` may come after its data),
//! then applied by [`super::columns`]. In steady state this allocates
//! nothing per event.

use std::borrow::Cow;

use crate::json::{self, JsonError, Reader};

use super::types::{ServerError, StopReason, StringTable, Usage, WeightVersionSpan};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum LpKind {
    #[default]
    None,
    /// Completions: `token_logprobs` + `top_logprobs` (string-keyed maps).
    Legacy,
    /// Chat and generate: `content: [{token|token_id, logprob, rank, top_logprobs}]`.
    Content,
}

/// Logprobs of one choice in one event.
#[derive(Debug, Default)]
pub(super) struct LpDelta {
    pub(super) kind: LpKind,
    pub(super) lps: Vec<f64>,
    /// Per entry: the sampled token's id when the entry names it
    /// (`token_id`, or a `token_id:N` string), else -1.
    pub(super) entry_ids: Vec<i64>,
    pub(super) ranks: Vec<i64>,
    pub(super) has_ranks: bool,
    pub(super) has_top: bool,
    /// Candidate count per entry (0 for a `null` row).
    pub(super) top_rows: Vec<u32>,
    pub(super) top_ids: Vec<i64>,
    pub(super) top_strs: StringTable,
    pub(super) top_lps: Vec<f64>,
}

impl LpDelta {
    fn clear(&mut self) {
        self.kind = LpKind::None;
        self.lps.clear();
        self.entry_ids.clear();
        self.ranks.clear();
        self.has_ranks = false;
        self.has_top = false;
        self.top_rows.clear();
        self.top_ids.clear();
        self.top_strs.bytes.clear();
        self.top_strs.offsets.clear();
        self.top_lps.clear();
    }

    fn push_candidate(&mut self, token: Option<&str>, id: Option<u32>, lp: f64) {
        let id = id.map(i64::from).or_else(|| token.and_then(token_id_string));
        self.top_ids.push(id.unwrap_or(-1));
        self.top_strs.push(token.unwrap_or(""));
        self.top_lps.push(lp);
    }
}

/// Fields of one choice in one event.
#[derive(Debug, Default)]
pub(super) struct ChoiceDelta {
    pub(super) index: Option<u32>,
    pub(super) has_text: bool,
    pub(super) text: String,
    pub(super) has_reasoning: bool,
    pub(super) reasoning: String,
    pub(super) finish_reason: Option<String>,
    pub(super) stop_reason: Option<StopReason>,
    pub(super) has_prompt: bool,
    pub(super) prompt: Vec<u32>,
    pub(super) has_ids: bool,
    pub(super) ids: Vec<u32>,
    pub(super) lp: LpDelta,
    pub(super) routed_experts: Option<String>,
    pub(super) has_mask: bool,
    pub(super) mask_ids: Vec<i32>,
    pub(super) mask_lens: Vec<i64>,
    pub(super) weight_versions: Option<Vec<WeightVersionSpan>>,
}

impl ChoiceDelta {
    fn clear(&mut self) {
        self.index = None;
        self.has_text = false;
        self.text.clear();
        self.has_reasoning = false;
        self.reasoning.clear();
        self.finish_reason = None;
        self.stop_reason = None;
        self.has_prompt = false;
        self.prompt.clear();
        self.has_ids = false;
        self.ids.clear();
        self.lp.clear();
        self.routed_experts = None;
        self.has_mask = false;
        self.mask_ids.clear();
        self.mask_lens.clear();
        self.weight_versions = None;
    }
}

/// Chunk-level fields of one event (borrowed from the event data).
#[derive(Debug, Default)]
pub(super) struct ChunkFields<'a> {
    pub(super) id: Option<Cow<'a, str>>,
    pub(super) model: Option<Cow<'a, str>>,
    pub(super) usage: Option<Usage>,
    pub(super) metrics: Option<Vec<(String, f64)>>,
    pub(super) error: Option<ServerError>,
    /// Chat puts `prompt_token_ids` on the chunk, not on the choice.
    pub(super) has_prompt: bool,
    pub(super) n_choices: usize,
}

/// Reusable buffers for parsing events.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    pub(super) choices: Vec<ChoiceDelta>,
    pub(super) prompt: Vec<u32>,
    /// The last event's bytes up to the value of `choices`, when everything
    /// before it was inert (see [`parse_chunk`]).
    pub(super) prefix: Vec<u8>,
}

fn u32_array(r: &mut Reader<'_>, out: &mut Vec<u32>) -> json::Result<()> {
    r.array(|r| r.u32().map(|v| out.push(v)))
}

fn opt_string(r: &mut Reader<'_>) -> json::Result<Option<String>> {
    if r.null()? {
        Ok(None)
    } else {
        r.string().map(|s| Some(s.into_owned()))
    }
}

/// Append a string value unless it is null; returns whether one was present.
fn append_string(r: &mut Reader<'_>, out: &mut String) -> json::Result<bool> {
    if r.null()? {
        return Ok(false);
    }
    out.push_str(&r.string()?);
    Ok(true)
}

fn parse_candidate(r: &mut Reader<'_>, lp: &mut LpDelta) -> json::Result<()> {
    let mut token: Option<Cow<'_, str>> = None;
    let mut id = None;
    let mut value = f64::NAN;
    r.object(|r, k| {
        match k {
            b"token" => token = if r.null()? { None } else { Some(r.string()?) },
            b"token_id" => id = if r.null()? { None } else { Some(r.u32()?) },
            b"logprob" => value = r.f64_or_null()?,
            _ => r.skip()?,
        }
        Ok(())
    })?;
    lp.push_candidate(token.as_deref(), id, value);
    Ok(())
}

fn parse_content_entry(r: &mut Reader<'_>, lp: &mut LpDelta) -> json::Result<()> {
    let mut token: Option<Cow<'_, str>> = None;
    let mut id = None;
    let mut value = f64::NAN;
    let mut rank = None;
    let before = lp.top_lps.len();
    let mut has_top = false;
    r.object(|r, k| {
        match k {
            b"token" => token = if r.null()? { None } else { Some(r.string()?) },
            b"token_id" => id = if r.null()? { None } else { Some(r.u32()?) },
            b"logprob" => value = r.f64_or_null()?,
            b"rank" => rank = if r.null()? { None } else { Some(r.i64()?) },
            b"top_logprobs" => {
                // A repeated key replaces the earlier value, as in json.loads.
                truncate_candidates(lp, before);
                has_top = !r.null()?;
                if has_top {
                    r.array(|r| parse_candidate(r, lp))?;
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    let entry_id = id.map(i64::from).or_else(|| token.as_deref().and_then(token_id_string));
    lp.entry_ids.push(entry_id.unwrap_or(-1));
    lp.lps.push(value);
    lp.has_ranks |= rank.is_some();
    lp.ranks.push(rank.unwrap_or(-1));
    lp.has_top |= has_top;
    lp.top_rows.push((lp.top_lps.len() - before) as u32);
    Ok(())
}

fn truncate_candidates(lp: &mut LpDelta, n: usize) {
    lp.top_ids.truncate(n);
    lp.top_lps.truncate(n);
    if lp.top_strs.offsets.len() > n + 1 {
        lp.top_strs.offsets.truncate(n + 1);
        let end = lp.top_strs.offsets.last().map_or(0, |&e| e as usize);
        lp.top_strs.bytes.truncate(end);
    }
}

fn parse_logprobs(r: &mut Reader<'_>, lp: &mut LpDelta) -> json::Result<()> {
    lp.clear();
    if r.null()? {
        return Ok(());
    }
    let mut has_token_lps = false;
    let mut has_content = false;
    r.object(|r, k| {
        match k {
            b"token_logprobs" => {
                lp.lps.clear();
                has_token_lps = !r.null()?;
                if has_token_lps {
                    r.array(|r| r.f64_or_null().map(|v| lp.lps.push(v)))?;
                }
            }
            b"top_logprobs" => {
                lp.top_rows.clear();
                truncate_candidates(lp, 0);
                lp.has_top = !r.null()?;
                if lp.has_top {
                    r.array(|r| {
                        let before = lp.top_lps.len();
                        if !r.null()? {
                            r.object(|r, key| {
                                let v = r.f64_or_null()?;
                                let token = std::str::from_utf8(key)
                                    .map_err(|_| JsonError { pos: r.pos(), msg: "invalid UTF-8 in key".into() })?;
                                lp.push_candidate(Some(token), None, v);
                                Ok(())
                            })?;
                        }
                        lp.top_rows.push((lp.top_lps.len() - before) as u32);
                        Ok(())
                    })?;
                }
            }
            b"content" => {
                has_content = !r.null()?;
                if has_content {
                    let mut fresh = LpDelta::default();
                    std::mem::swap(&mut fresh, lp);
                    fresh.clear();
                    let res = r.array(|r| parse_content_entry(r, &mut fresh));
                    std::mem::swap(&mut fresh, lp);
                    res?;
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    lp.kind = if has_content {
        LpKind::Content
    } else if has_token_lps {
        LpKind::Legacy
    } else {
        LpKind::None
    };
    Ok(())
}

fn parse_choice(r: &mut Reader<'_>, c: &mut ChoiceDelta) -> json::Result<()> {
    c.clear();
    r.object(|r, k| {
        match k {
            b"index" => c.index = Some(r.u32()?),
            b"text" => {
                c.text.clear();
                c.has_text = append_string(r, &mut c.text)?;
            }
            b"delta" => {
                if !r.null()? {
                    r.object(|r, k| {
                        match k {
                            b"content" => c.has_text |= append_string(r, &mut c.text)?,
                            b"reasoning_content" | b"reasoning" => {
                                c.has_reasoning |= append_string(r, &mut c.reasoning)?
                            }
                            _ => r.skip()?,
                        }
                        Ok(())
                    })?;
                }
            }
            b"logprobs" => parse_logprobs(r, &mut c.lp)?,
            b"finish_reason" => c.finish_reason = opt_string(r)?,
            b"stop_reason" => {
                c.stop_reason = match r.peek() {
                    Some(b'"') => Some(StopReason::Text(r.string()?.into_owned())),
                    _ if r.null()? => None,
                    _ => Some(StopReason::Token(r.i64()?)),
                }
            }
            b"prompt_token_ids" => {
                c.prompt.clear();
                c.has_prompt = !r.null()?;
                if c.has_prompt {
                    u32_array(r, &mut c.prompt)?;
                }
            }
            b"token_ids" => {
                c.ids.clear();
                c.has_ids = !r.null()?;
                if c.has_ids {
                    u32_array(r, &mut c.ids)?;
                }
            }
            b"routed_experts" => c.routed_experts = opt_string(r)?,
            b"sampling_mask" => {
                c.mask_ids.clear();
                c.mask_lens.clear();
                c.has_mask = !r.null()?;
                if c.has_mask {
                    r.array(|r| {
                        let before = c.mask_ids.len();
                        r.array(|r| {
                            let pos = r.pos();
                            let id = r.u32()?;
                            let id = i32::try_from(id).map_err(|_| JsonError {
                                pos,
                                msg: format!("mask token id {id} out of range").into(),
                            })?;
                            c.mask_ids.push(id);
                            Ok(())
                        })?;
                        c.mask_lens.push((c.mask_ids.len() - before) as i64);
                        Ok(())
                    })?;
                }
            }
            b"weight_versions" => {
                c.weight_versions = if r.null()? {
                    None
                } else {
                    let mut spans = Vec::new();
                    r.array(|r| {
                        let (mut version, mut start, mut end) = (None, None, None);
                        r.object(|r, k| {
                            match k {
                                b"version" => version = Some(r.string()?.into_owned()),
                                b"start" => start = Some(r.i64()?),
                                b"end" => end = Some(r.i64()?),
                                _ => r.skip()?,
                            }
                            Ok(())
                        })?;
                        match (version, start, end) {
                            (Some(version), Some(start), Some(end)) if 0 <= start && start <= end => {
                                spans.push(WeightVersionSpan { version, start: start as u64, end: end as u64 });
                                Ok(())
                            }
                            _ => r.err("weight_versions entry needs a version and 0 <= start <= end"),
                        }
                    })?;
                    Some(spans)
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })
}

fn parse_usage(r: &mut Reader<'_>) -> json::Result<Option<Usage>> {
    if r.null()? {
        return Ok(None);
    }
    let mut u = Usage::default();
    r.object(|r, k| {
        match k {
            b"prompt_tokens" => u.prompt_tokens = r.i64()?,
            b"completion_tokens" => u.completion_tokens = r.i64()?,
            b"total_tokens" => u.total_tokens = r.i64()?,
            b"prompt_tokens_details" => {
                if !r.null()? {
                    r.object(|r, k| {
                        match k {
                            b"cached_tokens" if !r.null()? => u.cached_tokens = Some(r.i64()?),
                            _ => r.skip()?,
                        }
                        Ok(())
                    })?;
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Some(u))
}

fn parse_metrics(r: &mut Reader<'_>) -> json::Result<Option<Vec<(String, f64)>>> {
    if r.null()? {
        return Ok(None);
    }
    let mut m = Vec::new();
    r.object(|r, k| {
        match r.peek() {
            Some(b'-' | b'0'..=b'9') => {
                let v = r.f64()?;
                m.push((String::from_utf8_lossy(k).into_owned(), v));
            }
            // Nested objects (speculative_decoding) and nulls are not metrics we track.
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Some(m))
}

fn parse_error(r: &mut Reader<'_>, offset: u64) -> json::Result<Option<ServerError>> {
    if r.null()? {
        return Ok(None);
    }
    let mut e = ServerError { message: String::new(), error_type: None, code: None, param: None, offset };
    if r.peek() == Some(b'"') {
        e.message = r.string()?.into_owned();
        return Ok(Some(e));
    }
    r.object(|r, k| {
        match k {
            b"message" => e.message = opt_string(r)?.unwrap_or_default(),
            b"type" => e.error_type = opt_string(r)?,
            b"param" => e.param = if r.peek() == Some(b'"') { opt_string(r)? } else { r.skip().map(|_| None)? },
            b"code" => {
                e.code = match r.peek() {
                    Some(b'"') => Some(r.string()?.into_owned()),
                    _ if r.null()? => None,
                    _ => Some(r.i64()?.to_string()),
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Some(e))
}

fn chunk_member<'a>(
    r: &mut Reader<'a>,
    k: &[u8],
    f: &mut ChunkFields<'a>,
    choices: &mut Vec<ChoiceDelta>,
    prompt: &mut Vec<u32>,
    offset: u64,
) -> json::Result<()> {
    match k {
        b"id" | b"request_id" => {
            if !r.null()? {
                let s = r.string()?;
                // `request_id` (generate endpoint) wins over `id`.
                if k == b"request_id" || f.id.is_none() {
                    f.id = Some(s);
                }
            }
        }
        b"model" => f.model = if r.null()? { None } else { Some(r.string()?) },
        b"choices" => {
            f.n_choices = 0;
            if !r.null()? {
                r.array(|r| {
                    if f.n_choices == choices.len() {
                        choices.push(ChoiceDelta::default());
                    }
                    let res = parse_choice(r, &mut choices[f.n_choices]);
                    f.n_choices += 1;
                    res
                })?;
            }
        }
        b"usage" => f.usage = parse_usage(r)?,
        b"metrics" => f.metrics = parse_metrics(r)?,
        b"error" => f.error = parse_error(r, offset)?,
        b"prompt_token_ids" => {
            prompt.clear();
            f.has_prompt = !r.null()?;
            if f.has_prompt {
                u32_array(r, prompt)?;
            }
        }
        _ => r.skip()?,
    }
    Ok(())
}

/// Members that may precede `choices` without effects beyond what the first
/// event recorded (the request id and model are kept from the first event).
fn inert_member(k: &[u8]) -> bool {
    matches!(k, b"id" | b"request_id" | b"object" | b"created" | b"model" | b"output_mode" | b"system_fingerprint")
}

pub(super) fn parse_chunk<'a>(r: &mut Reader<'a>, st: &mut Scratch, offset: u64) -> json::Result<ChunkFields<'a>> {
    let mut f = ChunkFields::default();
    let Scratch { choices, prompt, prefix } = st;
    prompt.clear();
    let data = r.buf();
    // vLLM repeats the same `{"id":..,"object":..,"created":..,"model":..,"choices":`
    // at the start of every event. When the bytes are identical to the last
    // event's validated prefix, they carry nothing new: resume at `choices`.
    if !prefix.is_empty() && data.len() > prefix.len() && data[..prefix.len()] == prefix[..] {
        r.set_pos(prefix.len());
        r.object_resume(b"choices", |r, k| chunk_member(r, k, &mut f, choices, prompt, offset))?;
        r.end()?;
        return Ok(f);
    }
    let mut inert = true;
    let mut prefix_end = None;
    r.object(|r, k| {
        if prefix_end.is_none() {
            if k == b"choices" {
                prefix_end = Some(r.pos());
            } else if !inert_member(k) && r.peek() != Some(b'n') {
                inert = false;
            }
        }
        chunk_member(r, k, &mut f, choices, prompt, offset)
    })?;
    r.end()?;
    prefix.clear();
    if let (true, Some(end)) = (inert, prefix_end) {
        prefix.extend_from_slice(&data[..end]);
    }
    Ok(f)
}

/// Parse `"token_id:123"` (vLLM's `return_tokens_as_token_ids` form).
fn token_id_string(s: &str) -> Option<i64> {
    s.strip_prefix("token_id:")?.parse::<u32>().ok().map(i64::from)
}
