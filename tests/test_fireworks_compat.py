"""A Fireworks training-SDK user switches by changing imports.

Each engine test below is written the way the SDK's documentation and the
public Fireworks cookbook drive ``fireworks.training.sdk.DeploymentSampler``
(the same names, argument spellings and result fields), with only the
import changed, against the session's real vLLM engine. The signature
tests compare with the reference package itself (fireworks-ai 1.2.30), and
a regression test per defect of issue 13 closes the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _require import reference_sdk, require

import rollstream
from rollstream import (
    AdaptiveConcurrencyController,
    DeploymentSampler,
    DeploymentSamplerTimeoutError,
    FixedConcurrencyController,
    RetryPolicy,
    SampledCompletion,
    SampledRequestResult,
    SampledServerAttempt,
    SamplingRequestError,
    ServerMetrics,
    sample_seed,
)
from rollstream.testing import LocalVLLM

MESSAGES = [{"role": "user", "content": "Solve: 2+2="}]
engine = pytest.mark.engine


def hf_tokenizer(model_dir: Path) -> Any:
    transformers = require("transformers", "for the SDK's documented tokenizer argument")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return hf_tokenizer(tiny_model_dir)


def docs_sampler(server: LocalVLLM, tokenizer: Any, **kw: Any) -> DeploymentSampler:
    # The documentation's constructor call, keyword for keyword.
    return DeploymentSampler(
        inference_url=server.url,
        model=server.served_model_name,
        api_key="<FIREWORKS_API_KEY>",
        tokenizer=tokenizer,
        **kw,
    )


# -- signatures: the reference package itself ------------------------------------------


def _params(fn: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


@pytest.mark.parametrize(
    "method",
    [
        "__init__",
        "sample_with_tokens",
        "sample_with_prompt_tokens",
        "sample_with_prompt_tokens_result",
        "async_completions_stream",
        "drain_metrics",
        "close",
    ],
)
def test_sampler_methods_take_the_references_arguments(method: str) -> None:
    sdk = reference_sdk()
    theirs = _params(getattr(sdk.DeploymentSampler, method))
    ours = _params(getattr(DeploymentSampler, method))
    for name, p in theirs.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            assert any(q.kind is inspect.Parameter.VAR_KEYWORD for q in ours.values()), method
            continue
        assert name in ours, f"{method}({name}=...) is missing"
        if p.default is not inspect.Parameter.empty:
            assert ours[name].default == p.default, f"{method}({name}): default {ours[name].default!r}"
    positional = [n for n, p in theirs.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in ours.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][
        : len(positional)
    ] == positional, f"{method}: positional order"


@pytest.mark.parametrize(
    "name", ["SampledCompletion", "ServerMetrics", "SampledRequestResult", "SampledServerAttempt"]
)
def test_result_types_have_the_references_fields_in_order(name: str) -> None:
    sdk = reference_sdk()
    from fireworks.training.sdk import sampling as ref_sampling

    ref = getattr(sdk, name, None) or getattr(ref_sampling, name)
    ours = getattr(rollstream, name)
    ref_fields = [(f.name, f.default) for f in dataclasses.fields(ref)]
    our_fields = [(f.name, f.default) for f in dataclasses.fields(ours)]
    assert our_fields[: len(ref_fields)] == ref_fields


def test_result_values_built_like_the_reference_compare_equal() -> None:
    sdk = reference_sdk()
    args = ("text", [1, 2, 3], 2, "stop", 1, [-0.5], [-0.5], False, None, 0, [[3]], [[-0.5]])
    theirs = sdk.SampledCompletion(*args)
    ours = SampledCompletion(*args)
    assert ours == SampledCompletion(*args)
    for f in dataclasses.fields(theirs):
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert ServerMetrics.from_headers({"Prefill-Queue-Duration": "0.25", "fireworks-prompt-tokens": "7"}) == (
        ServerMetrics(prefill_queue_duration=0.25, prompt_tokens=7)
    )


def test_exceptions_have_the_references_attributes() -> None:
    sdk = reference_sdk()
    kw = {
        "logical_request_id": "lr",
        "model": "m",
        "attempts": 7,
        "final_status": 503,
        "final_error_kind": "http_status",
        "request_id": "srv",
        "context": {"run": "r", "secret": "dropped"},
    }
    theirs = sdk.SamplingRequestError(**kw)
    ours = SamplingRequestError(**kw)
    assert isinstance(ours, RuntimeError)
    assert str(ours).lower() == str(theirs).lower()
    assert ours.as_error_record() == theirs.as_error_record()
    assert issubclass(DeploymentSamplerTimeoutError, SamplingRequestError)
    for sub in (
        rollstream.SamplingError,
        rollstream.RequestRejectedError,
        rollstream.RetriesExhaustedError,
        rollstream.DeadlineExceededError,
        rollstream.SamplingProtocolError,
        rollstream.SamplingMaskError,
        rollstream.TransportClosedError,
    ):
        assert issubclass(sub, SamplingRequestError), sub
    assert issubclass(rollstream.DeadlineExceededError, DeploymentSamplerTimeoutError)
    assert issubclass(rollstream.SamplingTimeoutError, DeploymentSamplerTimeoutError)


def test_controllers_take_the_references_arguments_and_defaults() -> None:
    sdk = reference_sdk()
    theirs = _params(sdk.AdaptiveConcurrencyController.__init__)
    ours = _params(AdaptiveConcurrencyController.__init__)
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].default == p.default, name
    for kw in ({}, {"initial_window": 0}, {"initial_window": 10**6, "max_window": 64}, {"min_window": 3}):
        assert (
            AdaptiveConcurrencyController(**kw).window_size
            == sdk.AdaptiveConcurrencyController(**kw).window_size
        )
    assert FixedConcurrencyController(5).window_size == sdk.FixedConcurrencyController(5).window_size == 5


# -- the documentation, against the engine ------------------------------------------------


@engine
def test_docs_constructor_sampling_and_step_summary(vllm_server: LocalVLLM, tokenizer: Any) -> None:
    ctrl = AdaptiveConcurrencyController(
        initial_window=16,  # starting concurrency
        min_window=1,  # minimum window
        max_window=256,  # maximum window
        prefill_queue_target=0.5,  # target prefill queue latency (seconds)
    )
    sampler = docs_sampler(vllm_server, tokenizer, concurrency_controller=ctrl)

    async def main() -> list[SampledCompletion]:
        return await sampler.sample_with_tokens(
            messages=[{"role": "user", "content": "Solve: 2+2="}],
            n=4,
            max_tokens=32,
            temperature=0.7,
        )

    completions = asyncio.run(main())
    assert len(completions) == 4
    prompt = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    for c in completions:
        assert c.full_tokens[: c.prompt_len] == list(prompt)  # prompt + completion token IDs
        assert c.completion_len == len(c.full_tokens) - c.prompt_len
        assert isinstance(c.text, str)
        assert c.finish_reason in ("stop", "length")
    summary = ctrl.step_completed()  # {"window": 20, "avg_pq": 0.08, "cache_hit_rate": 0.95, ...}
    assert summary["window"] == 16
    assert "avg_pq" in summary
    assert summary["avg_pq"] >= 0
    assert "cache_hit_rate" not in summary  # vLLM here does not report cached tokens
    assert all(isinstance(v, float) for v in summary.values())
    sampler.close()


@engine
def test_docs_logprobs_and_sequence_length_filtering(vllm_server: LocalVLLM, tokenizer: Any) -> None:
    sampler = docs_sampler(vllm_server, tokenizer, concurrency_controller=FixedConcurrencyController(32))

    async def main() -> list[SampledCompletion]:
        return await sampler.sample_with_tokens(
            messages=MESSAGES, n=4, logprobs=True, top_logprobs=1, max_tokens=16
        )

    for c in asyncio.run(main()):
        assert isinstance(c.inference_logprobs, list)
        assert len(c.inference_logprobs) == c.completion_len
        assert c.sampling_logprobs == c.inference_logprobs  # the server runs processed logprobs
        assert c.inference_topk_token_ids is not None
        assert c.inference_topk_logprobs is not None
        assert len(c.inference_topk_token_ids) == c.completion_len
        for j, ids in enumerate(c.inference_topk_token_ids):
            assert c.full_tokens[c.prompt_len + j] in ids  # vLLM always lists the sampled token
        assert not c.logprobs_echoed

    completions = asyncio.run(
        sampler.sample_with_tokens(messages=MESSAGES, n=4, max_tokens=1024, max_seq_len=40)
    )
    assert completions
    assert all(len(c.full_tokens) <= 40 for c in completions)
    assert asyncio.run(sampler.sample_with_tokens(messages=MESSAGES, n=4, max_seq_len=5)) == []
    sampler.close()


@engine
def test_cookbook_rollout_kwargs_with_router_replay(vllm_server: LocalVLLM, tokenizer: Any) -> None:
    # The cookbook's GRPO loop: sample_kwargs built once, router replay on.
    sample_kwargs: dict = dict(
        max_tokens=24, temperature=1.0, max_seq_len=2048, http_timeout=600, logprobs=True
    )
    sample_kwargs.update(include_routing_matrix=True, echo=True)
    ctrl = AdaptiveConcurrencyController(initial_window=8)
    sampler = docs_sampler(vllm_server, tokenizer, concurrency_controller=ctrl)

    async def sample_one_prompt(row: dict) -> list[SampledCompletion]:
        return await sampler.sample_with_tokens(messages=row["messages"], n=4, **sample_kwargs)

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(3)]

    async def step() -> list[list[SampledCompletion]]:
        return await asyncio.gather(*(sample_one_prompt(r) for r in rows))

    for group in asyncio.run(step()):
        for c in group:
            assert c.logprobs_echoed
            assert len(c.inference_logprobs or []) == len(c.full_tokens) - 1  # P + C - 1, training-aligned
            assert c.echoed_prompt_logprob_count == c.prompt_len - 1
            assert c.routing_matrices is None  # a dense model has no routing to replay
    metrics = sampler.drain_metrics()
    assert len(metrics) == 12
    assert all(
        isinstance(m, ServerMetrics) and m.retry_attempt == 1 and m.http_status_code == 200 for m in metrics
    )
    assert all(m.prefill_queue_duration is not None for m in metrics)
    assert all(m.cached_prompt_tokens is None for m in metrics)  # unknown, not 0 (defect 4)
    assert sampler.drain_metrics() == []
    sampler.close()


@engine
def test_prompt_token_calls_with_the_references_spellings(vllm_server: LocalVLLM, tokenizer: Any) -> None:
    sampler = docs_sampler(
        vllm_server,
        tokenizer,
        concurrency_controller=FixedConcurrencyController(8),
        request_context={"run": "r1"},
    )
    prompt = list(
        tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    )

    async def main() -> tuple[list[SampledCompletion], SampledRequestResult, tuple[dict, ServerMetrics]]:
        a = await sampler.sample_with_prompt_tokens(
            prompt,
            2,
            16,
            0.0,
            None,
            [tokenizer.eos_token],
            "trajectory-1",
            {"x-trace": "t1"},
            ignore_eos=False,
        )
        b = await sampler.sample_with_prompt_tokens_result(
            prompt_token_ids=prompt,
            max_tokens=8,
            temperature=1.0,
            prompt_cache_key="trajectory-1",
            logical_request_id="rollout-7",
            logprobs=True,
            echo_last=3,
            prompt_cache_max_len=0,
            sampling_context={"step": 3},
        )
        c = await sampler.async_completions_stream(
            prompt, max_tokens=8, temperature=1.0, logprobs=True, top_logprobs=2
        )
        return a, b, c

    greedy, result, (response, server_metrics) = asyncio.run(main())
    assert len(greedy) == 2
    assert greedy[0].full_tokens == greedy[1].full_tokens
    assert isinstance(result, SampledRequestResult)
    assert result.logical_request_id == "rollout-7"
    assert result.attempts == 1
    assert result.upstream_response_id
    assert result.wall_seconds > 0
    (attempt,) = result.server_attempts
    assert isinstance(attempt, SampledServerAttempt)
    assert attempt.outcome == "succeeded"
    assert attempt.status_code == 200
    assert "rollout-7" in (attempt.upstream_response_id or "")  # vLLM names the completion after X-Request-Id
    assert result.server_metrics is not None
    assert result.server_metrics.prefill_queue_duration is not None
    (c,) = result.completions
    assert c.logprobs_echoed
    assert c.echoed_prompt_logprob_count == 3
    assert len(c.inference_logprobs or []) == 3 + c.completion_len
    # The SDK's response dict, read the way its own parser reads it.
    choice = response["choices"][0]
    ids = choice["raw_output"]["completion_token_ids"]
    assert len(ids) == 8
    assert choice["finish_reason"] == "length"
    assert [e["token_id"] for e in choice["logprobs"]["content"]] == ids
    assert all(len(e["top_logprobs"]) >= 1 for e in choice["logprobs"]["content"])
    assert server_metrics.http_status_code == 200
    assert server_metrics.client_ttft is not None
    sampler.close()


@engine
def test_errors_are_the_references_exceptions(vllm_server: LocalVLLM, tokenizer: Any) -> None:
    sampler = docs_sampler(
        vllm_server,
        tokenizer,
        request_context={"run": "r1", "step": 9},
        retry=RetryPolicy(max_attempts=2, base=0.05),
    )
    # What a trainer written for the SDK catches.
    with pytest.raises(SamplingRequestError) as rejected:
        asyncio.run(sampler.sample_with_tokens(messages=MESSAGES, n=2, max_tokens=10**6))
    e = rejected.value
    assert isinstance(e, RuntimeError)
    assert e.final_status == 400
    assert e.final_error_kind == "http_status"
    assert e.logical_request_id
    assert e.attempts == 1
    assert e.model == vllm_server.served_model_name
    assert e.context == {"run": "r1", "step": 9}
    assert [a.outcome for a in e.server_attempts] == ["failed"]
    assert e.as_error_record()["context"] == {"run": "r1", "step": 9}
    t0 = time.monotonic()
    with pytest.raises(DeploymentSamplerTimeoutError) as info:
        asyncio.run(
            sampler.sample_with_tokens(messages=MESSAGES, max_tokens=64, http_timeout=0.005, ignore_eos=True)
        )
    assert time.monotonic() - t0 < 60
    assert info.value.attempts == 2
    assert info.value.retry_budget_exhausted
    sampler.close()


@engine
def test_lifetime_in_both_worlds_and_across_event_loops(vllm_server: LocalVLLM, tiny_model_dir: Path) -> None:
    with DeploymentSampler(
        vllm_server.url, vllm_server.served_model_name, tokenizer=tiny_model_dir
    ) as sampler:
        # Each *_sync call runs its own event loop; masks use a control client.
        for _ in range(3):
            (c,) = sampler.sample_with_tokens_sync(MESSAGES, max_tokens=6, top_k=5, sampling_mask=True)
            assert c.sampling_mask is not None
            assert c.sampling_mask.rows == c.completion_len
        assert sampler.mask_path == "plugin"
    assert sampler.closed
    with pytest.raises(rollstream.TransportClosedError):
        sampler.sample_with_tokens_sync(MESSAGES, max_tokens=4)

    async def scoped() -> int:
        async with DeploymentSampler(
            vllm_server.url, vllm_server.served_model_name, tokenizer=tiny_model_dir
        ) as s:
            return len(await s.sample_with_tokens(MESSAGES, n=2, max_tokens=4))

    assert asyncio.run(scoped()) == 2


@engine
def test_reference_controllers_drive_our_sampler(vllm_server: LocalVLLM, tokenizer: Any) -> None:
    sdk = reference_sdk()
    ctrl = sdk.AdaptiveConcurrencyController(initial_window=4, adjustment_interval=4)
    with docs_sampler(vllm_server, tokenizer, concurrency_controller=ctrl) as sampler:
        out = asyncio.run(sampler.sample_with_tokens(messages=MESSAGES, n=8, max_tokens=8))
        assert len(out) == 8
    summary = ctrl.step_completed()
    assert summary["requests"] == 8
    assert ctrl.ema_prefill_queue is not None  # it read our prefill_queue_duration
    with docs_sampler(
        vllm_server, tokenizer, concurrency_controller=sdk.FixedConcurrencyController(2)
    ) as sampler:
        assert len(sampler.sample_with_tokens_sync(MESSAGES, n=3, max_tokens=4)) == 3


# -- issue 13's defects, against the engine ---------------------------------------------------


@engine
def test_defect1_repeated_calls_never_share_samples(vllm_server: LocalVLLM, tiny_model_dir: Path) -> None:
    sampler = DeploymentSampler(vllm_server.url, vllm_server.served_model_name, tokenizer=tiny_model_dir)
    a = sampler.sample_with_tokens_sync(MESSAGES, n=4, max_tokens=12, seed=0)
    b = sampler.sample_with_tokens_sync(MESSAGES, n=4, max_tokens=12, seed=1)
    again = sampler.sample_with_tokens_sync(MESSAGES, n=4, max_tokens=12, seed=0)
    seqs = [tuple(c.full_tokens) for c in a + b]
    assert len(set(seqs)) == 8, "seed=0 and seed=1 shared samples"
    assert [c.full_tokens for c in again] == [c.full_tokens for c in a]
    assert sample_seed(0, 1) != sample_seed(1, 0)
    sampler.close()


@engine
def test_defect2_echo_on_generate_is_refused_before_any_request(
    vllm_server: LocalVLLM, tiny_model_dir: Path
) -> None:
    s = DeploymentSampler(
        vllm_server.url, vllm_server.served_model_name, tokenizer=tiny_model_dir, endpoint="generate"
    )
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="endpoint='completions'"):
        s.sample_with_tokens_sync(MESSAGES, max_tokens=4, echo=True, logprobs=True)
    assert time.monotonic() - t0 < 1
    assert s.metrics.attempts == 0
    s.close()


def test_defect3_chat_template_keywords_follow_transformers(tiny_model_dir: Path) -> None:
    from rollstream import ChatTokenizer

    hf = hf_tokenizer(tiny_model_dir)
    ours = ChatTokenizer.from_pretrained(tiny_model_dir)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    for kw in (
        {"add_generation_prompt": True},
        {"add_generation_prompt": False},
        {"add_generation_prompt": False, "continue_final_message": True},
    ):
        text = ours.apply_chat_template(conv, tokenize=False, **kw)
        assert isinstance(text, str), "tokenize=False returns the text"
        assert text == hf.apply_chat_template(conv, tokenize=False, **kw)
        ids = ours.apply_chat_template(conv, tokenize=True, **kw)
        assert ids == list(hf.apply_chat_template(conv, tokenize=True, return_dict=False, **kw))
        d = ours.apply_chat_template(conv, return_dict=True, **kw)
        ref = hf.apply_chat_template(conv, tokenize=True, return_dict=True, **kw)
        assert d["input_ids"] == list(ref["input_ids"])
        assert d["attention_mask"] == list(ref["attention_mask"])
    assert "tokenize" not in ours.apply_chat_template(conv, tokenize=False)
    batch = ours.apply_chat_template([conv, conv[:1]], tokenize=False, add_generation_prompt=True)
    assert batch == [
        hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in (conv, conv[:1])
    ]
    tools = [{"type": "function", "function": {"name": "add", "description": "a+b", "parameters": {}}}]
    assert ours.apply_chat_template(conv[:1], tools=tools, tokenize=False) == hf.apply_chat_template(
        conv[:1], tools=tools, tokenize=False, add_generation_prompt=True
    )
    docs = [{"title": "t", "text": "body"}]
    assert ours.apply_chat_template(conv[:1], documents=docs, tokenize=False) == hf.apply_chat_template(
        conv[:1], documents=docs, tokenize=False, add_generation_prompt=True
    )
    with pytest.raises(TypeError, match="return_tensors"):
        ours.apply_chat_template(conv, return_tensors="pt")


@engine
def test_defect4_cache_hit_rate_is_absent_when_the_server_reports_nothing(
    vllm_server: LocalVLLM, tiny_model_dir: Path
) -> None:
    for ctrl in (AdaptiveConcurrencyController(), FixedConcurrencyController(4)):
        with DeploymentSampler(
            vllm_server.url,
            vllm_server.served_model_name,
            tokenizer=tiny_model_dir,
            concurrency_controller=ctrl,
        ) as s:
            # The same prompt twice: vLLM reuses the prefix but does not say so here.
            s.sample_with_tokens_sync(MESSAGES, n=2, max_tokens=4)
            s.sample_with_tokens_sync(MESSAGES, n=2, max_tokens=4)
            assert all(m.cached_prompt_tokens is None for m in s.drain_metrics())
        summary = ctrl.step_completed()
        assert summary["requests"] == 4
        assert "cache_hit_rate" not in summary, summary


@engine
def test_defect5_long_prompts_do_not_read_as_queueing(vllm_server: LocalVLLM, tiny_model_dir: Path) -> None:
    """The generate endpoint reports no queue time: the controller falls back
    to time to first token. Short and long prompts alternate, one request at
    a time, so nothing queues; only the long prompts' prefill makes their
    first token later. Replayed into two controllers, the measurements shrink
    the window when the prompt lengths are withheld (the defect: every long
    prompt reads as queueing) and must not when they are given."""
    short = [1, 2, 3, 4] * 4
    long = [int(x) for x in np.random.default_rng(0).integers(1000, 100_000, 1900)]
    with DeploymentSampler(
        vllm_server.url,
        vllm_server.served_model_name,
        endpoint="generate",
        concurrency_controller=FixedConcurrencyController(1),
    ) as s:
        for i in range(24):
            # A fresh cache salt: no prefix reuse, every long prompt is prefilled in full.
            s.sample_with_prompt_tokens_sync(long if i % 2 else short, max_tokens=2, prompt_cache_max_len=0)
        measured = [(m.prompt_tokens, m.client_ttft) for m in s.drain_metrics()]
    assert all(n is not None and t is not None for n, t in measured)
    fastest = min(t for _, t in measured if t is not None)
    long_excess = float(np.mean([t - fastest for n, t in measured if n and n > 1000 and t is not None]))
    target = long_excess / 3

    def replay(with_lengths: bool) -> tuple[dict[str, float], int]:
        ctrl = AdaptiveConcurrencyController(
            initial_window=8, prefill_queue_target=target, adjustment_interval=4
        )
        for n, t in measured:
            asyncio.run(ctrl.acquire())
            ctrl.release(
                ServerMetrics(client_ttft=t, prompt_tokens=n if with_lengths else None, http_status_code=200)
            )
        return ctrl.step_completed(), ctrl.window_size

    defect, _ = replay(with_lengths=False)
    assert defect["shrinks"] >= 1, (defect, measured)
    fixed, window = replay(with_lengths=True)
    assert fixed["shrinks"] == 0, (fixed, measured)
    assert window > 8


@engine
def test_logprobs_mode_is_read_from_the_server_and_no_warning_for_processed(
    vllm_server: LocalVLLM, tiny_model_dir: Path
) -> None:
    with DeploymentSampler(vllm_server.url, vllm_server.served_model_name, tokenizer=tiny_model_dir) as s:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            (c,) = s.sample_with_tokens_sync(MESSAGES, max_tokens=4, logprobs=True, top_k=5, temperature=0.7)
        assert s._control.known_logprobs_mode(vllm_server.url) == (True, "processed_logprobs")
    assert c.sampling_logprobs == c.inference_logprobs
