"""Helpers shared by the engine tests: perturbed checkpoints and a
transformers recomputation of served logprobs."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np

CHAT = [{"role": "user", "content": "Tell me about weights."}]


def perturbed(weights: dict[str, np.ndarray], seed: int, scale: float = 0.3) -> dict[str, np.ndarray]:
    """Every tensor changes, embeddings included (a large step, so that a
    replica serving old weights, or a stale LM head, is unmistakable)."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + scale * v.std() * rng.standard_normal(v.shape).astype(np.float32)).astype(np.float32)
        for k, v in weights.items()
    }


def model_dir_with(tmp: Path, base_model: Path, weights_dir: Path) -> Path:
    """A Hugging Face model directory: the base model's configuration with the
    weights of ``weights_dir``."""
    d = tmp / f"hf-{weights_dir.name}"
    d.mkdir(exist_ok=True)
    for f in base_model.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, d / f.name)
    shutil.copy(weights_dir / "model.safetensors", d / "model.safetensors")
    return d


def recompute_error(samples: list[Any], model_dir: Path) -> float:
    """Max |served logprob - transformers float32 logprob| over the sampled
    tokens of ``samples`` (temperature 1, no truncation)."""
    from rollstream.testing import need

    torch, transformers = need("torch"), need("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    err = 0.0
    for c in samples:
        with torch.no_grad():
            logits = model(torch.tensor([c.full_tokens])).logits[0].double()
        lp = torch.log_softmax(logits, -1)[
            torch.arange(len(c.full_tokens) - 1), torch.tensor(c.full_tokens[1:])
        ]
        ref = lp.numpy()[c.prompt_len - 1 :]
        err = max(err, float(np.max(np.abs(np.asarray(c.inference_logprobs) - ref))))
    return err


def sample_from(url: str, model: str, tokenizer: Any, n: int = 2, **kw: Any) -> list[Any]:
    """n samples from one server through the generate endpoint (weight versions)."""
    from rollstream import DeploymentSampler

    async def go() -> Any:
        async with DeploymentSampler(url, model, tokenizer=tokenizer, endpoint="generate") as s:
            return await s.sample_with_tokens(CHAT, n=n, max_tokens=24, logprobs=True, seed=9, **kw)

    return list(asyncio.run(go()))
