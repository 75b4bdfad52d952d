"""From a decoded stream to what the caller gets: a
:class:`~rollstream.SampledCompletion` (checked against the request), the
attempt's :class:`~rollstream.ServerMetrics`, and the Fireworks SDK's
response dict for :meth:`DeploymentSampler.async_completions_stream`.

Inconsistent replies raise :class:`ReplyMismatch` (the sampler fails the
request at once: the same request would get the same reply).
"""

from __future__ import annotations

import base64
import itertools
import logging
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ._http import StreamFailure, StreamOk
from ._models import SampledCompletion, ServerMetrics
from .streams import StreamChoice, StreamResult, TopLogprobs

__all__ = [
    "ReplyMismatch",
    "Wanted",
    "completion",
    "failure_metrics",
    "join_pieces",
    "response_dict",
    "success_metrics",
]

log = logging.getLogger("rollstream.sampler")

#: The logprobs mode whose logprobs are those of the distribution sampled from.
PROCESSED = "processed_logprobs"


class ReplyMismatch(Exception):
    """A well-formed stream that does not answer the request as asked."""

    def __init__(self, message: str, excerpt: str = "") -> None:
        super().__init__(message)
        self.excerpt = excerpt


@dataclass(frozen=True)
class Wanted:
    """What the call asked for, as far as mapping the reply is concerned."""

    logprobs: bool
    top_logprobs: int
    #: Prompt positions echoed (``echo=True``: all; ``echo_last=k``: k), or None.
    echo_count: int | None
    include_routing_matrix: bool
    #: Sampled from the full distribution (temperature 1, no truncation):
    #: raw and processed logprobs coincide.
    full_distribution: bool


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


def success_metrics(
    ok: StreamOk, result: StreamResult, *, prompt_len: int, completion_len: int, attempt: int, route_url: str
) -> ServerMetrics:
    """The attempt's record: vLLM's per-request metrics mapped to the SDK's fields."""
    m = result.metrics

    def seconds(key: str) -> float | None:
        v = m.get(key)
        return None if v is None else float(v) / 1000.0

    usage = result.usage
    return ServerMetrics(
        prefill_queue_duration=seconds("queue_time_ms"),
        server_ttft=seconds("time_to_first_token_ms"),
        generation_duration=seconds("generation_time_ms"),
        cached_prompt_tokens=usage.cached_tokens if usage is not None else None,
        prompt_tokens=usage.prompt_tokens if usage is not None and usage.prompt_tokens else prompt_len,
        completion_tokens=usage.completion_tokens if usage is not None else completion_len,
        client_ttft=ok.first_token_s or None,
        client_latency=ok.total_s,
        http_status_code=ok.status,
        retry_attempt=attempt,
        response_request_id=ok.request_id,
        backend_host=host_of(route_url),
    )


def failure_metrics(
    outcome: StreamFailure, *, transport_error: bool, error: str, attempt: int, route_url: str
) -> ServerMetrics:
    return ServerMetrics(
        http_status_code=outcome.status,
        transport_error=transport_error,
        retry_attempt=attempt,
        error=error,
        backend_host=host_of(route_url),
    )


def _topk_rows(
    top: TopLogprobs | None, start: int, stop: int
) -> tuple[list[list[int]], list[list[float]]] | None:
    """Rows ``[start, stop)`` as id and logprob lists; None unless every row
    has candidates identified by id."""
    if top is None or top.token_ids is None or len(top) < stop:
        return None
    offs = top.offsets[start : stop + 1]
    if stop > start and (np.diff(offs) <= 0).any():
        return None
    ids = top.token_ids[offs[0] : offs[-1]]
    if (ids < 0).any():
        return None
    bounds = (offs - offs[0]).tolist()
    id_list = ids.tolist()
    lp_list = top.logprobs[offs[0] : offs[-1]].tolist()
    pairs = list(itertools.pairwise(bounds))
    return [id_list[a:b] for a, b in pairs], [lp_list[a:b] for a, b in pairs]


def _routing_strings(rows: np.ndarray) -> list[str]:
    """One base64 string per position: little-endian int16, layers x top_k."""
    if rows.size and (rows.min() < np.iinfo(np.int16).min or rows.max() > np.iinfo(np.int16).max):
        raise ReplyMismatch(
            f"routed expert ids up to {int(rows.max())} do not fit the int16 routing matrices"
        )
    packed = np.ascontiguousarray(rows, dtype="<i2").reshape(len(rows), -1)
    return [base64.b64encode(r.tobytes()).decode("ascii") for r in packed]


