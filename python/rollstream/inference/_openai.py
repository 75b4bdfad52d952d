"""OpenAI response objects from rollstream samples: ``chat.completion`` and
``text_completion`` bodies, with the token ids, logprobs and weight
versions a trainer needs beside OpenAI's own fields; and Hermes-style tool
calls (``<tool_call>{json}</tool_call>``, Qwen's and many others' chat
templates) parsed out of a model's text."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._models import SampledCompletion

__all__ = [
    "CHAT_OWN",
    "COMPLETION_OWN",
    "chat_response",
    "completion_response",
    "n_of",
    "parse_tool_calls",
    "prompt_batch",
    "request_body",
    "sampling_params",
]

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """``(content, tool_calls)``: the text without its well-formed
    ``<tool_call>`` blocks, and those blocks as OpenAI tool calls. A block
    that is not a JSON object with a ``name`` stays in the content."""
    calls: list[dict[str, Any]] = []

    def take(m: re.Match[str]) -> str:
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return m.group(0)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return m.group(0)
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": obj["name"],
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
        return ""

    content = _TOOL_CALL.sub(take, text)
    return (content.strip() if calls else content), calls


def _spans(c: SampledCompletion) -> list[list[Any]]:
    return [[s.version, s.start, s.end] for s in c.weight_versions]


def _rollstream_fields(c: SampledCompletion) -> dict[str, Any]:
    return {
        "token_ids": c.completion_ids.tolist(),
        "token_logprobs": None if c.completion_logprobs is None else c.completion_logprobs.tolist(),
        "weight_versions": _spans(c),
        "stop_reason": c.stop_reason,
    }


def _top_rows(c: SampledCompletion) -> list[list[tuple[int, float]]] | None:
    top = c.top_logprobs
    if top is None or top.token_ids is None or len(top) != c.completion_len:
        return None
    offs, ids, lps = top.offsets.tolist(), top.token_ids.tolist(), top.logprobs.tolist()
    return [
        list(zip(ids[offs[t] : offs[t + 1]], lps[offs[t] : offs[t + 1]], strict=True))
        for t in range(len(top))
    ]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(
    prefix: str, obj: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int], prompt_ids: Any
) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "prompt_token_ids": prompt_ids,
    }


def _lp_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_response(
    model: str,
    prompt: list[int],
    completions: Sequence[SampledCompletion],
    token_text: Callable[[list[int]], str],
    logprobs: bool,
    *,
    tools: bool,
) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(completions):
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        finish = c.finish_reason
        if tools:
            content, calls = parse_tool_calls(c.text)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                if finish == "stop":
                    finish = "tool_calls"
        choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
        if logprobs and c.completion_logprobs is not None:
            rows = _top_rows(c)
            content_lp = []
            for t, (tid, lp) in enumerate(
                zip(c.completion_ids.tolist(), c.completion_logprobs.tolist(), strict=True)
            ):
                entry = _lp_entry(token_text([tid]), lp)
                top = rows[t] if rows is not None else []
                entry["top_logprobs"] = [_lp_entry(token_text([a]), b) for a, b in top]
                content_lp.append(entry)
            choice["logprobs"] = {"content": content_lp}
        choice.update(_rollstream_fields(c))
        choices.append(choice)
    usage = _usage(len(prompt), sum(c.completion_len for c in completions))
    return _envelope("chatcmpl", "chat.completion", model, choices, usage, list(prompt))


def completion_response(
    model: str,
    prompts: Sequence[list[int]],
    results: Sequence[Sequence[SampledCompletion]],
    token_text: Callable[[list[int]], str],
    logprobs: bool,
    *,
    echo: bool,
) -> dict[str, Any]:
    choices = []
    index = 0
    prompt_tokens = completion_tokens = 0
    for prompt, completions in zip(prompts, results, strict=True):
        prompt_tokens += len(prompt)
        for c in completions:
            completion_tokens += c.completion_len
            text = (token_text(prompt) + c.text) if echo else c.text
            choice: dict[str, Any] = {
                "index": index,
                "text": text,
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            if logprobs and c.inference_logprobs is not None:
                ids = c.full_tokens[len(c.full_tokens) - len(c.inference_logprobs) :]
                toks = [token_text([t]) for t in ids]
                lps: list[float | None] = list(c.inference_logprobs)
                if echo:
                    # OpenAI's echo form: the first prompt token has no logprob.
                    ids = c.full_tokens
                    toks = [token_text([t]) for t in ids]
                    lps = [None, *c.inference_logprobs]
                offsets, pos = [], 0
                for t in toks:
                    offsets.append(pos)
                    pos += len(t)
                choice["logprobs"] = {
                    "tokens": toks,
                    "token_logprobs": lps,
                    "top_logprobs": None,
                    "text_offset": offsets,
                }
            choice.update(_rollstream_fields(c))
            choice["prompt_token_ids"] = list(prompt)
            choices.append(choice)
            index += 1
    prompt_ids = list(prompts[0]) if len(prompts) == 1 else [list(p) for p in prompts]
    usage = _usage(prompt_tokens, completion_tokens)
    return _envelope("cmpl", "text_completion", model, choices, usage, prompt_ids)


# -- requests ----------------------------------------------------------------------------------

#: Request fields the client interprets itself, on both endpoints (never sent as-is).
_OWN = frozenset(
    {
        "model",
        "n",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "stop",
        "stop_token_ids",
        "seed",
        "logprobs",
        "session_id",
        "user",
        "sampling_mask",
    }
)
CHAT_OWN = _OWN | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "chat_template_kwargs",
}
COMPLETION_OWN = _OWN | {"prompt", "echo"}


def request_body(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise ValueError(f"the request body must be a JSON object, got {type(payload).__name__}")
    if payload.get("stream"):
        raise ValueError(
            "stream=True: the client returns whole results (rollstream serve streams them to OpenAI clients)"
        )
    return dict(payload)


def n_of(body: Mapping[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"'n' must be a positive integer, got {n!r}")
    return n


def sampling_params(body: Mapping[str, Any], own: frozenset[str], *, chat: bool) -> dict[str, Any]:
    """Sampling parameters (vLLM's names) from an OpenAI body; fields the
    client does not interpret go to vLLM verbatim."""
    out: dict[str, Any] = {k: v for k, v in body.items() if k not in own}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        out["max_tokens"] = max_tokens
    else:
        out["max_tokens"] = 1024
    for k in ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "sampling_mask"):
        if body.get(k) is not None:
            out[k] = body[k]
    if chat:
        if body.get("logprobs"):
            out["logprobs"] = int(body.get("top_logprobs") or 0)
    elif body.get("logprobs") is not None:
        lp = body["logprobs"]
        if isinstance(lp, bool) or not isinstance(lp, int) or lp < 0:
            raise ValueError(f"'logprobs' must be an integer >= 0 for completions, got {lp!r}")
        out["logprobs"] = lp
    return out


def prompt_batch(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        batch: list[str | list[int]] = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                batch.append(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                batch.append(list(p))
            else:
                raise ValueError(
                    f"'prompt'[{i}] must be a string or a non-empty list of token ids, got {p!r}"
                )
        return batch
    raise ValueError(f"'prompt' must be a string, token ids, or a non-empty list of either; got {prompt!r}")
