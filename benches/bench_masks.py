"""Applying sampling masks to trainer logits on CPU: T=4096 completion
tokens, k=512 kept ids per token, V=151936, float32 (2.49 GB of logits).

Compared in one run: the SkyRL-style path (Python list of lists ->
torch.tensor -> scatter -> masked_fill), a numpy CSR -> torch index-ops path,
rollstream's kernel, and a plain ``fill_`` of the same tensor (the memory
bound). Then the whole way from mask JSON in the stream to masked logits:
json.loads + the list path vs rollstream's stream decoder + kernel. Every
path: best of the same number of rounds (_timing.ROUNDS)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from _timing import ROUNDS
from _timing import best_of as best

import rollstream
from rollstream.masks import SamplingMask, apply_sampling_mask
from rollstream.testing import need

T, K, V = 4096, 512, 151936


@pytest.fixture(scope="module")
def torch() -> Any:
    return need("torch")


@pytest.fixture(scope="module")
def data(torch: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    rows = [np.sort(rng.choice(V, size=K, replace=False)).astype(np.int32) for _ in range(T)]
    return {
        "logits": torch.randn(T, V),
        "rows_list": [r.tolist() for r in rows],
        "mask": SamplingMask(np.concatenate(rows), np.arange(T + 1, dtype=np.int64) * K),
    }


def skyrl_path(logits: Any, rows_list: list[list[int]]) -> Any:
    torch = need("torch")
    idx = torch.tensor(rows_list, dtype=torch.long)
    keep = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, idx, True)
    return logits.masked_fill_(~keep, float("-inf"))


def csr_index_path(logits: Any, mask: SamplingMask) -> Any:
    torch = need("torch")
    rows = torch.from_numpy(np.repeat(np.arange(mask.rows), mask.sizes()))
    cols = torch.from_numpy(mask.token_ids.astype(np.int64))
    kept = logits[rows, cols]
    logits.fill_(float("-inf"))
    logits[rows, cols] = kept
    return logits


def test_apply_masks(torch: Any, data: dict[str, Any], report: Any) -> None:
    logits, rows_list, mask = data["logits"], data["rows_list"], data["mask"]
    work = logits.clone()
    gb = logits.numel() * 4 / 1e9
    t_list = best(lambda: skyrl_path(work.copy_(logits), rows_list)) - best(lambda: work.copy_(logits))
    ref = skyrl_path(work.copy_(logits), rows_list).clone()
    t_csr = best(lambda: csr_index_path(work.copy_(logits), mask)) - best(lambda: work.copy_(logits))
    assert torch.equal(csr_index_path(work.copy_(logits), mask), ref)
    t_ours = best(lambda: apply_sampling_mask(work.copy_(logits), mask, inplace=True)) - best(
        lambda: work.copy_(logits)
    )
    assert torch.equal(apply_sampling_mask(work.copy_(logits), mask, inplace=True), ref)
    t_fill = best(lambda: work.fill_(float("-inf")))
    report.add(
        f"sampling masks, T={T} k={K} V={V} float32 on CPU ({gb:.2f} GB of logits; a copy subtracted), "
        f"best of {ROUNDS} rounds each:"
    )
    for label, t in [
        ("SkyRL list -> scatter -> masked_fill", t_list),
        ("numpy CSR -> torch index ops", t_csr),
        ("rollstream apply_sampling_mask", t_ours),
        ("plain fill_ (memory bound)", t_fill),
    ]:
        report.add(f"  {label:<38} {t * 1e3:8.1f} ms  {gb / t:6.2f} GB/s   ours is {t / t_ours:5.2f}x faster")


def test_stream_to_masked_logits(data: dict[str, Any], report: Any) -> None:
    logits, rows_list = data["logits"], data["rows_list"]
    events = []
    for t, row in enumerate(rows_list):
        choice = {"index": 0, "token_ids": [row[0]], "sampling_mask": [row], "finish_reason": None}
        if t == T - 1:
            choice["finish_reason"] = "length"
        events.append(b"data: " + json.dumps({"request_id": "r", "choices": [choice]}).encode() + b"\n\n")
    body = b"".join(events) + b"data: [DONE]\n\n"
    work = logits.clone()

    def python_path() -> Any:
        rows: list[list[int]] = []
        for block in body.split(b"\n\n"):
            if block.startswith(b"data: {"):
                rows.extend(json.loads(block[6:])["choices"][0]["sampling_mask"])
        return skyrl_path(work.copy_(logits), rows)

    def ours() -> Any:
        result = rollstream.parse_stream(body)
        m = result.choices[0].sampling_mask
        assert m is not None
        return apply_sampling_mask(work.copy_(logits), m, inplace=True)

    t_copy = best(lambda: work.copy_(logits))
    t_py = best(python_path) - t_copy
    t_ours = best(ours) - t_copy
    t_json = best(lambda: [json.loads(b[6:]) for b in body.split(b"\n\n") if b.startswith(b"data: {")])
    report.add(f"mask JSON in the stream ({len(body) / 1e6:.1f} MB) -> masked logits:")
    report.add(
        f"  json.loads + list path          {t_py * 1e3:8.1f} ms   (json.loads alone {t_json * 1e3:.1f} ms)"
    )
    report.add(f"  rollstream decoder + kernel     {t_ours * 1e3:8.1f} ms   {t_py / t_ours:5.1f}x faster")
