"""rollstream's vLLM worker extension, loaded inside the engine with
``--worker-extension-cls rollstream.vllm_ext.RollstreamWorkerExtension``.

Its methods are called through vLLM's ``/collective_rpc`` (dev mode):

- ``rollstream_ping`` / ``rollstream_model_info``: tell the client the
  extension is present, and whether the model ties its embeddings;
- ``rollstream_check_checkpoint(path)``: before a hot-load, check on the
  server's own host that ``path`` holds safetensors whose tensor names,
  dtypes and shapes equal the served checkpoint's (vLLM 0.32's engine dies
  on a ``reload_weights`` of a missing or mismatched checkpoint);
- ``rollstream_retie_embeddings``: after ``reload_weights``, point a
  tied-embedding model's LM head at the new embeddings again and rebuild the
  head's GEMM dispatch (vLLM 0.32's layerwise reload restores the head's old
  tensor for tied models: "ParallelLMHead: Failed to load weights").

Sampling-mask capture (vLLM's V1 runner, e.g. the CPU build; GPU servers
can use vLLM's native ``--return-sampling-mask`` instead): requests that
carry ``vllm_xargs={"rollstream_mask_id": KEY}`` get the kept token ids of
every sampled token recorded (``isfinite`` of the logits after temperature,
min-p, top-k and top-p, exactly what vLLM samples from), keyed by KEY, never
by batch position. Rows of partial prefills, whose samples vLLM discards, are
skipped. ``rollstream_take_sampling_masks(keys)`` returns and forgets them;
masks nobody claims are dropped after ``ROLLSTREAM_MASK_TTL`` seconds (600),
and the store is capped at ``ROLLSTREAM_MASK_MAX_BYTES`` (1 GiB), oldest
dropped first. Set ``ROLLSTREAM_SAMPLING_MASKS=0`` to disable capture.

Only imported inside vLLM worker processes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
from typing import Any

__all__ = ["RollstreamWorkerExtension"]

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


_STORE = _MaskStore()
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
            _STORE.add(key, None)
        else:
            _STORE.add(key, kept.nonzero().flatten().to(torch.int32).cpu().numpy())


def _install_capture() -> None:
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
        _install_capture()


def _runner_class() -> Any:
    from vllm.v1.worker import gpu_model_runner

    return gpu_model_runner.GPUModelRunner


def _model(worker: Any) -> Any:
    runner = worker.model_runner
    get = getattr(runner, "get_model", None)
    return get() if callable(get) else runner.model


class RollstreamWorkerExtension:
    """Mixed into vLLM's worker class; method names are prefixed so they can
    never clash with the worker's own."""

    def rollstream_ping(self) -> str:
        from . import __version__

        return __version__

    def rollstream_take_sampling_masks(self, keys: list[str]) -> dict[str, Any]:
        """Recorded masks of ``keys`` (None for unknown keys), forgotten after."""
        return _STORE.take([str(k) for k in keys])

    def rollstream_mask_status(self) -> dict[str, Any]:
        return {
            "capture": bool(getattr(_runner_class(), "_rollstream_mask_capture", False)),
            "pending": len(_STORE),
        }

    def rollstream_model_info(self) -> dict[str, Any]:
        model = _model(self)
        config = getattr(model, "config", None)
        return {
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "architecture": type(model).__name__,
        }

    def rollstream_check_checkpoint(self, path: str) -> dict[str, Any]:
        """Whether ``reload_weights(weights_path=path)`` is safe: ``{"ok": bool,
        "reason": str}``. Runs on the server's host, so it sees the same
        filesystem the reload will."""
        from pathlib import Path

        from .hotload import tensor_mismatch
        from .snapshots import safetensors_headers

        weights = Path(path)
        if not weights.is_dir():
            return {"ok": False, "reason": f"{path} is not a directory on the server's host"}
        try:
            new = safetensors_headers(weights)
        except Exception as e:  # reported to the client, never raised in the engine
            return {"ok": False, "reason": f"{path}: {e}"}
        if not new:
            return {"ok": False, "reason": f"{path} holds no *.safetensors files"}
        model_config = getattr(getattr(self, "vllm_config", None), "model_config", None)
        served_dir = Path(str(getattr(model_config, "model", "")))
        if not getattr(model_config, "model", None) or not served_dir.is_dir():
            return {"ok": True, "reason": "served model is not a local directory; tensors not compared"}
        try:
            served = safetensors_headers(served_dir)
        except Exception as e:
            return {"ok": True, "reason": f"served checkpoint unreadable ({e}); tensors not compared"}
        problem = tensor_mismatch(weights, new, served) if served else None
        if problem:
            return {"ok": False, "reason": problem}
        return {"ok": True, "reason": f"{len(new)} tensors match the served checkpoint"}

    def rollstream_retie_embeddings(self) -> dict[str, Any]:
        import torch

        model = _model(self)
        config = getattr(model, "config", None)
        if not getattr(config, "tie_word_embeddings", False):
            return {"tied": False}
        head = getattr(model, "lm_head", None)
        get_embed = getattr(model, "get_input_embeddings", None)
        embed = get_embed() if callable(get_embed) else model.model.embed_tokens
        if head is None or not hasattr(head, "weight") or not hasattr(embed, "weight"):
            return {"tied": True, "retied": False, "reason": "no lm_head/embedding weight found"}
        if head.weight.shape != embed.weight.shape:
            return {
                "tied": True,
                "retied": False,
                "reason": f"shapes differ {head.weight.shape} {embed.weight.shape}",
            }
        with torch.no_grad():
            stale = float((head.weight.float() - embed.weight.float()).abs().max())
        head.weight = embed.weight
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            # On CPU this rebuilds the packed GEMM that caches the old head.
            method.process_weights_after_loading(head)
        return {"tied": True, "retied": True, "max_abs_diff_before": stale}
