"""Sampling masks captured in the real vLLM engine, applied to a transformers
recomputation: masked logprobs match vLLM's processed logprobs, unmasked ones
do not (the bias masks remove)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rollstream import ChatTokenizer, DeploymentSampler
from rollstream.masks import apply_sampling_mask
from rollstream.testing import LocalVLLM, need

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "Sample me something."}]
TEMPERATURE, TOP_K, TOP_P = 0.7, 20, 0.9


def sample(server: LocalVLLM, tok: ChatTokenizer, endpoint: str) -> tuple[Any, str | None]:
    async def go() -> Any:
        sampler = DeploymentSampler(server.url, server.served_model_name, tokenizer=tok, endpoint=endpoint)
        async with sampler as s:
            out = await s.sample_with_tokens(
                CHAT,
                n=3,
                max_tokens=40,
                temperature=TEMPERATURE,
                top_k=TOP_K,
                top_p=TOP_P,
                logprobs=True,
                seed=4,
                sampling_mask=True,
            )
            return out, s.mask_path

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["completions", "generate"])
def test_masks_reproduce_vllm_processed_logprobs(
    vllm_server: LocalVLLM, tiny_model_dir: Path, endpoint: str, record_property: Any
) -> None:
    torch, transformers = need("torch"), need("transformers")
    tok = ChatTokenizer.from_pretrained(tiny_model_dir)
    samples, path = sample(vllm_server, tok, endpoint)
    assert path == "plugin"  # the CPU build has no native --return-sampling-mask
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    masked_err = unmasked_err = 0.0
    for c in samples:
        mask = c.sampling_mask
        assert mask is not None
        assert mask.rows == c.completion_len
        assert (mask.sizes() <= TOP_K).all()
        assert (mask.sizes() >= 1).all()
        assert mask.contains(c.completion_ids).all()
        with torch.no_grad():
            logits = model(torch.tensor([c.full_tokens])).logits[0].double()
        scaled = logits[c.prompt_len - 1 : -1] / TEMPERATURE  # rows predicting each generated token
        ids = torch.from_numpy(c.completion_ids)
        served = np.asarray(c.inference_logprobs)
        masked = apply_sampling_mask(scaled, mask)
        got = torch.log_softmax(masked, -1)[torch.arange(len(ids)), ids].numpy()
        full = torch.log_softmax(scaled, -1)[torch.arange(len(ids)), ids].numpy()
        masked_err = max(masked_err, float(np.max(np.abs(got - served))))
        unmasked_err = max(unmasked_err, float(np.max(np.abs(full - served))))
    record_property("masked_max_abs_err", masked_err)
    record_property("unmasked_max_abs_err", unmasked_err)
    assert masked_err < 1e-4, f"masked recomputation off by {masked_err}"
    assert unmasked_err > 0.1, f"the unmasked recomputation should be visibly biased: {unmasked_err}"


def test_mask_requests_without_truncation_are_refused(vllm_server: LocalVLLM, tiny_model_dir: Path) -> None:
    s = DeploymentSampler(vllm_server.url, vllm_server.served_model_name, tokenizer=tiny_model_dir)
    with pytest.raises(ValueError, match="needs truncated sampling"):
        asyncio.run(s.sample_with_tokens(CHAT, sampling_mask=True))
    with pytest.raises(ValueError, match="needs truncated sampling"):
        asyncio.run(s.sample_with_tokens(CHAT, sampling_mask=True, temperature=0.0, top_k=5))
