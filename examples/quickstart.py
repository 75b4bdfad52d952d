"""README command 1: start a local vLLM deployment of the tiny model, sample
from it with rollstream's DeploymentSampler and print what came back.

Run with ``make demo`` (sets everything up first) or, in a ready venv,
``python examples/quickstart.py``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from rollstream import AdaptiveConcurrencyController, ChatTokenizer, DeploymentSampler
from rollstream.testing import LocalVLLM, tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    [{"role": "user", "content": "Hello! How are you today?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
]


async def sample(server: LocalVLLM, tokenizer: ChatTokenizer) -> None:
    controller = AdaptiveConcurrencyController(initial_window=8)
    async with DeploymentSampler(
        server.url, server.served_model_name, tokenizer=tokenizer, concurrency_controller=controller
    ) as sampler:
        t0 = time.perf_counter()
        batches = await sampler.sample_batch(PROMPTS, n=3, max_tokens=12, logprobs=True, seed=0)
        wall = time.perf_counter() - t0
        print(f"{'prompt':>6} {'#':>2}  {'finish':<7} {'completion token ids':<62} logprobs")
        for p, samples in enumerate(batches):
            for i, c in enumerate(samples):
                more = " ..." if c.completion_len > 8 else ""
                ids = " ".join(str(t) for t in c.completion_ids[:8]) + more
                lps = " ".join(f"{x:.2f}" for x in (c.inference_logprobs or [])[:3]) + " ..."
                print(f"{p:>6} {i:>2}  {c.finish_reason:<7} {ids:<62} {lps}")
                print(f"{'':>10}text: {c.text!r}")
        m = sampler.metrics
        print(
            f"\n{m.samples} samples, {m.completion_tokens} tokens in {wall:.2f} s "
            f"({m.attempts} requests, {m.retries} retries); window after step: "
            f"{controller.step_completed()['window']}"
        )


def main() -> int:
    model = tiny_model(ROOT / ".cache" / "tiny-model")
    tokenizer = ChatTokenizer.from_pretrained(model)
    print(f"tiny model: {model} ({tokenizer})")
    print("starting vLLM (CPU build; about a minute)...", flush=True)
    with LocalVLLM(model) as server:
        print(f"server ready at {server.url} after {server.startup_seconds:.0f} s\n")
        asyncio.run(sample(server, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
