//! Appending one parsed event to the per-choice columns, checking that
//! tokens, logprobs, top candidates, masks and expert rows stay in step.

use std::borrow::Cow;

use base64::Engine as _;

use crate::npy::{parse_npy, NpyArray};

use super::event::{ChoiceDelta, ChunkFields, LpDelta, LpKind, Scratch};
use super::types::{ChoiceOutput, StreamOutput, StringTable, TopLogprobs, MAX_CHOICES};

fn choice_mut(out: &mut StreamOutput, index: u32) -> Result<&mut ChoiceOutput, String> {
    // Choices are few (n); a linear scan beats hashing here.
    if let Some(pos) = out.choices.iter().position(|c| c.index == index) {
        return Ok(&mut out.choices[pos]);
    }
    if out.choices.len() >= MAX_CHOICES {
        return Err(format!("more than {MAX_CHOICES} distinct choice indices"));
    }
    out.choices.push(ChoiceOutput { index, ..Default::default() });
    let last = out.choices.len() - 1;
    Ok(&mut out.choices[last])
}

pub(super) fn apply_chunk(
    out: &mut StreamOutput,
    f: ChunkFields<'_>,
    st: &mut Scratch,
    offset: u64,
) -> Result<(), String> {
    if let Some(mut e) = f.error {
        if out.error.is_none() {
            e.offset = offset;
            out.error = Some(e);
        }
    }
    if out.request_id.is_none() {
        out.request_id = f.id.map(Cow::into_owned);
    }
    if out.model.is_none() {
        out.model = f.model.map(Cow::into_owned);
    }
    if let Some(u) = f.usage {
        out.usage = Some(u);
    }
    if let Some(m) = f.metrics {
        out.metrics = m;
    }
    let top_prompt = f.has_prompt.then_some(st.prompt.as_slice());
    for delta in &mut st.choices[..f.n_choices] {
        let Some(index) = delta.index else {
            return Err("choice without an `index`".into());
        };
        let c = choice_mut(out, index)?;
        apply_choice(c, delta, top_prompt)?;
    }
    Ok(())
}

fn apply_choice(c: &mut ChoiceOutput, d: &mut ChoiceDelta, top_prompt: Option<&[u32]>) -> Result<(), String> {
    let idx = c.index;
    if !d.has_ids && d.lp.kind == LpKind::Content && d.lp.entry_ids.iter().all(|&i| i >= 0) {
        // Chat without `return_token_ids`: the sampled ids are still known
        // from the logprob entries (`token_id` or `token_id:N` strings).
        d.has_ids = true;
        d.ids.extend(d.lp.entry_ids.iter().map(|&i| i as u32));
    } else if d.has_ids && d.lp.kind == LpKind::Content {
        for (i, (&e, &t)) in d.lp.entry_ids.iter().zip(&d.ids).enumerate() {
            if e >= 0 && e != i64::from(t) {
                return Err(format!("choice {idx}: logprob entry {i} is for token {e} but token_ids has {t}"));
            }
        }
    }
    if c.finish_reason.is_some() && !d.ids.is_empty() {
        return Err(format!("choice {idx}: tokens after its finish_reason"));
    }
    let prompt = if d.has_prompt { Some(d.prompt.as_slice()) } else { top_prompt };
    if let Some(p) = prompt {
        if c.prompt_token_ids.is_none() {
            c.prompt_token_ids = Some(p.iter().map(|&t| i64::from(t)).collect());
        }
    }
    let before = c.token_ids.len();
    let new_tokens = d.ids.len();
    c.token_ids.extend(d.ids.iter().map(|&t| i64::from(t)));
    if d.has_text {
        c.text.push_str(&d.text);
    }
    if d.has_reasoning {
        c.reasoning.push_str(&d.reasoning);
    }
    if d.lp.kind != LpKind::None {
        // With `echo`, the first chunk's logprob lists cover the prompt too.
        let echo = if d.lp.kind == LpKind::Legacy
            && d.has_prompt
            && before == 0
            && c.prompt_logprobs.is_empty()
            && !d.prompt.is_empty()
            && d.lp.lps.len() == d.prompt.len() + new_tokens
        {
            d.prompt.len()
        } else {
            0
        };
        apply_logprobs(c, &d.lp, before, new_tokens, d.has_ids, echo)?;
    }
    if d.has_mask {
        let (ids, offs) = c.sampling_mask.get_or_insert_with(|| (Vec::new(), vec![0]));
        // Rows already present must line up with earlier tokens.
        let rows_before = offs.len() - 1;
        if rows_before != before {
            return Err(format!("choice {idx}: sampling_mask rows ({rows_before}) out of step with tokens ({before})"));
        }
        if d.has_ids && d.mask_lens.len() != new_tokens {
            return Err(format!(
                "choice {idx}: {} sampling_mask rows for {new_tokens} tokens in one chunk",
                d.mask_lens.len()
            ));
        }
        let mut end = *offs.last().unwrap_or(&0);
        for &n in &d.mask_lens {
            end += n;
            offs.push(end);
        }
        ids.extend_from_slice(&d.mask_ids);
    }
    if let Some(re) = &d.routed_experts {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(re.as_bytes())
            .map_err(|e| format!("choice {idx}: routed_experts is not base64: {e}"))?;
        let arr = parse_npy(&raw).map_err(|e| format!("choice {idx}: routed_experts: {e}"))?;
        append_rows(&mut c.routed_experts, arr).map_err(|e| format!("choice {idx}: routed_experts: {e}"))?;
    }
    if let Some(wv) = d.weight_versions.take() {
        c.weight_versions = wv;
    }
    if let Some(fr) = d.finish_reason.take() {
        c.finish_reason = Some(fr);
    }
    if let Some(sr) = d.stop_reason.take() {
        c.stop_reason = Some(sr);
    }
    Ok(())
}

