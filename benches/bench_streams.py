"""Stream decoding: rollstream's Rust decoder vs openai-python's SSE decoder
and the Fireworks SDK's ``_sse.py`` (each followed by ``json.loads`` and
extraction of token ids and logprobs into Python lists).

Input: the recorded vLLM bodies in ``tests/data/streams``, replicated to
~50 MB (one fresh decoder per replica, like one response each), fed in
16 KiB chunks.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from _timing import ROUNDS, best_of, pedantic_best

import rollstream

STREAMS = Path(__file__).resolve().parent.parent / "tests" / "data" / "streams"
CHUNK = 16 * 1024
TARGET_BYTES = 50 * 1024 * 1024


def _chunks(body: bytes) -> list[bytes]:
    return [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]


def _extract(payload: dict[str, Any], acc: dict[int, dict[str, list[Any]]]) -> None:
    """What a client needs from each event: ids, sampled logprobs, top logprobs."""
    for ch in payload.get("choices") or ():
        a = acc.setdefault(ch["index"], {"ids": [], "lps": [], "top": []})
        a["ids"].extend(ch.get("token_ids") or ())
        lp = ch.get("logprobs")
        if lp:
            if "token_logprobs" in lp:
                a["lps"].extend(lp["token_logprobs"])
                a["top"].extend(lp.get("top_logprobs") or ())
            else:
                for e in lp.get("content") or ():
                    a["lps"].append(e["logprob"])
                    a["top"].append(e.get("top_logprobs"))


def decode_rollstream(chunks: list[bytes]) -> int:
    dec = rollstream.StreamDecoder()
    for c in chunks:
        dec.feed(c)
    res = dec.finish()
    return sum(len(c.token_ids) for c in res.choices)


def decode_openai(chunks: list[bytes]) -> int:
    from openai._streaming import SSEDecoder

    acc: dict[int, dict[str, list[Any]]] = {}
    for sse in SSEDecoder().iter_bytes(iter(chunks)):
        if sse.data == "[DONE]":
            break
        _extract(json.loads(sse.data), acc)
    return sum(len(a["ids"]) for a in acc.values())


def _fireworks_sse() -> ModuleType | None:
    spec = importlib.util.find_spec("fireworks")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "training" / "sdk" / "_sse.py"
    if not path.exists():
        return None
    # Load the standalone module by path: importing the whole SDK pulls in its
    # client stack, which the decoder does not use.
    mod_spec = importlib.util.spec_from_file_location("_fireworks_sse", path)
    if mod_spec is None or mod_spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules["_fireworks_sse"] = mod
    mod_spec.loader.exec_module(mod)
    return mod


class _Body:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c


def decode_fireworks(mod: ModuleType, chunks: list[bytes]) -> int:
    async def run() -> int:
        acc: dict[int, dict[str, list[Any]]] = {}
        async for ev in mod._SSEDecoder().aiter_events(_Body(chunks)):
            if ev.data == "[DONE]":
                break
            _extract(json.loads(ev.data), acc)
        return sum(len(a["ids"]) for a in acc.values())

    return asyncio.run(run())


def _replicas(name: str) -> tuple[list[list[bytes]], int, int]:
    body = (STREAMS / name).read_bytes()
    n = max(1, TARGET_BYTES // len(body))
    events = body.count(b"\n\ndata:") + 1
    return [_chunks(body) for _ in range(n)], n * len(body), n * events


def _time(fn: Callable[[list[bytes]], int], replicas: list[list[bytes]]) -> float:
    return best_of(lambda: sum(fn(r) for r in replicas))


@pytest.fixture(scope="module")
def fireworks() -> ModuleType | None:
    return _fireworks_sse()


@pytest.mark.parametrize("name", ["completions_n4_lp5.sse", "chat_n2_lp2.sse", "v2_generate_n2.sse"])
def test_stream_decoding(name: str, benchmark: Any, report: Any, fireworks: ModuleType | None) -> None:
    replicas, nbytes, nevents = _replicas(name)
    # Same tokens out of every implementation (on one replica).
    ref = decode_openai(replicas[0])
    assert decode_rollstream(replicas[0]) == ref

    def ours() -> int:
        return sum(decode_rollstream(r) for r in replicas)

    benchmark.extra_info.update(bytes=nbytes, events=nevents)
    t_ours = pedantic_best(benchmark, ours)
    t_openai = _time(decode_openai, replicas)
    rows = [("rollstream (Rust, numpy out)", t_ours), ("openai SSEDecoder + json.loads", t_openai)]
    if fireworks is not None:
        assert decode_fireworks(fireworks, replicas[0]) == ref
        rows.append(
            ("fireworks _sse.py + json.loads", _time(lambda r: decode_fireworks(fireworks, r), replicas))
        )
    report.add(
        f"stream decoding, {name} x{len(replicas)} ({nbytes / 1e6:.0f} MB, {nevents} events, 16 KiB chunks), "
        f"best of {ROUNDS} rounds each:"
    )
    for label, t in rows:
        report.add(
            f"  {label:<34} {nbytes / t / 1e6:8.1f} MB/s  {nevents / t / 1e3:9.1f} k events/s"
            f"  ratio ours/this {t / t_ours:6.1f}x"
        )
    assert np.isfinite(t_ours)
