"""rollstream's vLLM worker extension, loaded inside the engine with
``--worker-extension-cls rollstream.vllm_ext.RollstreamWorkerExtension``.

Its methods are called through vLLM's ``/collective_rpc`` (dev mode); the
engine facts behind them are in ``docs/ENGINE.md``:

- ``rollstream_model_info``: whether the model ties its embeddings;
- ``rollstream_check_checkpoint(path)``: before a hot-load, check on the
  server's own host that ``path`` holds safetensors whose tensor names,
  dtypes and shapes equal the served checkpoint's (a reload of a missing or
  mismatched checkpoint kills vLLM 0.32's engine, defect 5.2). Only paths
  under ``ROLLSTREAM_SNAPSHOT_ROOTS`` (os.pathsep-separated) are looked at;
- ``rollstream_reload(path, fallback)``: ``reload_weights`` + re-tie, and on
  failure an immediate reload of ``fallback`` while the engine is still
  paused, so a failed load never leaves the engine on half-loaded weights;
- ``rollstream_retie_embeddings``: point a tied-embedding model's LM head at
  the new embeddings and rebuild its GEMM dispatch (defect 5.1);
- ``rollstream_checkpoint_hashes(path)`` and ``rollstream_fingerprint(path,
  expected)``: compare what the engine really computes with, tensor by
  tensor, against the checkpoint at ``path`` (hashed before the pause), and
  a digest for comparing replicas (:mod:`rollstream.vllm_ext._served`);
- ``rollstream_take_sampling_masks(keys)``: sampling masks captured on the
  V1 runner (:mod:`rollstream.vllm_ext._masks`).

Only imported inside vLLM worker processes.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from . import _masks

__all__ = ["RollstreamWorkerExtension", "snapshot_roots"]

if os.environ.get("ROLLSTREAM_SAMPLING_MASKS", "1") != "0":
    # ImportError: not inside vLLM (e.g. documentation builds).
    with contextlib.suppress(ImportError):
        _masks.install_capture()


def snapshot_roots() -> list[Path]:
    """The directories whose checkpoints this server may be asked to check."""
    raw = os.environ.get("ROLLSTREAM_SNAPSHOT_ROOTS", "")
    return [Path(p).resolve() for p in raw.split(os.pathsep) if p]


def _allowed(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved == root or root in resolved.parents for root in snapshot_roots())


def _model(worker: Any) -> Any:
    runner = worker.model_runner
    get = getattr(runner, "get_model", None)
    return get() if callable(get) else runner.model


def _tied(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


class RollstreamWorkerExtension:
    """Mixed into vLLM's worker class; method names are prefixed so they can
    never clash with the worker's own."""

    def rollstream_take_sampling_masks(self, keys: list[str]) -> dict[str, Any]:
        """Recorded masks of ``keys`` (None for unknown keys), forgotten after."""
        return _masks.STORE.take([str(k) for k in keys])

    def rollstream_model_info(self) -> dict[str, Any]:
        model = _model(self)
        served = self._rollstream_served_dir()
        return {
            "tie_word_embeddings": _tied(model),
            "architecture": type(model).__name__,
            "model_path": str(served) if served is not None else None,
        }

    def rollstream_check_checkpoint(self, path: str) -> dict[str, Any]:
        """Whether ``reload_weights(weights_path=path)`` is safe: ``{"ok": bool,
        "reason": str}``. Runs on the server's host, so it sees the same
        filesystem the reload will."""
        from ..hotload import tensor_mismatch
        from ..snapshots import safetensors_headers

        weights = Path(path)
        if not _allowed(weights):
            roots = os.pathsep.join(str(r) for r in snapshot_roots()) or "(none configured)"
            return {
                "ok": False,
                "reason": f"{path} is outside this server's snapshot roots {roots} "
                "(set ROLLSTREAM_SNAPSHOT_ROOTS where the server starts)",
            }
        if not weights.is_dir():
            return {"ok": False, "reason": f"{path} is not a directory on the server's host"}
        try:
            new = safetensors_headers(weights)
        except Exception as e:  # reported to the client, never raised in the engine
            return {"ok": False, "reason": f"{path}: {e}"}
        if not new:
            return {"ok": False, "reason": f"{path} holds no *.safetensors files"}
        served_dir = self._rollstream_served_dir()
        if served_dir is None:
            return {"ok": True, "reason": "served model is not a local directory; tensors not compared"}
        try:
            served = safetensors_headers(served_dir)
        except Exception as e:
            return {"ok": True, "reason": f"served checkpoint unreadable ({e}); tensors not compared"}
        problem = tensor_mismatch(weights, new, served) if served else None
        if problem:
            return {"ok": False, "reason": problem}
        return {"ok": True, "reason": f"{len(new)} tensors match the served checkpoint"}

    def _rollstream_served_dir(self) -> Path | None:
        model_config = getattr(getattr(self, "vllm_config", None), "model_config", None)
        model = getattr(model_config, "model", None)
        if not model or not Path(str(model)).is_dir():
            return None
        return Path(str(model))

    def rollstream_reload(self, path: str, fallback: str | None = None, retie: bool = True) -> dict[str, Any]:
        """``reload_weights(path)`` then re-tie the LM head (unless ``retie``
        is false: only to demonstrate vLLM's defect). If the reload
        raises, ``fallback`` (the checkpoint served before) is reloaded at
        once, before any forward pass can run on half-loaded weights (the
        engine is paused), and the error is returned, not raised: an
        exception here would mark vLLM 0.32's engine dead."""
        t0 = time.perf_counter()
        try:
            self.reload_weights(weights_path=path)  # type: ignore[attr-defined]
            tie = self.rollstream_retie_embeddings() if retie else {"skipped": True}
        except Exception as e:
            out: dict[str, Any] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            if fallback:
                try:
                    self.reload_weights(weights_path=fallback)  # type: ignore[attr-defined]
                    self.rollstream_retie_embeddings()
                    out["restored"] = fallback
                except Exception as e2:
                    out["restore_error"] = f"{type(e2).__name__}: {e2}"
            return out
        return {"ok": True, "seconds": time.perf_counter() - t0, "retie": tie}

    def rollstream_checkpoint_hashes(self, path: str) -> dict[str, Any]:
        """Hashes of every tensor of the checkpoint at ``path`` (read on this
        host), for :meth:`rollstream_fingerprint` to compare against; run
        before a hot-load pauses anything."""
        from ._served import checkpoint_hashes

        weights = Path(path)
        if not _allowed(weights):
            return {"error": f"{path} is outside this server's snapshot roots"}
        try:
            return {"hashes": checkpoint_hashes(weights)}
        except Exception as e:  # reported to the client, never raised in the engine
            return {"error": f"{type(e).__name__}: {e}"}

    def rollstream_fingerprint(self, path: str, expected: dict[str, str] | None = None) -> dict[str, Any]:
        """What this worker computes with, compared with the checkpoint at
        ``path`` (``expected``: its :meth:`rollstream_checkpoint_hashes`;
        see :func:`rollstream.vllm_ext._served.compare`)."""
        from ..snapshots import safetensors_headers
        from ._served import compare

        weights = Path(path)
        if not _allowed(weights):
            return {"error": f"{path} is outside this server's snapshot roots"}
        try:
            headers = safetensors_headers(weights)
            model = _model(self)
            return compare(model, weights, headers, _tied(model), expected)
        except Exception as e:  # reported to the client, never raised in the engine
            return {"error": f"{type(e).__name__}: {e}"}

    def rollstream_retie_embeddings(self) -> dict[str, Any]:
        import torch

        model = _model(self)
        if not _tied(model):
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
