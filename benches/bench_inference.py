"""InferenceEngineClient (issue 11) against one real vLLM CPU server: client
CPU per request and per streamed token through the client versus the
DeploymentSampler it wraps and ``openai.AsyncOpenAI``, at concurrency 8 and
32; the time from ``resume_generation()`` to the first new token; and the
cost of one routing decision at 64 engines and 10k sessions.

CPU is this process's (all threads) user+system time, so the engine's work
is not counted. Every implementation gets the same requests, a warm-up
round, then ROUNDS rounds, and is reported by its best round (the
``_timing`` rule). The goal: at most 10 us of client CPU per streamed token
through the client at 32 concurrent streams, and routing that costs nothing
measurable beside it.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from _openai_ref import openai_stream
from _timing import ROUNDS, best_of

from rollstream import DeploymentSampler, FixedConcurrencyController
from rollstream.inference import InferenceEngineClient
from rollstream.routing import EnginePool
from rollstream.testing import LocalVLLM

PROMPT = [151644, 872, 198, 9707, 0, 2585, 525, 498, 3351, 30, 151645, 198, 151644, 77091, 198]
MAX_TOKENS = 64
CONCURRENCY = [8, 32]
RESUME_ROUNDS = 10
ENGINES = 64
SESSIONS = 10_000

#: requests -> completion tokens, on one open client at a fixed concurrency.
Run = Callable[[int], Awaitable[int]]
Make = Callable[[LocalVLLM, int], Any]

#: Client CPU per token at c=32 (test (a)), for the routing comparison.
_PER_TOKEN: dict[str, float] = {}


def _params(i: int) -> dict[str, Any]:
    return {"max_tokens": MAX_TOKENS, "ignore_eos": True, "logprobs": 0, "seed": i}


def _client(server: LocalVLLM, conc: int, endpoint: str = "generate") -> InferenceEngineClient:
    return InferenceEngineClient(
        [server.url],
        model_name=server.served_model_name,
        endpoint=endpoint,  # type: ignore[arg-type]
        concurrency_controller=FixedConcurrencyController(conc),
    )


def _client_sample(endpoint: str) -> Make:
    @asynccontextmanager
    async def make(server: LocalVLLM, conc: int) -> AsyncIterator[Run]:
        client = _client(server, conc, endpoint)

        async def run(requests: int) -> int:
            outs = await asyncio.gather(
                *(client.sample_completions(PROMPT, 1, _params(i)) for i in range(requests))
            )
            return sum(c.completion_len for o in outs for c in o)

        try:
            yield run
        finally:
            await client.teardown()

    return make


@asynccontextmanager
async def _client_generate(server: LocalVLLM, conc: int) -> AsyncIterator[Run]:
    """SkyRL's batch call: one ``generate`` of ``requests`` prompts (one
    sampling_params for the batch, so no per-request seed)."""
    client = _client(server, conc)
    params = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "logprobs": 0}

    async def run(requests: int) -> int:
        out = await client.generate({"prompt_token_ids": [PROMPT] * requests, "sampling_params": params})
        return sum(len(ids) for ids in out["response_ids"])

    try:
        yield run
    finally:
        await client.teardown()


def _direct(endpoint: str) -> Make:
    @asynccontextmanager
    async def make(server: LocalVLLM, conc: int) -> AsyncIterator[Run]:
        s = DeploymentSampler(
            server.url,
            server.served_model_name,
            endpoint=endpoint,  # type: ignore[arg-type]
            concurrency_controller=FixedConcurrencyController(conc),
        )

        async def run(requests: int) -> int:
            outs = await asyncio.gather(
                *(
                    s.sample_with_prompt_tokens(
                        PROMPT, max_tokens=MAX_TOKENS, logprobs=True, ignore_eos=True, seed=i
                    )
                    for i in range(requests)
                )
            )
            return sum(c.completion_len for o in outs for c in o)

        try:
            yield run
        finally:
            await s.aclose()

    return make


@asynccontextmanager
async def _openai(server: LocalVLLM, conc: int) -> AsyncIterator[Run]:
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600.0)
    sem = asyncio.Semaphore(conc)

    async def one(i: int) -> int:
        async with sem:
            return await openai_stream(client, server.served_model_name, PROMPT, MAX_TOKENS, i)

    async def run(requests: int) -> int:
        return sum(await asyncio.gather(*(one(i) for i in range(requests))))

    try:
        yield run
    finally:
        await client.close()


@dataclass(frozen=True)
class Row:
    cpu: float
    wall: float
    tokens: int
    requests: int

    @property
    def per_token(self) -> float:
        return self.cpu / self.tokens

    @property
    def per_request(self) -> float:
        return self.cpu / self.requests


def _measure(make: Make, server: LocalVLLM, conc: int) -> Row:
    """The best of ROUNDS rounds (by CPU per token) after one warm-up round,
    all on one open client."""
    requests = max(2 * conc, 8)

    async def go() -> Row:
        async with make(server, conc) as run:
            await run(conc)  # warm-up: connections, the logprobs-mode lookup
            best: Row | None = None
            for _ in range(ROUNDS):
                gc.collect()
                cpu0, t0 = time.process_time(), time.perf_counter()
                tokens = await run(requests)
                row = Row(time.process_time() - cpu0, time.perf_counter() - t0, tokens, requests)
                assert tokens == requests * MAX_TOKENS, (tokens, requests)
                if best is None or row.per_token < best.per_token:
                    best = row
            assert best is not None
            return best

    return asyncio.run(go())


IMPLEMENTATIONS: list[tuple[str, Make]] = [
    ("client.sample_completions (generate)", _client_sample("generate")),
    ("client.generate batch     (generate)", _client_generate),
    ("DeploymentSampler direct  (generate)", _direct("generate")),
    ("client.sample_completions (complet.)", _client_sample("completions")),
    ("DeploymentSampler direct  (complet.)", _direct("completions")),
    ("openai.AsyncOpenAI stream (complet.)", _openai),
]


def test_client_cpu_per_token(server: LocalVLLM, report: Any) -> None:
    report.add(
        f"InferenceEngineClient CPU, one CPU engine, {MAX_TOKENS} tokens/request, logprobs on "
        f"(best of {ROUNDS}; goal <= 10 us/token at c=32):"
    )
    for conc in CONCURRENCY:
        rows = {name: _measure(make, server, conc) for name, make in IMPLEMENTATIONS}
        for name, row in rows.items():
            report.add(
                f"  c={conc:<3} {name:<37} {row.per_token * 1e6:7.1f} us CPU/token"
                f" {row.per_request * 1e6:8.0f} us CPU/request  {row.tokens / row.wall:6.0f} tok/s"
            )
        names = list(rows)
        client_gen, batch_gen, direct_gen, client_cmp, direct_cmp, oai = (rows[n].per_token for n in names)
        report.add(
            f"  c={conc:<3} ratios: client/direct {client_gen / direct_gen:4.2f}x (generate),"
            f" {client_cmp / direct_cmp:4.2f}x (completions); generate batch/direct"
            f" {batch_gen / direct_gen:4.2f}x; openai/client {oai / client_cmp:4.1f}x (completions),"
            f" {oai / client_gen:4.1f}x (vs client on generate)"
        )
        if conc == 32:
            _PER_TOKEN.update(client=client_gen, direct=direct_gen)


class FirstTokens:
    """Instrumentation: the perf_counter time of every attempt's first token
    (the transport's ``first_token_s`` is measured from the send)."""

    def __init__(self, client: InferenceEngineClient) -> None:
        self.times: list[float] = []
        transport = client._sampler._transport
        inner = transport.stream

        async def stream(url: str, headers: Any, body: bytes, **kw: Any) -> Any:
            t = time.perf_counter()
            out = await inner(url, headers, body, **kw)
            if out.ok and out.first_token_s:
                self.times.append(t + out.first_token_s)
            return out

        transport.stream = stream  # type: ignore[method-assign]


async def _resume_round(client: InferenceEngineClient, first: FirstTokens, held: int) -> tuple[float, ...]:
    """Pause (keep), hold ``held`` requests in the client, resume: seconds
    from the resume call to the first new token, to the resume call's
    return, and to the last result."""
    await client.pause_generation("keep")
    params = {"max_tokens": 1, "ignore_eos": True, "logprobs": 0}
    tasks = [asyncio.ensure_future(client.sample_completions(PROMPT, 1, params)) for _ in range(held)]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in tasks), "a request went through while the client was paused"
    first.times.clear()
    t0 = time.perf_counter()
    await client.resume_generation()
    resumed = time.perf_counter()
    await asyncio.gather(*tasks)
    end = time.perf_counter()
    return min(first.times) - t0, resumed - t0, end - t0


