"""rollstream's vLLM worker extension, loaded inside the engine with
``--worker-extension-cls rollstream.vllm_ext.RollstreamWorkerExtension``.

Its methods are called through vLLM's ``/collective_rpc`` (dev mode):

- ``rollstream_ping`` / ``rollstream_model_info``: tell the client the
  extension is present, and whether the model ties its embeddings;
- ``rollstream_retie_embeddings``: after ``reload_weights``, point a
  tied-embedding model's LM head at the new embeddings again and rebuild the
  head's GEMM dispatch (vLLM 0.32's layerwise reload restores the head's old
  tensor for tied models: "ParallelLMHead: Failed to load weights").

Only imported inside vLLM worker processes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RollstreamWorkerExtension"]


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

    def rollstream_model_info(self) -> dict[str, Any]:
        model = _model(self)
        config = getattr(model, "config", None)
        return {
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "architecture": type(model).__name__,
        }

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
