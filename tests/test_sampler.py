"""DeploymentSampler's failure paths, request building and lifetime, against a
scripted stand-in for vLLM (tests/fake_vllm.py). The real engine is in
test_sampler_engine.py and test_fireworks_compat.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fake_vllm import FakeVLLM, Reply, Request, completion_events, json_reply, sse

from rollstream import (
    DeploymentSampler,
    DeploymentSamplerTimeoutError,
    FixedConcurrencyController,
    RequestRejectedError,
    RetryPolicy,
    SampledCompletion,
    SamplerTimeouts,
    SamplingMaskError,
    SamplingProtocolError,
    SamplingRequestError,
    ServerMetrics,
    TransportClosedError,
    sample_seed,
)
from rollstream._control import parse_mask_reply
from rollstream._http import Transport

PROMPT = [11, 12, 13]
FAST = RetryPolicy(max_attempts=4, base=0.01, cap=0.02)


def ok_stream(tokens: tuple[int, ...] = (5, 6, 7), **kw: Any) -> Reply:
    lps = [-1.0 - i for i in range(len(tokens))]
    return Reply(parts=sse(*completion_events(list(tokens), logprobs=lps, **kw)))


def not_found(req: Request) -> Reply:
    return json_reply({"detail": "Not Found"}, 404)


class Script:
    """Replies to /v1/completions in turn (the last one repeats); anything
    else goes to ``other``."""

    def __init__(self, *replies: Reply, other: Any = not_found) -> None:
        self.replies = list(replies)
        self.other = other
        self.calls = 0

    def __call__(self, req: Request) -> Reply:
        if req.path not in ("/v1/completions", "/inference/v1/generate"):
            return self.other(req)
        reply = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        return reply


@pytest.fixture
def fake() -> Iterator[FakeVLLM]:
    with FakeVLLM(Script(ok_stream())) as server:
        yield server


def sampler(server: FakeVLLM, **kw: Any) -> DeploymentSampler:
    kw.setdefault("retry", FAST)
    kw.setdefault("concurrency_controller", FixedConcurrencyController(8))
    return DeploymentSampler(server.url, "m", **kw)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# -- retry classification (issue 14, reliability 6) -------------------------------


def test_malformed_stream_fails_at_once_with_the_servers_bytes() -> None:
    bad = Reply(parts=[b'data: {"choices":[{"index":0,"token_ids":[1,}]}\n\n', b"data: [DONE]\n\n"])
    with FakeVLLM(Script(bad)) as server, sampler(server) as s:
        t0 = time.monotonic()
        with pytest.raises(SamplingProtocolError) as info:
            run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3))
        assert time.monotonic() - t0 < 5
        assert len(server.posts("/v1/completions")) == 1, "a deterministic error must not be retried"
    err = info.value
    assert "token_ids" in err.excerpt
    assert err.excerpt in str(err)
    assert err.attempts == 1
    assert err.final_error_kind == "protocol"
    assert [a.outcome for a in err.server_attempts] == ["failed"]
    assert s.metrics.retries == 0


def test_inconsistent_reply_fails_at_once() -> None:
    # Two logprobs for three tokens: the same request would get the same reply.
    events = completion_events([5, 6, 7], logprobs=[-1.0, -2.0, -3.0])
    del events[2]["choices"][0]["logprobs"]
    with FakeVLLM(Script(Reply(parts=sse(*events)))) as server, sampler(server) as s:
        with pytest.raises(SamplingProtocolError, match="2 logprobs for 3"):
            run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3, logprobs=True))
        assert len(server.posts("/v1/completions")) == 1


def test_truncation_and_retryable_statuses_are_retried() -> None:
    cut = Reply(parts=[p for p in sse(*completion_events([5, 6, 7]))[:2]], complete=True)  # no [DONE]
    busy = json_reply({"error": {"message": "queue full"}}, 503)
    busy.headers["retry-after"] = "0"
    with FakeVLLM(Script(cut, busy, ok_stream())) as server, sampler(server) as s:
        (c,) = run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3))
        assert c.completion_ids.tolist() == [5, 6, 7]
        assert c.attempts == 3
        assert s.metrics.retry_reasons == {"truncated": 1, "http_503": 1}
        records = s.drain_metrics()
    assert [m.error is None for m in records] == [False, False, True]
    assert records[1].http_status_code == 503
    assert all(isinstance(m, ServerMetrics) for m in records)


def test_client_errors_fail_at_once_with_the_servers_message() -> None:
    bad = json_reply({"error": {"message": "max_tokens is too large", "code": 400}}, 400)
    with FakeVLLM(Script(bad)) as server, sampler(server) as s:
        with pytest.raises(RequestRejectedError) as info:
            run(s.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=3))
        assert len(server.posts("/v1/completions")) <= 2
    err = info.value
    assert isinstance(err, (SamplingRequestError, RuntimeError, ValueError))
    assert err.status == 400 == err.final_status
    assert err.server_message == "max_tokens is too large"
    assert err.logical_request_id is not None
    record = err.as_error_record()
    assert record["final_status"] == 400
    assert "prompt" not in json.dumps(record)


def test_exhausted_timeouts_raise_the_timeout_error_with_a_diagnostic() -> None:
    stall = Reply(parts=[b": keep-alive\n\n"], hang=3.0)
    with FakeVLLM(Script(stall)) as server:
        s = sampler(server, retry=RetryPolicy(max_attempts=2, base=0.01, cap=0.01))
        with pytest.raises(DeploymentSamplerTimeoutError) as info:
            run(
                s.sample_with_prompt_tokens(
                    PROMPT,
                    max_tokens=3,
                    http_timeout=0.3,
                    timeout_diagnostic_context={"workload": "rl_rollout"},
                    sampling_context={"step": 7, "payload": "never"},
                )
            )
        s.close()
    err = info.value
    assert err.attempts == 2
    assert err.final_error_kind == "timeout"
    assert err.retry_budget_exhausted
    assert err.context == {"step": 7}
    assert "workload=rl_rollout" in str(err)
    assert "http_timeout=0.3s" in str(err)


# -- transport close (issue 14, reliability 4) -----------------------------------


@pytest.mark.parametrize("scheme", ["rust", "closed-before"])
def test_transport_close_fails_requests_in_flight(scheme: str) -> None:
    hang = Reply(parts=sse(*completion_events([1]))[:1], hang=30.0)
    with FakeVLLM(Script(hang)) as server:
        transport = Transport()

        async def go() -> Any:
            if scheme == "closed-before":
                await transport.aclose()
            task = asyncio.ensure_future(
                transport.stream(server.url + "/v1/completions", [], b"{}", idle_timeout=60, total_timeout=60)
            )
            await asyncio.sleep(0.3)
            # Another thread closes it, as an atexit hook or a trainer shutting down would.
            threading.Thread(target=transport.close).start()
            return await asyncio.wait_for(task, 5)

        outcome = run(go())
    assert not outcome.ok
    assert outcome.kind == "closed"


def test_closing_the_sampler_fails_its_requests_with_a_typed_error() -> None:
    hang = Reply(parts=sse(*completion_events([1]))[:1], hang=30.0)
    with FakeVLLM(Script(hang)) as server:
        s = sampler(server)

        async def go() -> None:
            task = asyncio.ensure_future(s.sample_with_prompt_tokens(PROMPT, n=3, max_tokens=3))
            await asyncio.sleep(0.3)
            s.close()
            await asyncio.wait_for(task, 5)

        with pytest.raises(TransportClosedError):
            run(go())
        with pytest.raises(TransportClosedError):
            run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3))
        assert s.concurrency_controller.in_flight == 0


# -- sampling masks from the worker extension (issue 14, reliability 7) ----------


def _mask_entry(rows: list[list[int]]) -> dict[str, Any]:
    offs = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=offs[1:])
    ids = np.array([t for r in rows for t in r], np.int32)
    return {
        "rows": len(rows),
        "untruncated_rows": 0,
        "token_ids": base64.b64encode(ids.tobytes()).decode(),
        "offsets": base64.b64encode(offs.tobytes()).decode(),
    }


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b'{"results": []}', "no per-worker results"),
        (b'{"results": [{}]}', "does not mention key"),
        (b'{"results": [{"k": null}]}', "recorded no sampling mask"),
        (b'{"results": [{"k": [1, 2]}]}', "expected an object"),
        (b'{"results": [{"k": {"untruncated_rows": 0, "offsets": "AAAA"}}]}', "token_ids"),
        (b'{"results": [{"k": {"untruncated_rows": 0, "token_ids": "!!", "offsets": ""}}]}', "not base64"),
        (
            b'{"results": [{"k": {"untruncated_rows": 0, "token_ids": "AAA=", "offsets": ""}}]}',
            "whole number",
        ),
        (
            b'{"results": [{"k": {"untruncated_rows": 2, "token_ids": "", "offsets": ""}}]}',
            "without truncation",
        ),
        (b'{"results": [{"k": {"untruncated_rows": "x", "token_ids": "", "offsets": ""}}]}', "not a count"),
    ],
)
def test_malformed_mask_replies_raise_typed_errors(body: bytes, fragment: str) -> None:
    with pytest.raises(SamplingMaskError, match=fragment) as info:
        parse_mask_reply(body, "k", "req-1")
    assert info.value.request_id == "req-1"


def test_inconsistent_mask_offsets_raise_typed_errors() -> None:
    entry = _mask_entry([[1, 2], [3]])
    entry["offsets"] = base64.b64encode(np.array([0, 5, 3], np.int64).tobytes()).decode()
    body = json.dumps({"results": [{"k": entry}]}).encode()
    with pytest.raises(SamplingMaskError, match="inconsistent"):
        parse_mask_reply(body, "k", "req-1")


def masks_server(entry: Any, calls: list[str]) -> Any:
    def other(req: Request) -> Reply:
        if req.path == "/collective_rpc":
            key = req.body["kwargs"]["keys"][0]
            calls.append(key)
            return json_reply({"results": [{key: entry}]})
        return not_found(req)

    return other


def test_masks_come_from_the_route_that_served_the_attempt_on_every_loop() -> None:
    keys: list[str] = []
    entry = _mask_entry([[5, 9], [6], [7, 1, 2]])
    with FakeVLLM(Script(ok_stream(), other=masks_server(entry, keys))) as server:
        s = sampler(server)
        # Two event loops one after the other (each *_sync call runs its own).
        for _ in range(2):
            (c,) = s.sample_with_prompt_tokens_sync(PROMPT, max_tokens=3, top_k=3, sampling_mask=True)
            assert c.sampling_mask is not None
            assert c.sampling_mask.rows == 3
        assert s.mask_path == "plugin"
        bodies = server.posts("/v1/completions")
        assert [b.body["vllm_xargs"]["rollstream_mask_id"] for b in bodies] == keys
        s.close()


def test_a_broken_mask_reply_fails_the_sample_with_a_typed_error() -> None:
    keys: list[str] = []
    with (
        FakeVLLM(Script(ok_stream(), other=masks_server({"token_ids": 3}, keys))) as server,
        sampler(server) as s,
        pytest.raises(SamplingMaskError, match="token_ids"),
    ):
        run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3, top_k=3, sampling_mask=True))


# -- the endpoint pool (the multi-replica seam) -----------------------------------


class RecordingPool:
    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[str, Any]] = []

    async def acquire(self, session: str | None) -> Any:
        self.events.append(("acquire", session))

        class R:
            url = self.url

        return R()

    def release(self, route: Any, *, ok: bool) -> None:
        self.events.append(("release", ok))


def test_every_attempt_acquires_and_releases_a_route_once() -> None:
    refused = Reply(status=200, parts=[b"data: {broken\n\n"])  # deterministic: fails at once
    cut = Reply(parts=sse(*completion_events([5]))[:1], complete=False)
    keys: list[str] = []
    entry = _mask_entry([[5], [6], [7]])
    with FakeVLLM(Script(cut, ok_stream(), refused, other=masks_server(entry, keys))) as server:
        pool = RecordingPool(server.url)
        s = DeploymentSampler("pool://replicas", "m", pool=pool, retry=FAST)
        (c,) = run(
            s.sample_with_prompt_tokens(
                PROMPT, max_tokens=3, prompt_cache_key="conv-7", top_k=2, sampling_mask=True
            )
        )
        assert c.completion_len == 3
        assert keys, "the mask was fetched from the route"
        assert pool.events == [
            ("acquire", "conv-7"),
            ("release", False),
            ("acquire", "conv-7"),
            ("release", True),
        ]
        pool.events.clear()
        with pytest.raises(SamplingProtocolError):
            run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3, session="explicit"))
        assert pool.events == [("acquire", "explicit"), ("release", True)]
        for req in server.posts("/v1/completions"):
            assert "prompt_cache_key" not in req.body
            assert "session" not in req.body
        s.close()


# -- what a call sends -------------------------------------------------------------


def test_reference_arguments_are_honoured_not_forwarded(fake: FakeVLLM) -> None:
    s = sampler(fake, additional_headers={"x-team": "rl"})
    run(
        s.sample_with_prompt_tokens(
            PROMPT,
            max_tokens=3,
            prompt_cache_key="session-1",
            additional_headers_snapshot={"x-snapshot": "1"},
            http_timeout=120,
            include_routing_matrix=True,
            prompt_cache_max_len=0,
            sampling_context={"run": "r1"},
            timeout_diagnostic_context={"workload": "eval"},
            r3_ttl_seconds=60,
            repetition_penalty=1.1,  # unknown to rollstream: verbatim
        )
    )
    run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3))
    first, second = fake.posts("/v1/completions")
    for key in (
        "prompt_cache_key",
        "additional_headers_snapshot",
        "http_timeout",
        "include_routing_matrix",
        "prompt_cache_max_len",
        "sampling_context",
        "timeout_diagnostic_context",
        "r3_ttl_seconds",
        "echo_last",
    ):
        assert key not in first.body, key
    assert first.body["repetition_penalty"] == 1.1
    assert first.body["cache_salt"], "prompt_cache_max_len=0: no prefix reuse"
    assert "cache_salt" not in second.body
    assert first.headers.get("x-snapshot") == "1"
    assert "x-team" not in first.headers
    assert second.headers.get("x-team") == "rl"
    assert "x-snapshot" not in second.headers
    assert first.body["top_k"] == 0
    assert first.body["top_p"] == 1.0
    s.close()


def test_per_sample_seeds_never_collide_across_calls(fake: FakeVLLM) -> None:
    """Defect 1: ``seed + i`` made seed=0 and seed=1 share three of four samples."""
    s = sampler(fake)
    run(s.sample_with_prompt_tokens(PROMPT, n=4, max_tokens=3, seed=0))
    run(s.sample_with_prompt_tokens(PROMPT, n=4, max_tokens=3, seed=1))
    run(s.sample_with_prompt_tokens(PROMPT, n=4, max_tokens=3, seed=0))
    seeds = [r.body["seed"] for r in fake.posts("/v1/completions")]
    first, second, again = seeds[:4], seeds[4:8], seeds[8:]
    assert not set(first) & set(second)
    assert sorted(first) == sorted(again), "the same call is reproducible"
    assert sorted(first) == sorted(sample_seed(0, i) for i in range(4))
    s.close()


def test_sample_seed_is_injective_and_in_range() -> None:
    seen = {sample_seed(seed, i) for seed in range(300) for i in range(64)}
    assert len(seen) == 300 * 64
    big = [sample_seed(s, i) for s in (2**40, -5, 2**70) for i in range(8)]
    assert all(0 <= x < 2**63 for x in seen | set(big))
    assert sample_seed(7, 3) == sample_seed(np.int64(7), 3)  # type: ignore[arg-type]


def test_echo_on_the_generate_endpoint_is_refused_up_front() -> None:
    """Defect 2: it ended in RetriesExhaustedError after six generations."""
    s = DeploymentSampler("http://127.0.0.1:9", "m", endpoint="generate")
    for kw in ({"echo": True}, {"echo_last": 3}):
        with pytest.raises(ValueError, match="endpoint='completions'"):
            run(s.sample_with_prompt_tokens(PROMPT, **kw))
    assert s.metrics.attempts == 0
    s.close()


def test_bad_arguments_name_the_value() -> None:
    s = DeploymentSampler("http://127.0.0.1:9", "m")
    for kw, fragment in [
        ({"http_timeout": -1}, "http_timeout=-1"),
        ({"echo_last": -2}, "echo_last"),
        ({"prompt_cache_max_len": "all"}, "prompt_cache_max_len"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"sampling_context": ["x"]}, "sampling_context"),
    ]:
        with pytest.raises((ValueError, TypeError), match=fragment):
            run(s.sample_with_prompt_tokens(PROMPT, **kw))
    with pytest.raises(ValueError, match="exhaust max_seq_len"):
        run(s.sample_with_prompt_tokens_result(PROMPT, max_seq_len=3))
    s.close()


# -- what comes back ------------------------------------------------------------------


def test_warns_once_when_the_server_runs_raw_logprobs() -> None:
    def other(req: Request) -> Reply:
        if req.path.startswith("/server_info"):
            return json_reply({"vllm_config": {"model_config": {"logprobs_mode": "raw_logprobs"}}})
        return not_found(req)

    with FakeVLLM(Script(ok_stream(), other=other)) as server, sampler(server) as s:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            (truncated,) = run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3, logprobs=True, top_k=5))
            (full,) = run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3, logprobs=True))
        mode_warnings = [w for w in record if issubclass(w.category, RuntimeWarning)]
        assert len(mode_warnings) == 1
        assert "raw_logprobs" in str(mode_warnings[0].message)
        assert len(server.posts("/server_info")) == 1
    assert truncated.inference_logprobs == [-1.0, -2.0, -3.0]
    assert truncated.sampling_logprobs == [None, None, None]
    assert full.sampling_logprobs == full.inference_logprobs


def test_no_warning_when_the_server_does_not_say(fake: FakeVLLM) -> None:
    with sampler(fake) as s, warnings.catch_warnings():
        warnings.simplefilter("error")
        (c,) = run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3, logprobs=True, top_k=5))
    assert c.sampling_logprobs == c.inference_logprobs


def _npy_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def test_routing_matrices_in_the_reference_form() -> None:
    prompt_len, comp = len(PROMPT), 3
    experts = np.arange((prompt_len + comp - 1) * 2 * 2, dtype=np.int32).reshape(-1, 2, 2)
    events: list[dict[str, Any]] = []
    for i, t in enumerate([5, 6, 7]):
        choice: dict[str, Any] = {
            "index": 0,
            "token_ids": [t],
            "finish_reason": "length" if i == 2 else None,
            "logprobs": {"content": [{"token_id": t, "logprob": -1.0, "rank": 1, "top_logprobs": []}]},
        }
        if i == 2:
            choice["routed_experts"] = _npy_b64(experts)
        events.append({"request_id": "g", "choices": [choice]})
    stream = Reply(parts=sse(*events))
    with FakeVLLM(Script(stream)) as server:
        s = sampler(server, endpoint="generate")
        (c,) = run(
            s.sample_with_prompt_tokens(PROMPT, max_tokens=3, logprobs=True, include_routing_matrix=True)
        )
        (plain,) = run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3, logprobs=True))
        s.close()
    assert c.routed_experts is not None
    assert c.routed_experts.shape == (5, 2, 2)
    assert c.routing_matrices is not None
    assert len(c.routing_matrices) == len(c.inference_logprobs or []) == 3
    # Completion token j was predicted at position prompt_len - 1 + j.
    for j, b64 in enumerate(c.routing_matrices):
        row = np.frombuffer(base64.b64decode(b64), dtype="<i2").reshape(2, 2)
        assert (row == experts[prompt_len - 1 + j]).all()
    assert plain.routing_matrices is None
    assert plain.routed_experts is not None


def test_sampled_completion_constructor_defaults_and_equality() -> None:
    a = SampledCompletion("hi", [1, 2, 3], 2)
    assert (a.finish_reason, a.completion_len, a.inference_logprobs, a.sampling_logprobs) == (
        "unknown",
        0,
        None,
        None,
    )
    assert (a.logprobs_echoed, a.routing_matrices, a.echoed_prompt_logprob_count) == (False, None, 0)
    assert (a.inference_topk_token_ids, a.inference_topk_logprobs) == (None, None)
    b = SampledCompletion("hi", [1, 2, 3], 2, completion_ids=np.array([3], np.int64))
    c = SampledCompletion("hi", [1, 2, 3], 2, completion_ids=np.array([3], np.int64))
    assert b == c
    assert a != b
    lps = np.array([np.nan, -1.0], np.float32)
    assert SampledCompletion("x", [1], 1, completion_logprobs=lps) == SampledCompletion(
        "x", [1], 1, completion_logprobs=lps.copy()
    )
    with pytest.raises(TypeError):
        hash(a)


def test_result_api_and_drained_metrics(fake: FakeVLLM) -> None:
    s = sampler(fake)
    r = run(
        s.sample_with_prompt_tokens_result(PROMPT, max_tokens=3, logical_request_id="req-42", logprobs=True)
    )
    assert r.logical_request_id == "req-42"
    assert r.attempts == 1
    assert len(r.completions) == 1
    assert r.upstream_response_id == "cmpl-fake"
    assert [a.outcome for a in r.server_attempts] == ["succeeded"]
    assert fake.posts("/v1/completions")[0].headers["x-request-id"] == "req-42"
    (m,) = s.drain_metrics()
    assert m == r.server_metrics
    assert m.cached_prompt_tokens is None  # unknown, not zero (defect 4)
    assert s.drain_metrics() == []
    assert s.drain_counters().samples == 1
    assert s.metrics.samples == 0
    body, metrics = run(s.async_completions_stream(PROMPT, max_tokens=3, logprobs=True, top_logprobs=1))
    choice = body["choices"][0]
    assert choice["raw_output"]["completion_token_ids"] == [5, 6, 7]
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [-1.0, -2.0, -3.0]
    assert metrics.http_status_code == 200
    s.close()


# -- lifetime across event loops and worlds ------------------------------------------------


def test_sync_with_async_with_and_many_loops(fake: FakeVLLM) -> None:
    with sampler(fake) as s:
        assert len(s.sample_with_prompt_tokens_sync(PROMPT, max_tokens=3, logprobs=True)) == 1
        assert len(s.sample_with_prompt_tokens_sync(PROMPT, max_tokens=3, logprobs=True)) == 1
        results: list[int] = []

        def other_thread() -> None:
            results.append(len(asyncio.run(s.sample_with_prompt_tokens(PROMPT, max_tokens=3, logprobs=True))))

        threads = [threading.Thread(target=other_thread) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [1, 1, 1]
    assert s.closed

    async def scoped() -> int:
        async with sampler(fake) as s2:
            return len(await s2.sample_with_prompt_tokens(PROMPT, max_tokens=3))

    assert run(scoped()) == 1


def test_sync_wrappers_refuse_a_running_loop(fake: FakeVLLM) -> None:
    async def inside() -> None:
        with sampler(fake) as s:
            s.sample_with_prompt_tokens_sync(PROMPT, max_tokens=3)

    with pytest.raises(RuntimeError, match="inside an event loop"):
        run(inside())


def test_a_reference_controller_works_or_is_refused_clearly(fake: FakeVLLM) -> None:
    from _require import reference_sdk

    sdk = reference_sdk()
    for ctrl in (sdk.AdaptiveConcurrencyController(initial_window=4), sdk.FixedConcurrencyController(4)):
        with sampler(fake, concurrency_controller=ctrl) as s:
            out = run(s.sample_with_prompt_tokens(PROMPT, n=3, max_tokens=3))
            assert len(out) == 3
            summary = ctrl.step_completed()
            assert summary["window"] >= 1
    with pytest.raises(TypeError, match="controller protocol"):
        DeploymentSampler(fake.url, "m", concurrency_controller=object())


def test_timeouts_are_validated() -> None:
    with pytest.raises(ValueError, match="idle"):
        SamplerTimeouts(idle=0)
    with pytest.raises(TypeError, match="timeout"):
        DeploymentSampler("http://127.0.0.1:9", "m", timeout="soon")  # type: ignore[arg-type]


def test_loop_local_clients_are_never_shared_across_loops() -> None:
    from rollstream._http import LoopLocal

    made: list[object] = []

    def factory() -> object:
        made.append(object())
        return made[-1]

    per_loop: LoopLocal[object] = LoopLocal(factory)

    async def twice() -> tuple[object, object]:
        return per_loop.get(), per_loop.get()

    a1, a2 = asyncio.run(twice())
    b1, _ = asyncio.run(twice())
    assert a1 is a2, "one object per loop"
    assert b1 is not a1, "a new loop gets its own"
    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(asyncio.run(twice())[0]))
    t.start()
    t.join(10)
    assert results[0] not in (a1, b1)
    assert len(per_loop.take_all()) <= 3
