"""DeploymentSampler against a real vLLM server (the session's CPU engine)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rollstream import (
    AdaptiveConcurrencyController,
    ChatTokenizer,
    DeploymentSampler,
    FixedConcurrencyController,
    RequestRejectedError,
    RetryPolicy,
    SamplingError,
    ServerMetrics,
    sample_seed,
)
from rollstream._exceptions import HotloadError
from rollstream.hotload import hotload
from rollstream.testing import LocalVLLM

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(tiny_model_dir)


def sampler(server: LocalVLLM, tok: ChatTokenizer, **kw: Any) -> DeploymentSampler:
    return DeploymentSampler(server.url, server.served_model_name, tokenizer=tok, **kw)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 600))


def test_stream_equals_non_streaming_request_at_same_seed(
    vllm_server: LocalVLLM, tokenizer: ChatTokenizer
) -> None:
    s = sampler(vllm_server, tokenizer)
    (c,) = run(s.sample_with_tokens(CHAT, n=1, max_tokens=24, seed=1234, logprobs=True))
    prompt = tokenizer.apply_chat_template(CHAT)
    assert c.prompt_len == len(prompt)
    assert c.full_tokens[: c.prompt_len] == prompt
    body = {
        "model": vllm_server.served_model_name,
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "seed": sample_seed(1234, 0),
        "return_token_ids": True,
    }
    ref = httpx.post(vllm_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert c.full_tokens[c.prompt_len :] == ref["token_ids"]
    assert c.text == ref["text"]
    assert c.completion_len == len(ref["token_ids"]) == len(c.inference_logprobs or [])
    assert c.finish_reason == ref["finish_reason"]


def test_n_samples_have_distinct_ids_seeds_and_all_fields(
    vllm_server: LocalVLLM, tokenizer: ChatTokenizer
) -> None:
    s = sampler(vllm_server, tokenizer)
    out = run(s.sample_with_tokens(CHAT, n=4, max_tokens=12, seed=7, logprobs=True, top_logprobs=3))
    assert len(out) == 4
    assert len({c.request_id for c in out}) == 4
    assert len({tuple(c.full_tokens) for c in out}) == 4, "per-sample seeds must differ"
    for c in out:
        assert c.completion_ids.dtype == np.int64
        assert c.completion_ids.tolist() == c.full_tokens[c.prompt_len :]
        assert c.top_logprobs is not None
        assert c.top_logprobs.token_ids is not None
        for t in range(c.completion_len):
            row = c.top_logprobs.row(t)
            assert int(c.completion_ids[t]) in row  # the sampled token is always listed
            assert len(row) >= 3
    again = run(s.sample_with_tokens(CHAT, n=4, max_tokens=12, seed=7))
    assert [c.full_tokens for c in again] == [c.full_tokens for c in out]


def _transformers_logprobs(model_dir: Path, tokens: list[int]) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    ids = torch.tensor(tokens[1:])
    return lp[torch.arange(len(tokens) - 1), ids].numpy()  # entry j: log p(tokens[j+1] | tokens[:j+1])


def test_logprobs_match_transformers_recomputation(
    vllm_server: LocalVLLM, tokenizer: ChatTokenizer, tiny_model_dir: Path
) -> None:
    s = sampler(vllm_server, tokenizer)
    (c,) = run(s.sample_with_tokens(CHAT, n=1, max_tokens=48, seed=3, logprobs=True))
    ref = _transformers_logprobs(tiny_model_dir, c.full_tokens)[c.prompt_len - 1 :]
    got = np.asarray(c.inference_logprobs, dtype=np.float64)
    err = float(np.max(np.abs(got - ref)))
    assert err < 1e-4, f"max |served - recomputed| = {err}"


def test_echo_gives_training_aligned_logprobs(
    vllm_server: LocalVLLM, tokenizer: ChatTokenizer, tiny_model_dir: Path
) -> None:
    s = sampler(vllm_server, tokenizer)
    (c,) = run(s.sample_with_tokens(CHAT, n=1, max_tokens=16, seed=5, echo=True))
    assert c.logprobs_echoed
    assert c.inference_logprobs is not None
    assert len(c.inference_logprobs) == len(c.full_tokens) - 1  # P + C - 1
    assert c.echoed_prompt_logprob_count == c.prompt_len - 1
    ref = _transformers_logprobs(tiny_model_dir, c.full_tokens)
    assert float(np.max(np.abs(np.asarray(c.inference_logprobs) - ref))) < 1e-4


def test_stop_token_ids_are_sent_as_ids(vllm_server: LocalVLLM, tokenizer: ChatTokenizer) -> None:
    s = sampler(vllm_server, tokenizer)
    (greedy,) = run(s.sample_with_tokens(CHAT, max_tokens=12, temperature=0.0))
    gen = greedy.completion_ids.tolist()
    stop_id = gen[5]
    cut = gen.index(stop_id)
    (c,) = run(s.sample_with_tokens(CHAT, max_tokens=12, temperature=0.0, stop=[stop_id]))
    assert c.finish_reason == "stop"
    assert c.stop_reason == stop_id
    assert c.completion_ids.tolist()[:cut] == gen[:cut]
    assert c.completion_len <= cut + 1


def test_max_seq_len_prefilter_and_clamp(vllm_server: LocalVLLM, tokenizer: ChatTokenizer) -> None:
    s = sampler(vllm_server, tokenizer)
    prompt = tokenizer.apply_chat_template(CHAT)
    assert run(s.sample_with_prompt_tokens(prompt, n=3, max_seq_len=len(prompt))) == []
    out = run(s.sample_with_prompt_tokens(prompt, n=2, max_tokens=500, max_seq_len=len(prompt) + 5))
    assert all(len(c.full_tokens) <= len(prompt) + 5 for c in out)
    assert all(c.finish_reason == "length" for c in out)
    m = s.drain_counters()
    assert m.dropped_prompt_too_long == 3
    assert m.max_tokens_clamped == 1
    assert m.dropped_over_length == 0
    assert s.metrics.samples == 0


def test_client_errors_raise_at_once_and_hide_the_api_key(
    vllm_server: LocalVLLM, tokenizer: ChatTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    s = sampler(vllm_server, tokenizer, api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(s)
    caplog.set_level(logging.DEBUG)
    t0 = time.monotonic()
    with pytest.raises(RequestRejectedError) as info:
        run(s.sample_with_tokens(CHAT, n=2, max_tokens=10**6))
    assert time.monotonic() - t0 < 10, "a 4xx must not be retried"
    err = info.value
    assert err.status == 400
    assert err.server_message is not None
    assert "max_tokens" in err.server_message
    assert s.metrics.attempts <= 2
    text = str(err) + repr(err) + caplog.text + str(err.__cause__)
    assert "sk-very-secret" not in text


def test_aborted_generations_are_continued_not_returned(
    vllm_server: LocalVLLM, tokenizer: ChatTokenizer
) -> None:
    s = sampler(vllm_server, tokenizer, retry=RetryPolicy(base=0.1))

    async def go() -> list[Any]:
        # Long enough that the pause lands mid-generation on a warm engine too.
        task = asyncio.create_task(s.sample_with_tokens(CHAT, n=3, max_tokens=1000, ignore_eos=True))
        async with httpx.AsyncClient(base_url=vllm_server.url, timeout=30) as client:
            await asyncio.sleep(0.5)
            (await client.post("/pause", params={"mode": "abort"})).raise_for_status()
            await asyncio.sleep(0.3)
            (await client.post("/resume")).raise_for_status()
        return await task

    out = run(go())
    assert [c.finish_reason for c in out] == ["length"] * 3
    assert all(c.completion_len == 1000 for c in out)
    m = s.metrics
    assert m.aborted_retried >= 1
    assert m.retry_reasons.get("abort", 0) >= 1
    # What was generated before the abort is kept, not generated again.
    assert m.continued_tokens >= 1
    assert any(c.attempts >= 2 for c in out)
    for c in out:
        assert c.full_tokens[: c.prompt_len] == c.prompt_tokens
        assert c.completion_ids.tolist() == c.full_tokens[c.prompt_len :]
        if c.attempts >= 2:  # continued: the text is decoded from all the ids
            assert c.text == tokenizer.decode(c.completion_ids.tolist(), skip_special_tokens=True)


def test_generate_endpoint_reports_weight_version(vllm_server: LocalVLLM, tokenizer: ChatTokenizer) -> None:
    s = sampler(vllm_server, tokenizer, endpoint="generate")
    out = run(s.sample_with_tokens(CHAT, n=2, max_tokens=8, logprobs=True, seed=11))
    version = httpx.get(vllm_server.url + "/weight_info").json()["weight_version"]
    for c in out:
        assert c.weight_version == version
        assert c.completion_len == 8
        assert c.inference_logprobs is not None
        assert len(c.inference_logprobs) == 8


def test_sample_batch_and_sync_wrappers(vllm_server: LocalVLLM, tokenizer: ChatTokenizer) -> None:
    s = sampler(vllm_server, tokenizer, concurrency_controller=FixedConcurrencyController(4))
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(6)]
    out = s.sample_batch_sync(prompts, n=2, max_tokens=6, progress=True)
    assert [len(o) for o in out] == [2] * 6
    for msgs, samples in zip(prompts, out, strict=True):
        assert samples[0].prompt_tokens == tokenizer.apply_chat_template(msgs)
    with pytest.deprecated_call():
        DeploymentSampler(vllm_server.url, "m", tokenizer=tokenizer, max_concurrency=3)


def test_aimd_under_real_congestion(vllm_server: LocalVLLM, tokenizer: ChatTokenizer) -> None:
    """The session server runs 8 sequences at a time: 64 concurrent requests
    queue for real, vLLM reports queue_time_ms, and the window shrinks; a
    light load afterwards lets it grow again."""

    class Checked(AdaptiveConcurrencyController):
        def __init__(self) -> None:
            super().__init__(
                initial_window=64, max_window=128, prefill_queue_target=0.25, adjustment_interval=4
            )
            self.history: list[int] = [self.window_size]
            self.violations = 0

        async def acquire(self) -> None:
            await super().acquire()
            if self.in_flight > self.window_size:
                self.violations += 1

        def release(self, metrics: ServerMetrics | None = None) -> None:
            super().release(metrics)
            self.history.append(self.window_size)

    ctrl = Checked()
    s = sampler(vllm_server, tokenizer, concurrency_controller=ctrl)
    prompts = [[{"role": "user", "content": f"Item {i}"}] for i in range(64)]
    run(s.sample_batch(prompts, n=1, max_tokens=48, ignore_eos=True))
    congested = ctrl.step_completed()
    assert congested["avg_pq"] > 0.25, congested
    assert congested["shrinks"] >= 1
    assert min(ctrl.history) < 64
    low = ctrl.window_size
    # Light load, under the server's 8 slots: the EMA of the queue time
    # decays below the target within a few intervals and the window grows.
    for _ in range(20):
        run(s.sample_batch(prompts[:4], n=1, max_tokens=8))
        if ctrl.window_size > low:
            break
    relaxed = ctrl.step_completed()
    assert relaxed["avg_pq"] < 0.25, relaxed
    assert relaxed["grows"] >= 1
    assert ctrl.window_size > low
    assert ctrl.violations == 0


def test_server_killed_mid_batch_fails_cleanly(
    tiny_model_dir: Path, tokenizer: ChatTokenizer, tmp_path: Path
) -> None:
    """A second, disposable server: kill it while samples stream."""
    from rollstream.testing.pytest_plugin import require_engine

    require_engine()
    with LocalVLLM(tiny_model_dir, log_path=tmp_path / "doomed.log") as doomed:
        s = sampler(
            doomed,
            tokenizer,
            retry=RetryPolicy(max_attempts=3, base=0.2, cap=0.5),
            concurrency_controller=FixedConcurrencyController(8),
        )

        async def go() -> None:
            task = asyncio.create_task(s.sample_with_tokens(CHAT, n=6, max_tokens=2000, ignore_eos=True))
            await asyncio.sleep(3.0)
            await asyncio.to_thread(doomed.stop)
            await task

        t0 = time.monotonic()
        with pytest.raises(SamplingError) as info:
            asyncio.run(asyncio.wait_for(go(), 300))
        assert time.monotonic() - t0 < 120, "no hang"
    err = info.value
    assert "failed" in str(err)
    ids = [c.request_id for c in err.completed]
    assert len(ids) == len(set(ids)), "nothing returned twice"
    assert s.metrics.retries >= 1
    # Hot-loading into the dead server fails up front, naming it.
    with pytest.raises(HotloadError, match="unreachable") as hl:
        hotload(doomed.url, tiny_model_dir, "after-death")
    assert hl.value.stage == "check"