async def _unpaused_round(client: InferenceEngineClient, first: FirstTokens, held: int) -> float:
    params = {"max_tokens": 1, "ignore_eos": True, "logprobs": 0}
    first.times.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(client.sample_completions(PROMPT, 1, params) for _ in range(held)))
    return min(first.times) - t0


def test_resume_to_first_token(server: LocalVLLM, report: Any) -> None:
    report.add(
        f"resume_generation() to the first new token, requests held by the paused client "
        f"(keep mode), median of {RESUME_ROUNDS}:"
    )

    async def go(held: int) -> tuple[list[tuple[float, ...]], list[float]]:
        client = _client(server, max(held, 8))
        first = FirstTokens(client)
        try:
            await _unpaused_round(client, first, held)  # warm-up
            baseline = [await _unpaused_round(client, first, held) for _ in range(RESUME_ROUNDS)]
            rounds = [await _resume_round(client, first, held) for _ in range(RESUME_ROUNDS)]
        finally:
            await client.teardown()
        return rounds, baseline

    for held in [1, 32]:
        rounds, baseline = asyncio.run(go(held))
        to_first, resume_call, to_end = (statistics.median(x) for x in zip(*rounds, strict=True))
        base = statistics.median(baseline)
        report.add(
            f"  {held:>2} held: {to_first * 1e3:6.1f} ms to the first token (resume_generation() call"
            f" {resume_call * 1e3:5.1f} ms, all results {to_end * 1e3:6.1f} ms); unpaused call to first"
            f" token {base * 1e3:6.1f} ms: the pause adds {(to_first - base) * 1e3:5.1f} ms"
        )


