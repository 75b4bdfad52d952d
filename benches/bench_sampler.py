"""Client CPU per streamed token: rollstream's DeploymentSampler (Rust data
plane) vs openai.AsyncOpenAI streaming vs the Fireworks SDK's
DeploymentSampler, against the same real vLLM CPU server, at concurrency 1,
8, 32 and 64. CPU is this process's (all threads) user+system time, so the
server's work is not counted; tokens/s is bounded by the 2-core engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _openai_ref import openai_stream

from rollstream import DeploymentSampler, FixedConcurrencyController
from rollstream.testing import LocalVLLM

PROMPT = [151644, 872, 198, 9707, 0, 2585, 525, 498, 3351, 30, 151645, 198, 151644, 77091, 198]
MAX_TOKENS = 64
CONCURRENCY = [1, 8, 32, 64]


def _measure(
    run: Callable[[int, int], Awaitable[int]], conc: int, requests: int | None = None
) -> tuple[float, float, int]:
    requests = requests or max(2 * conc, 8)
    asyncio.run(run(conc, min(conc, 2)))  # warm-up: connections, caches
    cpu0, t0 = time.process_time(), time.perf_counter()
    tokens = asyncio.run(run(conc, requests))
    return time.process_time() - cpu0, time.perf_counter() - t0, tokens


def _rollstream(server: Any, prompt: list[int] = PROMPT) -> Callable[[int, int], Awaitable[int]]:
    async def run(conc: int, requests: int) -> int:
        s = DeploymentSampler(
            server.url, server.served_model_name, concurrency_controller=FixedConcurrencyController(conc)
        )
        try:
            outs = await asyncio.gather(
                *(
                    s.sample_with_prompt_tokens(
                        prompt, max_tokens=MAX_TOKENS, logprobs=True, ignore_eos=True, seed=i
                    )
                    for i in range(requests)
                )
            )
        finally:
            await s.aclose()
        return sum(c.completion_len for o in outs for c in o)

    return run


def _openai(server: Any, prompt: list[int] = PROMPT) -> Callable[[int, int], Awaitable[int]]:
    import openai

    async def run(conc: int, requests: int) -> int:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600.0)
        sem = asyncio.Semaphore(conc)

        async def one(i: int) -> int:
            async with sem:
                return await openai_stream(client, server.served_model_name, prompt, MAX_TOKENS, i)

        try:
            return sum(await asyncio.gather(*(one(i) for i in range(requests))))
        finally:
            await client.close()

    return run


def test_client_cpu_per_token(server: LocalVLLM, report: Any) -> None:
    report.add(
        f"sampling client CPU, tiny model on the CPU engine, {MAX_TOKENS} tokens/request, logprobs on:"
    )
    for conc in CONCURRENCY:
        rows = {}
        for name, make in [
            ("rollstream DeploymentSampler", _rollstream),
            ("openai.AsyncOpenAI stream", _openai),
        ]:
            cpu, wall, tokens = _measure(make(server), conc)
            rows[name] = (cpu, wall, tokens)
        ours_cpu = rows["rollstream DeploymentSampler"][0] / rows["rollstream DeploymentSampler"][2]
        for name, (cpu, wall, tokens) in rows.items():
            per_tok = cpu / tokens
            report.add(
                f"  c={conc:<3} {name:<30} {per_tok * 1e6:8.1f} us CPU/token ({per_tok * 1e3:6.3f} s/1k tok)"
                f"  {tokens / wall:7.0f} tok/s   ratio vs ours {per_tok / ours_cpu:5.1f}x"
            )
    report.add("  " + _fireworks_attempt(server))


def _fireworks_attempt(server: LocalVLLM) -> str:
    """Point the Fireworks SDK's sampler at the same vLLM server and report what happens."""
    try:
        from fireworks.training.sdk import DeploymentSampler as FwSampler
        from fireworks.training.sdk import FixedConcurrencyController as FwFixed
    except Exception as e:  # not installed, or its dependencies are not
        return f"fireworks DeploymentSampler: not importable ({type(e).__name__}: {e})"

    async def run() -> str:
        s = FwSampler(server.url, server.served_model_name, api_key="none", concurrency_controller=FwFixed(1))
        try:
            out = await asyncio.wait_for(s.sample_with_prompt_tokens(PROMPT, max_tokens=8), 20)
            return f"fireworks DeploymentSampler: returned {len(out)} samples"
        except asyncio.TimeoutError:
            return (
                "fireworks DeploymentSampler: no result within 20 s (it POSTs to "
                "/inference/v1/completions, which vLLM does not serve (404), and treats 404 as "
                "'hot-loading': sleeps 5 s x 10 per attempt)"
            )
        except Exception as e:
            return f"fireworks DeploymentSampler: failed against vLLM: {type(e).__name__}: {str(e)[:200]}"

    return asyncio.run(run())


class ReplayServer:
    """Serves a recorded vLLM response (tests/data/streams) as fast as the
    socket takes it, one HTTP chunk per SSE event like vLLM: isolates the
    client's own cost per token from the CPU engine's pace."""

    served_model_name = "tiny-qwen3"
    body_file = (
        Path(__file__).resolve().parent.parent / "tests" / "data" / "streams" / "v2_completion_n1_metrics.sse"
    )

    def __init__(self) -> None:
        events = [e + b"\n\n" for e in self.body_file.read_bytes().split(b"\n\n") if e]
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        self.reply = head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
        self.tokens = 64
        self.prompt = [1, 87, 85, 546, 201, 20, 259]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = next(
                    (int(x.split(b":")[1]) for x in lines if x.lower().startswith(b"content-length")), 0
                )
                await reader.readexactly(length)
                writer.write(self.reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def __enter__(self) -> ReplayServer:
        import threading

        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_client_cpu_per_token_replay(report: Any) -> None:
    """The same clients against the replay server (in a thread of this
    process: its CPU is counted too, identically for both clients)."""
    with ReplayServer() as replay:
        report.add("sampling client CPU, recorded vLLM stream replayed at full speed (64 tokens/request):")
        for conc in [8, 32, 64]:
            rows = {}
            for name, make in [
                ("rollstream DeploymentSampler", _rollstream),
                ("openai.AsyncOpenAI stream", _openai),
            ]:
                cpu, wall, tokens = _measure(make(replay, replay.prompt), conc, requests=conc * 8)
                rows[name] = (cpu, wall, tokens)
            ours = rows["rollstream DeploymentSampler"][0] / rows["rollstream DeploymentSampler"][2]
            for name, (cpu, wall, tokens) in rows.items():
                report.add(
                    f"  c={conc:<3} {name:<30} {cpu / tokens * 1e6:8.1f} us CPU/token"
                    f"  {tokens / wall:8.0f} tok/s"
                    f"   ratio vs ours {cpu / tokens / ours:5.1f}x"
                )