def _routing_matrices(
    routed: np.ndarray | None, prompt_len: int, completion_len: int, echo_count: int | None
) -> list[str] | None:
    """Routed experts aligned with the logprob positions. vLLM reports one
    row per forwarded position (prompt + completion - 1: the last token was
    never fed back); row j routed the prediction of token j + 1."""
    if routed is None or routed.ndim < 2:
        return None
    total = prompt_len + completion_len - 1
    if len(routed) == total + 1:
        routed = routed[:total]
    if len(routed) == total:
        # The first logprob position predicts full[start] from position start - 1.
        start = prompt_len - echo_count + int(echo_count == prompt_len) if echo_count else prompt_len
        return _routing_strings(routed[max(start - 1, 0) :])
    if len(routed) == completion_len:
        strings = _routing_strings(routed)
        if echo_count:
            head = echo_count - int(echo_count == prompt_len)
            return [""] * head + strings
        return strings
    log.warning(
        "routed experts have %d rows for %d prompt + %d completion tokens: routing_matrices left empty",
        len(routed),
        prompt_len,
        completion_len,
    )
    return None


def completion(
    prompt: list[int],
    choice: StreamChoice,
    *,
    wanted: Wanted,
    request_id: str,
    attempts: int,
    logprobs_mode: str | None,
) -> SampledCompletion:
    """The sample of one finished choice, checked against the request."""
    ids = choice.token_ids
    lps = choice.logprobs
    n_prompt = len(prompt)
    if choice.prompt_token_ids is not None and (
        len(choice.prompt_token_ids) != n_prompt or choice.prompt_token_ids.tolist() != prompt
    ):
        raise ReplyMismatch(
            f"the server's prompt differs from the one sent "
            f"({len(choice.prompt_token_ids)} vs {n_prompt} tokens)",
            excerpt=str(choice.prompt_token_ids[:16].tolist()),
        )
    if wanted.logprobs and (lps is None or len(lps) != len(ids)):
        got = None if lps is None else len(lps)
        raise ReplyMismatch(f"the server sent {got} logprobs for {len(ids)} generated tokens")
    inference: list[float] | None = None
    echoed = 0
    echo = wanted.echo_count or 0
    head = 0  # prompt positions at the start of the per-position lists
    if wanted.logprobs and lps is not None:
        if echo:
            plp = choice.prompt_logprobs
            if plp is None or len(plp) != n_prompt:
                got = None if plp is None else len(plp)
                raise ReplyMismatch(f"echo asked for {n_prompt} prompt logprobs, the server sent {got}")
            # Training-aligned: entry j is log p(full[s+j+1] | full[:s+j+1]);
            # a full echo drops the first prompt token (nothing predicts it).
            start = n_prompt - echo + int(echo == n_prompt)
            head = n_prompt - start
            inference = np.concatenate([plp[start:], lps]).tolist()
            echoed = head
        else:
            inference = lps.tolist()
    sampling: list[float | None] | None = None
    if inference is not None:
        if logprobs_mode in (None, PROCESSED) or wanted.full_distribution:
            sampling = list(inference)
        else:
            sampling = [None] * len(inference)
    topk_ids = topk_lps = None
    if wanted.logprobs and wanted.top_logprobs > 0:
        rows = _topk_rows(choice.top_logprobs, 0, len(ids))
        if rows is not None and head:
            prompt_rows = _topk_rows(choice.prompt_top_logprobs, n_prompt - head, n_prompt)
            rows = None if prompt_rows is None else (prompt_rows[0] + rows[0], prompt_rows[1] + rows[1])
        if rows is not None:
            topk_ids, topk_lps = rows
    routing = (
        _routing_matrices(choice.routed_experts, n_prompt, len(ids), wanted.echo_count)
        if wanted.include_routing_matrix
        else None
    )
    versions = choice.weight_versions
    names = {v.version for v in versions}
    weight_version = None if not names else (next(iter(names)) if len(names) == 1 else "mixed")
    return SampledCompletion(
        text=choice.text,
        full_tokens=prompt + ids.tolist(),
        prompt_len=n_prompt,
        finish_reason=choice.finish_reason or "unknown",
        completion_len=len(ids),
        inference_logprobs=inference,
        sampling_logprobs=sampling,
        logprobs_echoed=bool(echo) and inference is not None,
        routing_matrices=routing,
        echoed_prompt_logprob_count=echoed,
        inference_topk_token_ids=topk_ids,
        inference_topk_logprobs=topk_lps,
        top_logprobs=choice.top_logprobs,
        routed_experts=choice.routed_experts,
        sampling_mask=choice.sampling_mask,
        weight_version=weight_version,
        weight_versions=versions,
        request_id=request_id,
        stop_reason=choice.stop_reason,
        completion_ids=ids,
        completion_logprobs=lps,
        attempts=attempts,
    )