fn append_rows(slot: &mut Option<NpyArray>, arr: NpyArray) -> Result<(), String> {
    match slot {
        None => *slot = Some(arr),
        Some(prev) => {
            if prev.dtype != arr.dtype
                || prev.shape.len() != arr.shape.len()
                || prev.shape.get(1..) != arr.shape.get(1..)
                || prev.shape.is_empty()
            {
                return Err(format!(
                    "chunk array {:?} {:?} does not extend {:?} {:?}",
                    arr.dtype.name(),
                    arr.shape,
                    prev.dtype.name(),
                    prev.shape
                ));
            }
            // Rows of zero-sized arrays cost no bytes, so only the count can overflow.
            prev.shape[0] = prev.shape[0]
                .checked_add(arr.shape[0])
                .ok_or_else(|| format!("row count {} + {} overflows", prev.shape[0], arr.shape[0]))?;
            prev.data.extend_from_slice(&arr.data);
        }
    }
    Ok(())
}

fn apply_logprobs(
    c: &mut ChoiceOutput,
    lp: &LpDelta,
    tokens_before: usize,
    new_tokens: usize,
    has_ids: bool,
    echo: usize,
) -> Result<(), String> {
    let idx = c.index;
    c.has_logprobs = true;
    if c.logprobs.len() != tokens_before {
        return Err(format!(
            "choice {idx}: logprobs ({}) out of step with token ids ({tokens_before})",
            c.logprobs.len()
        ));
    }
    let entries = lp.lps.len();
    if has_ids && entries - echo != new_tokens {
        return Err(format!("choice {idx}: {} logprobs for {new_tokens} token ids in one chunk", entries - echo));
    }
    c.prompt_logprobs.extend(lp.lps[..echo].iter().map(|&l| l as f32));
    c.logprobs.extend(lp.lps[echo..].iter().map(|&l| l as f32));
    if lp.has_ranks {
        if c.ranks.len() != tokens_before {
            return Err(format!("choice {idx}: ranks out of step with tokens"));
        }
        c.ranks.extend_from_slice(&lp.ranks);
    }
    if lp.has_top {
        if lp.top_rows.len() != entries {
            return Err(format!("choice {idx}: {} top_logprobs rows for {entries} logprobs", lp.top_rows.len()));
        }
        let mut cand = 0usize;
        for (i, &n) in lp.top_rows.iter().enumerate() {
            let slot = if i < echo { &mut c.prompt_top_logprobs } else { &mut c.top_logprobs };
            let top = slot.get_or_insert_with(|| TopLogprobs { offsets: vec![0], ..Default::default() });
            if i >= echo {
                // Rows stay aligned with tokens even when earlier chunks had none.
                while top.offsets.len() < tokens_before + (i - echo) + 1 {
                    top.offsets.push(top.logprobs.len() as i64);
                }
            }
            let end = cand + n as usize;
            top.token_ids.extend_from_slice(&lp.top_ids[cand..end]);
            top.logprobs.extend(lp.top_lps[cand..end].iter().map(|&l| l as f32));
            top.tokens.extend_from(&lp.top_strs, cand, end);
            cand = end;
            top.offsets.push(top.logprobs.len() as i64);
        }
    }
    if let Some(top) = &mut c.top_logprobs {
        while top.offsets.len() < c.logprobs.len() + 1 {
            top.offsets.push(top.logprobs.len() as i64);
        }
    }
    Ok(())
}

/// Keep ids when every candidate has one, strings when none has; both otherwise.
pub(super) fn finalize_top(top: &mut TopLogprobs) {
    if top.token_ids.iter().all(|&i| i >= 0) {
        top.tokens = StringTable::default();
    } else if top.token_ids.iter().all(|&i| i < 0) {
        top.token_ids.clear();
    }
}