def test_routing_decision_cost(report: Any) -> None:
    urls = [f"http://10.0.{i // 256}.{i % 256}:8000" for i in range(ENGINES)]
    pool = EnginePool(urls)
    sessions = [f"session-{i:05}" for i in range(SESSIONS)]
    for s in sessions:
        route = pool.route_now(s)
        assert route is not None
        pool.release(route)
    n = 10 * SESSIONS

    def sticky() -> None:
        for i in range(n):
            pool.release(pool.route_now(sessions[i % SESSIONS]))

    def no_session() -> None:
        for _ in range(n):
            pool.release(pool.route_now())

    def acquire() -> None:
        async def go() -> None:
            for i in range(n):
                pool.release(await pool.acquire(sessions[i % SESSIONS]))

        asyncio.run(go())

    costs = {
        "route_now(session) + release": best_of(sticky) / n,
        "route_now() + release (no session)": best_of(no_session) / n,
        "await acquire(session) + release": best_of(acquire) / n,
    }
    report.add(
        f"routing decision, EnginePool in Python, {ENGINES} engines, {SESSIONS} sticky sessions"
        f" (best of {ROUNDS}):"
    )
    per_token = _PER_TOKEN.get("client")
    for name, cost in costs.items():
        line = f"  {name:<36} {cost * 1e9:6.0f} ns/decision = {cost / MAX_TOKENS * 1e9:5.1f} ns/token"
        if per_token is not None:
            line += f" ({cost / MAX_TOKENS / per_token:.2%} of the client's CPU/token at c=32)"
        report.add(line)
