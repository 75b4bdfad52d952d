"""The reference client of the engine benchmarks: one streamed
``/v1/completions`` request through ``openai.AsyncOpenAI``, collecting the
token ids and logprobs as a trainer would."""

from __future__ import annotations

from typing import Any


async def openai_stream(client: Any, model: str, prompt: list[int], max_tokens: int, seed: int) -> int:
    """Stream one completion of ``prompt``; returns its token count."""
    ids: list[int] = []
    lps: list[float] = []
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=True,
        logprobs=0,
        seed=seed,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    async for chunk in stream:
        for ch in chunk.choices:
            ids += getattr(ch, "token_ids", None) or []
            if ch.logprobs and ch.logprobs.token_logprobs:
                lps += ch.logprobs.token_logprobs
    return len(ids)