def response_dict(result: StreamResult, c: SampledCompletion) -> dict[str, Any]:
    """The Fireworks SDK's assembled response (``async_completions_stream``):
    ``choices[0]`` with ``text``, ``finish_reason``, ``raw_output`` token ids
    and ``logprobs.content`` entries, plus ``id`` and ``usage``."""
    ids = c.completion_ids.tolist()
    choice: dict[str, Any] = {
        "index": 0,
        "text": c.text,
        "finish_reason": c.finish_reason,
        "raw_output": {"prompt_token_ids": c.prompt_tokens, "completion_token_ids": ids},
    }
    if c.completion_logprobs is not None:
        lps = c.completion_logprobs.tolist()
        content: list[dict[str, Any]] = [
            {"token_id": t, "logprob": lp} for t, lp in zip(ids, lps, strict=True)
        ]
        top = c.top_logprobs
        if top is not None and top.token_ids is not None and len(top) == len(ids):
            offs = top.offsets.tolist()
            cand_ids = top.token_ids.tolist()
            cand_lps = top.logprobs.tolist()
            for j, entry in enumerate(content):
                entry["top_logprobs"] = [
                    {"token_id": cand_ids[k], "logprob": cand_lps[k]} for k in range(offs[j], offs[j + 1])
                ]
        choice["logprobs"] = {"content": content}
    out: dict[str, Any] = {"choices": [choice]}
    if result.request_id is not None:
        out["id"] = result.request_id
    if result.usage is not None:
        u = result.usage
        usage: dict[str, Any] = {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }
        if u.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
        out["usage"] = usage
    return out


def _join_csr(parts: list[TopLogprobs | None]) -> TopLogprobs | None:
    if any(p is None for p in parts):
        return None
    tops = [p for p in parts if p is not None]
    if any(t.token_ids is None for t in tops) and not all(t.token_ids is None for t in tops):
        return None
    offsets = [np.zeros(1, np.int64)]
    token_offsets = [np.zeros(1, np.int64)]
    base = tbase = 0
    for t in tops:
        offsets.append(t.offsets[1:] + base)
        token_offsets.append(t.token_offsets[1:] + tbase)
        base += int(t.offsets[-1])
        tbase += int(t.token_offsets[-1]) if len(t.token_offsets) else 0
    ids = None if tops[0].token_ids is None else np.concatenate([t.token_ids for t in tops])
    return TopLogprobs(
        offsets=np.concatenate(offsets),
        logprobs=np.concatenate([t.logprobs for t in tops]),
        token_ids=ids,
        token_bytes=b"".join(t.token_bytes for t in tops),
        token_offsets=np.concatenate(token_offsets),
    )


def _join_lists(parts: list[list[Any] | None]) -> list[Any] | None:
    if any(p is None for p in parts):
        return None
    return [x for p in parts for x in p]  # type: ignore[union-attr]


def join_pieces(prompt: list[int], pieces: list[SampledCompletion], decode: Any = None) -> SampledCompletion:
    """One sample from the pieces of a generation that was aborted and
    continued (each piece's prompt is ``prompt`` plus the ids of the pieces
    before it): ids, logprobs, candidates, masks and routed experts are
    concatenated, weight-version spans shifted to the whole completion, and
    the text decoded from all the ids (``decode(ids) -> str``; without it,
    the pieces' texts are joined)."""
    from .masks import SamplingMask
    from .streams import WeightVersionSpan

    last = pieces[-1]
    ids = np.concatenate([p.completion_ids for p in pieces]).astype(np.int64, copy=False)
    spans: list[WeightVersionSpan] = []
    shift = 0
    for p in pieces:
        for s in p.weight_versions:
            prev = spans[-1] if spans else None
            if prev is not None and prev.version == s.version and prev.end == s.start + shift:
                spans[-1] = WeightVersionSpan(s.version, prev.start, s.end + shift)
            else:
                spans.append(WeightVersionSpan(s.version, s.start + shift, s.end + shift))
        shift += p.completion_len
    names = {s.version for s in spans}
    lps = [p.completion_logprobs for p in pieces]
    mask = None
    if all(p.sampling_mask is not None for p in pieces):
        masks = [p.sampling_mask for p in pieces]
        offs = [np.zeros(1, np.int64)]
        base = 0
        for m in masks:
            assert m is not None
            offs.append(m.offsets[1:] + base)
            base += int(m.offsets[-1])
        mask = SamplingMask(
            np.concatenate([m.token_ids for m in masks if m is not None]), np.concatenate(offs)
        )
    experts = [p.routed_experts for p in pieces]
    text = decode(ids.tolist()) if decode is not None else "".join(p.text for p in pieces)
    return dataclasses_replace(
        last,
        text=text,
        full_tokens=prompt + ids.tolist(),
        prompt_len=len(prompt),
        completion_len=len(ids),
        inference_logprobs=_join_lists([p.inference_logprobs for p in pieces]),
        sampling_logprobs=_join_lists([p.sampling_logprobs for p in pieces]),
        routing_matrices=_join_lists([p.routing_matrices for p in pieces]),
        inference_topk_token_ids=_join_lists([p.inference_topk_token_ids for p in pieces]),
        inference_topk_logprobs=_join_lists([p.inference_topk_logprobs for p in pieces]),
        top_logprobs=_join_csr([p.top_logprobs for p in pieces]),
        routed_experts=None if any(e is None for e in experts) else np.concatenate(experts),  # type: ignore[arg-type]
        sampling_mask=mask,
        weight_versions=tuple(spans),
        weight_version=None if not names else (next(iter(names)) if len(names) == 1 else "mixed"),
        completion_ids=ids,
        completion_logprobs=None if any(x is None for x in lps) else np.concatenate(lps),  # type: ignore[arg-type]
        attempts=last.attempts,
    )
