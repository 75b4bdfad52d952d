"""Sampling-mask capture on vLLM's V1 runner (e.g. the CPU build; GPU servers
can use vLLM's native ``--return-sampling-mask`` instead).

Requests that carry ``vllm_xargs={"rollstream_mask_id": KEY}`` get the kept
token ids of every sampled token recorded (``isfinite`` of the logits after
temperature, min-p, top-k and top-p, exactly what vLLM samples from), keyed by
KEY, never by batch position. Rows of partial prefills, whose samples vLLM
discards, are skipped. Masks nobody claims are dropped after
``ROLLSTREAM_MASK_TTL`` seconds (600), and the store is capped at
``ROLLSTREAM_MASK_MAX_BYTES`` (1 GiB), oldest dropped first. Set
``ROLLSTREAM_SAMPLING_MASKS=0`` to disable capture.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
from typing import Any

__all__ = ["STORE", "install_capture"]

MASK_KEY = "rollstream_mask_id"
_TTL = float(os.environ.get("ROLLSTREAM_MASK_TTL", "600"))
_MAX_BYTES = int(os.environ.get("ROLLSTREAM_MASK_MAX_BYTES", str(1 << 30)))


class _Entry:
    __slots__ = ("bytes", "rows", "touched", "untruncated")

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.untruncated = 0
        self.bytes = 0
        self.touched = time.monotonic()


class _MaskStore:
    """Recorded rows per request key, bounded in time and size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._bytes = 0
        self._last_sweep = time.monotonic()

    def add(self, key: str, ids: Any | None) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                e = self._entries[key] = _Entry()
            e.touched = time.monotonic()
            if ids is None:
                e.untruncated += 1
                e.rows.append(None)
            else:
                e.rows.append(ids)
                e.bytes += ids.nbytes
                self._bytes += ids.nbytes
            self._evict_locked()

    def _evict_locked(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep > 1.0:
            self._last_sweep = now
            for k in [k for k, e in self._entries.items() if now - e.touched > _TTL]:
                self._bytes -= self._entries.pop(k).bytes
        while self._bytes > _MAX_BYTES and len(self._entries) > 1:
            oldest = min(self._entries, key=lambda k: self._entries[k].touched)
            self._bytes -= self._entries.pop(oldest).bytes

    def take(self, keys: list[str]) -> dict[str, Any]:
        import numpy as np

        out: dict[str, Any] = {}
        with self._lock:
            entries = {k: self._entries.pop(k, None) for k in keys}
            for e in entries.values():
                if e is not None:
                    self._bytes -= e.bytes
        for k, e in entries.items():
            if e is None:
                out[k] = None
                continue
            rows = [r if r is not None else np.zeros(0, np.int32) for r in e.rows]
            offsets = np.zeros(len(rows) + 1, np.int64)
            np.cumsum([len(r) for r in rows], out=offsets[1:])
            ids = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
            out[k] = {
                "rows": len(rows),
                "untruncated_rows": e.untruncated,
                "token_ids": base64.b64encode(ids.tobytes()).decode(),
                "offsets": base64.b64encode(offsets.tobytes()).decode(),
            }
        return out

    def __len__(self) -> int:
        return len(self._entries)


STORE = _MaskStore()
# Rows of the batch being sampled that belong to flagged requests: set by the
# runner's _sample for the duration of the call (one sampler per worker).
_CONTEXT: list[tuple[int, str]] | None = None


def _flagged_rows(runner: Any) -> list[tuple[int, str]] | None:
    batch = runner.input_batch
    num = batch.num_reqs
    discard = getattr(runner, "discard_request_mask", None)
    discarded = discard.np[:num] if discard is not None else None
    rows = []
    for i, rid in enumerate(batch.req_ids[:num]):
        state = runner.requests.get(rid)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        key = extra.get(MASK_KEY)
        if key and not (discarded is not None and discarded[i]):
            rows.append((i, str(key)))
    return rows or None


def _record(logits: Any, rows: list[tuple[int, str]]) -> None:
    import torch

    vocab = logits.shape[-1]
    for i, key in rows:
        kept = torch.isfinite(logits[i])
        n = int(kept.sum())
        if n >= vocab:
            STORE.add(key, None)
        else:
            STORE.add(key, kept.nonzero().flatten().to(torch.int32).cpu().numpy())


def install_capture() -> None:
    from vllm.v1.sample.ops import topk_topp_sampler
    from vllm.v1.worker import gpu_model_runner

    runner_cls = gpu_model_runner.GPUModelRunner
    if getattr(runner_cls, "_rollstream_mask_capture", False):
        return
    original_sample = runner_cls._sample
    original_apply = topk_topp_sampler.apply_top_k_top_p

    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        global _CONTEXT
        _CONTEXT = _flagged_rows(self) if (logits is not None and spec_decode_metadata is None) else None
        try:
            return original_sample(self, logits, spec_decode_metadata)
        finally:
            _CONTEXT = None

    def apply_top_k_top_p(logits: Any, k: Any, p: Any) -> Any:
        out = original_apply(logits, k, p)
        rows = _CONTEXT
        if rows:
            _record(out, rows)
        return out

    setattr(runner_cls, "_sample", _sample)  # noqa: B010 - a deliberate patch
    setattr(topk_topp_sampler, "apply_top_k_top_p", apply_top_k_top_p)  # noqa: B010
    setattr(runner_cls, "_rollstream_mask_capture", True)  # noqa: B010


if os.environ.get("ROLLSTREAM_SAMPLING_MASKS", "1") != "0":
    # ImportError: not inside vLLM (e.g. documentation builds).
    with contextlib.suppress(ImportError):
        install_capture()
