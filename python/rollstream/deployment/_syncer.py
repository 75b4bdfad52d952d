"""WeightSyncer: save the trainer's weights as a snapshot and hot-load them
into a deployment, keeping the delta chain valid.

The Fireworks SDK's names and methods, over rollstream's snapshot store: the
policy is a torch module (its ``state_dict()``) or a callable returning a
state dict, instead of a remote training client. The first save is a full
snapshot; later ones are deltas against the last snapshot *the deployment
verifiably serves*, so a failed hot-load never leaves a delta without its
base (the reference's edge case).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._exceptions import HotloadError
from ..snapshots import DeltaFormat, SnapshotChain, SnapshotInfo, SnapshotStore, safetensors_headers
from ._manager import DeploymentManager

__all__ = ["WeightSyncer"]

log = logging.getLogger("rollstream.deployment")

StateDict = Mapping[str, Any]
CheckpointType = Literal["base", "delta"]


_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype")


def _state_dict(policy: Any) -> StateDict:
    if callable(getattr(policy, "state_dict", None)):
        sd = policy.state_dict()
    elif callable(policy):
        sd = policy()
    else:
        raise TypeError(
            f"policy must be a torch module or a callable returning a state dict, got {type(policy).__name__}"
        )
    if not isinstance(sd, Mapping):
        raise TypeError(f"the policy's state dict is a {type(sd).__name__}, not a mapping of tensors")
    return sd


@dataclass
class WeightSyncer:
    """Saves ``policy``'s weights into the deployment's bucket and hot-loads
    them into every replica.

    ``state_dict_transform`` maps the trainer's state dict to the serving
    checkpoint's tensor names when they differ. After it, the state dict is
    aligned with the deployment's base checkpoint: a tied ``lm_head.weight``
    the checkpoint does not store is dropped, tensors are cast to the
    checkpoint's dtypes, and a missing or unknown tensor is an error naming
    it (the server would refuse the snapshot later, after the save).
    """

    policy: Any
    deploy_mgr: DeploymentManager | None = None
    deployment_id: str | None = None
    base_model: str = ""
    hotload_timeout: int = 600
    first_checkpoint_type: CheckpointType = "base"
    compression_format: DeltaFormat = "rsd1"
    warmup_after_hotload: bool = False
    warmup_max_retries: int = 10
    reset_prompt_cache: bool = True
    lora_rank: int = 0
    state_dict_transform: Callable[[StateDict], StateDict] | None = None
    #: Seconds of the latest operation: ``save_time_s``, ``hotload_time_s``,
    #: ``total_time_s`` and the deployment's hot-load stages.
    last_timing: dict[str, float] = field(default_factory=dict, init=False)
    #: The snapshot the latest save produced.
    last_snapshot: SnapshotInfo | None = field(default=None, init=False)
    _chain: SnapshotChain | None = field(default=None, init=False, repr=False)
    _checked: bool = field(default=False, init=False, repr=False)

    @property
    def _hotload_enabled(self) -> bool:
        return self.deploy_mgr is not None and self.deployment_id is not None

    @property
    def base_identity(self) -> str | None:
        """The last snapshot the deployment verifiably serves (deltas are made against it)."""
        return self.chain.loaded_identity

    @property
    def base_saved(self) -> bool:
        return self.chain.loaded_identity is not None

    @property
    def chain(self) -> SnapshotChain:
        if self._chain is None:
            if not self._hotload_enabled:
                raise ValueError("WeightSyncer needs deploy_mgr and deployment_id to know where to save")
            assert self.deploy_mgr is not None
            info = self.deploy_mgr.get(str(self.deployment_id))
            if info is None or info.hot_load_bucket_url is None:
                raise HotloadError(
                    f"deployment {self.deployment_id!r} not found or has no bucket", stage="check"
                )
            store = SnapshotStore(info.hot_load_bucket_url)
            first = "base" if self.lora_rank > 0 else self.first_checkpoint_type
            self._chain = SnapshotChain(
                store, compression_format=self.compression_format, first_checkpoint_type=first
            )
        return self._chain

    def _ensure_deployment_checked(self) -> None:
        """Once: if the deployment already serves a snapshot of this bucket,
        the chain continues from it (a delta is possible at once); otherwise
        the first save is a full snapshot."""
        if self._checked:
            return
        self._checked = True
        current = self.check_deployment_state()
        if current is not None and current in self.chain.store:
            self.chain.mark_loaded(current)

    def check_deployment_state(self) -> str | None:
        """The snapshot every replica serves (None for the base model, or
        when replicas disagree, which a verified hot-load never leaves)."""
        if not self._hotload_enabled:
            return None
        assert self.deploy_mgr is not None
        status = self.deploy_mgr.hotload_check_status(str(self.deployment_id), self.base_model)
        identities = {r.get("current_snapshot_identity") for r in status.get("replicas", [])}
        return next(iter(identities)) if len(identities) == 1 else None

    def reset_delta_chain(self) -> None:
        """The next save is a full snapshot."""
        self.chain.reset()

    def _kind(self, checkpoint_type: str | None) -> CheckpointType:
        if checkpoint_type not in (None, "base", "delta"):
            raise ValueError(f"checkpoint_type={checkpoint_type!r} must be 'base', 'delta' or None")
        if self.lora_rank > 0:
            return "base"
        return checkpoint_type or self.chain.next_kind()  # type: ignore[return-value]

    def _save(self, name: str, checkpoint_type: str | None) -> SnapshotInfo:
        self._ensure_deployment_checked()
        sd = _state_dict(self.policy)
        if self.state_dict_transform is not None:
            sd = self.state_dict_transform(sd)
        sd = self._align(sd)
        t0 = time.perf_counter()
        info = self.chain.save(name, sd, self._kind(checkpoint_type))
        self.last_timing["save_time_s"] = time.perf_counter() - t0
        self.last_snapshot = info
        return info

    def _align(self, sd: StateDict) -> StateDict:
        assert self.deploy_mgr is not None
        info = self.deploy_mgr.get(str(self.deployment_id))
        base = Path(info.base_model) if info is not None and info.base_model else None
        if base is None or not base.is_dir():
            return sd
        headers = safetensors_headers(base)
        if not headers:
            return sd
        out = dict(sd)
        if "lm_head.weight" in out and "lm_head.weight" not in headers:
            del out["lm_head.weight"]  # tied to the embeddings; the checkpoint stores it once
        missing = sorted(set(headers) - set(out))
        unknown = sorted(set(out) - set(headers))
        if missing or unknown:
            raise ValueError(
                f"the policy's state dict does not match the checkpoint of {base}: missing {missing[:5]}, "
                f"unknown {unknown[:5]}; pass state_dict_transform= to map the names"
            )
        for name, (dtype, _shape) in headers.items():
            want = _TORCH_DTYPES.get(dtype)
            t = out[name]
            if want is not None and _is_torch(t) and str(t.dtype) != f"torch.{want}":
                import torch

                out[name] = t.to(getattr(torch, want))
        return {name: out[name] for name in headers}

    def save_only(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save without hot-loading; the snapshot name, or None on failure
        (logged), as the reference."""
        self.last_timing = {}
        try:
            return self._save(name, checkpoint_type).identity
        except Exception as e:
            log.warning("save of %r failed: %s", name, e)
            return None

    def _do_hotload(self, info: SnapshotInfo) -> None:
        assert self.deploy_mgr is not None
        t0 = time.perf_counter()
        try:
            self.deploy_mgr.hotload_and_wait(
                str(self.deployment_id),
                self.base_model,
                info.identity,
                incremental_snapshot_metadata=info.incremental_snapshot_metadata,
                reset_prompt_cache=self.reset_prompt_cache,
                timeout_seconds=self.hotload_timeout,
            )
        except BaseException:
            self.chain.mark_failed(info.identity)
            raise
        finally:
            self.last_timing["hotload_time_s"] = time.perf_counter() - t0
        self.chain.mark_loaded(info.identity)
        for k, v in self.deploy_mgr.hotload_timings(str(self.deployment_id)).items():
            self.last_timing[f"hotload_{k}"] = v
        if self.warmup_after_hotload:
            info_dep = self.deploy_mgr.get(str(self.deployment_id))
            if info_dep is not None and info_dep.inference_model:
                self.deploy_mgr.warmup(info_dep.inference_model, max_retries=self.warmup_max_retries)

    def hotload(self, snapshot_name: str, checkpoint_type: str | None = None) -> bool:
        """Hot-load a snapshot saved by :meth:`save_only`; False on failure
        (logged), as the reference."""
        self.last_timing = {}
        if not self._hotload_enabled:
            return False
        try:
            self._do_hotload(self.chain.store.get(snapshot_name))
            return True
        except Exception as e:
            log.warning("hot-load of %r failed: %s", snapshot_name, e)
            return False

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str:
        """Save the policy's weights as ``name`` (a full snapshot first, then
        deltas against what the deployment serves) and hot-load them into
        every replica. Returns the snapshot name; raises on failure (the
        chain then still points at what is served)."""
        self.last_timing = {}
        t0 = time.perf_counter()
        try:
            info = self._save(name, checkpoint_type)
            if self._hotload_enabled:
                self._do_hotload(info)
            return info.identity
        finally:
            self.last_timing["total_time_s"] = time.perf_counter() - t0

    def get_deployment_sampler(self, tokenizer: Any = None, **kwargs: Any) -> Any:
        """A :class:`~rollstream.DeploymentSampler` on the deployment."""
        from ..sampler import DeploymentSampler

        if not self._hotload_enabled:
            raise ValueError("get_deployment_sampler needs deploy_mgr and deployment_id")
        assert self.deploy_mgr is not None
        info = self.deploy_mgr.get(str(self.deployment_id))
        if info is None:
            raise HotloadError(f"deployment {self.deployment_id!r} not found", stage="check")
        return DeploymentSampler(
            inference_url=self.deploy_mgr.inference_url,
            model=str(info.inference_model),
            api_key=self.deploy_mgr.api_key,
            tokenizer=tokenizer,
            **kwargs,
        )
