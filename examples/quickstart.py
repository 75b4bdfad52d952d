"""README command 1: start a local vLLM deployment of the tiny model, sample
from it through rollstream and print what came back.

Run with ``make demo`` (sets everything up first) or, in a ready venv,
``python examples/quickstart.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

import rollstream
from rollstream.testing import LocalVLLM, tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [151644, 872, 198, 9707, 0, 2585, 525, 498, 3351, 30, 151645, 198, 151644, 77091, 198]


def main() -> int:
    model = tiny_model(ROOT / ".cache" / "tiny-model")
    print(f"tiny model: {model}")
    print("starting vLLM (CPU build; about a minute)...", flush=True)
    with LocalVLLM(model) as server:
        print(f"server ready at {server.url} after {server.startup_seconds:.0f} s\n")
        body = {
            "model": server.served_model_name,
            "prompt": PROMPT,
            "n": 4,
            "max_tokens": 12,
            "temperature": 1.0,
            "seed": 0,
            "logprobs": 1,
            "return_token_ids": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        decoder = rollstream.StreamDecoder()
        t0 = time.perf_counter()
        with (
            httpx.Client(base_url=server.url, timeout=120) as client,
            client.stream("POST", "/v1/completions", json=body) as response,
        ):
            response.raise_for_status()
            for part in response.iter_raw():
                decoder.feed(part)
        result = decoder.finish()
        wall = time.perf_counter() - t0

    print(f"{'#':>2}  {'finish':<7} {'tokens':<60} logprobs")
    for c in result.choices:
        ids = " ".join(str(t) for t in c.token_ids[:8]) + (" ..." if len(c.token_ids) > 8 else "")
        logprobs = c.logprobs if c.logprobs is not None else []
        lps = " ".join(f"{x:.2f}" for x in logprobs[:4]) + " ..."
        print(f"{c.index:>2}  {c.finish_reason or '?':<7} {ids:<60} {lps}")
        print(f"    text: {c.text!r}")
    tokens = sum(len(c.token_ids) for c in result.choices)
    print(
        f"\n{len(result.choices)} samples, {tokens} tokens in {wall:.2f} s; "
        f"{result.events} SSE events decoded in Rust"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
