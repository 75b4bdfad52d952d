"""Deployment configuration, shapes and the info objects the manager returns.

Names, fields and defaults follow the Fireworks training SDK's
``DeploymentConfig`` and ``DeploymentInfo`` so cookbook code keeps working;
what is local to rollstream is added under new names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MUTABLE_FIELDS",
    "SHAPES",
    "DeploymentConfig",
    "DeploymentInfo",
    "DeploymentShape",
    "ReplicaInfo",
    "default_shape",
]

_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

#: Fields :meth:`DeploymentManager.update` changes on a live deployment
#: without restarting healthy replicas.
MUTABLE_FIELDS = frozenset({"min_replica_count", "max_replica_count", "description", "annotations"})


@dataclass(frozen=True)
class DeploymentShape:
    """A named, documented preset of vLLM serving arguments and the resources
    one replica needs (Ray resource names: ``CPU``, ``GPU``)."""

    name: str
    description: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=dict)


#: The shapes rollstream knows. ``extra_args`` in a config are appended after
#: the shape's arguments, so a later flag overrides an earlier one.
SHAPES: dict[str, DeploymentShape] = {
    shape.name: shape
    for shape in (
        DeploymentShape(
            name="cpu-small",
            description=(
                "vLLM's CPU build for small models, tests and demos: float32 (exact comparisons with a "
                "trainer's recomputation), 1 GiB KV cache, 2k context, 8 sequences at a time."
            ),
            args=(
                "--dtype",
                "float32",
                "--max-model-len",
                "2048",
                "--max-num-seqs",
                "8",
                "--max-logprobs",
                "20",
            ),
            env={"VLLM_CPU_KVCACHE_SPACE": "1"},
            resources={"CPU": 1.0},
        ),
        DeploymentShape(
            name="gpu-8b-80gb",
            description=(
                "A 7-8B model on one 80 GB GPU (A100/H100): bfloat16, 32k context, prefix caching, "
                "256 sequences, 90% of GPU memory."
            ),
            args=(
                "--dtype",
                "bfloat16",
                "--max-model-len",
                "32768",
                "--max-num-seqs",
                "256",
                "--gpu-memory-utilization",
                "0.9",
                "--enable-prefix-caching",
                "--max-logprobs",
                "20",
            ),
            resources={"CPU": 4.0, "GPU": 1.0},
        ),
        DeploymentShape(
            name="gpu-70b-tp8",
            description=(
                "A 70B-class model tensor-parallel over 8 GPUs of one node: bfloat16, 32k context, "
                "prefix caching, 256 sequences."
            ),
            args=(
                "--dtype",
                "bfloat16",
                "--tensor-parallel-size",
                "8",
                "--max-model-len",
                "32768",
                "--max-num-seqs",
                "256",
                "--gpu-memory-utilization",
                "0.9",
                "--enable-prefix-caching",
                "--max-logprobs",
                "20",
            ),
            resources={"CPU": 16.0, "GPU": 8.0},
        ),
    )
}


def default_shape() -> str:
    """``gpu-8b-80gb`` where an NVIDIA GPU is visible, else ``cpu-small``."""
    import shutil

    return "gpu-8b-80gb" if shutil.which("nvidia-smi") else "cpu-small"


@dataclass
class DeploymentConfig:
    """What to deploy. Fields and defaults are the Fireworks SDK's.

    - ``base_model``: a local Hugging Face checkpoint directory (or a model
      name the engine can resolve itself).
    - ``deployment_shape``: a name in :data:`SHAPES` (default: chosen by
      :func:`default_shape`); ``extra_args`` are appended to its arguments,
      ``extra_values`` become environment variables of the engine.
    - Replicas: there is no autoscaler, so ``max(min_replica_count, 1)``
      replicas run while ``max_replica_count > 0``; ``max_replica_count`` is
      raised to ``min_replica_count`` when lower; both 0 = scaled to zero.
    - ``hot_load_transition_type``: ``"ASYNC"`` (default) freezes requests in
      flight during a hot-load and continues them on the new weights (their
      weight-version spans say which tokens came from which weights);
      ``"SYNC"`` drains them on the old weights first.
    - ``hot_load_bucket_url``: the snapshot store the deployment loads from
      (default: a bucket under the manager's state directory).

    Fields that only mean something to Fireworks' hosted control plane
    (``region``, ``accelerator_type``, ``hot_load_trainer_job``,
    ``skip_shape_validation``, ``for_training``, ``preemptible``, ...) are
    accepted, stored and otherwise ignored.
    """

    deployment_id: str
    base_model: str
    description: str | None = None
    deployment_shape: str | None = None
    expected_deployment_shape: str | None = None
    region: str | None = None
    min_replica_count: int = 0
    max_replica_count: int = 1
    accelerator_type: str = "NVIDIA_H200_141GB"
    hot_load_bucket_type: str | None = "FW_HOSTED"
    hot_load_trainer_job: str | None = None
    enable_hot_load: bool = True
    hot_load_transition_type: str | None = None
    skip_shape_validation: bool = False
    accept_shapeless_risk: bool = False
    disable_speculative_decoding: bool = False
    extra_args: list[str] | None = None
    extra_values: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    for_training: bool = False
    preemptible: bool = False
    # rollstream's own fields.
    hot_load_bucket_url: str | None = None
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.deployment_id, str) or not _ID.fullmatch(self.deployment_id):
            raise ValueError(
                f"deployment_id={self.deployment_id!r}: use 1-63 characters of [a-z0-9-], "
                "starting with a letter or digit"
            )
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"base_model={self.base_model!r} must name a model (a checkpoint directory)")
        for name in ("min_replica_count", "max_replica_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1024:
                raise ValueError(f"{name}={value!r} must be an int in [0, 1024]")
        if self.max_replica_count < self.min_replica_count:
            self.max_replica_count = self.min_replica_count
        if self.hot_load_transition_type is not None:
            t = str(self.hot_load_transition_type).upper().removeprefix("HOT_LOAD_TRANSITION_TYPE_")
            if t not in ("ASYNC", "SYNC"):
                raise ValueError(
                    f"hot_load_transition_type={self.hot_load_transition_type!r}: 'ASYNC' or 'SYNC'"
                )
            self.hot_load_transition_type = t
        if self.deployment_shape is not None and self.deployment_shape not in SHAPES:
            raise ValueError(
                f"deployment_shape={self.deployment_shape!r} is unknown; known shapes: {', '.join(SHAPES)}"
            )
        if self.extra_args is not None and not all(isinstance(a, str) for a in self.extra_args):
            raise TypeError(f"extra_args must be a list of str, got {self.extra_args!r}")

    def validate(self) -> None:
        """The reference's client-side checks."""
        if self.accept_shapeless_risk and (self.deployment_shape or "").strip():
            raise ValueError(
                "accept_shapeless_risk cannot be combined with deployment_shape "
                f"{self.deployment_shape!r}: it is an explicit opt-out of deployment shapes"
            )
        expected = (self.expected_deployment_shape or "").strip()
        if expected and expected != (self.deployment_shape or "").strip():
            raise ValueError(
                f"deployment_shape={self.deployment_shape!r} does not match expected_deployment_shape="
                f"{expected!r}"
            )

    @property
    def replicas(self) -> int:
        """How many replicas run (no autoscaler; see the class docstring)."""
        if self.max_replica_count == 0:
            return 0
        return max(self.min_replica_count, 1)

    @property
    def shape(self) -> DeploymentShape:
        return SHAPES[self.deployment_shape or default_shape()]

    @property
    def transition(self) -> str:
        return self.hot_load_transition_type or "ASYNC"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeploymentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DeploymentConfig fields {unknown}")
        return cls(**dict(data))

    def differences(self, other: DeploymentConfig) -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for fields that differ."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica of a deployment.

    ``state``: ``STARTING``, ``SYNCING`` (joining: being brought to the
    deployment's weights), ``READY``, ``PAUSED``, ``LOADING`` (hot-load in
    progress), ``DOWN`` (failed, restart pending), ``FAILED`` (restart limit
    reached) or ``STOPPED``.
    """

    index: int
    url: str | None
    state: str
    snapshot_identity: str | None = None
    restarts: int = 0
    host: str | None = None
    pid: int | None = None
    log_path: str | None = None
    last_error: str | None = None

    @property
    def readiness(self) -> bool:
        return self.state == "READY"


@dataclass(frozen=True)
class DeploymentInfo:
    """A deployment as the manager sees it. The first nine fields are the
    Fireworks SDK's; ``replicas`` onward are rollstream's.

    ``state``: ``CREATING``, ``READY``, ``UPDATING`` (scaling or hot-loading),
    ``DEGRADED`` (serving with fewer healthy replicas than configured),
    ``SCALED_TO_ZERO``, ``STOPPED`` (the process that ran its replicas is
    gone: :meth:`DeploymentManager.create_or_get` restarts it at its
    weights), ``FAILED``, ``DELETING``.
    """

    deployment_id: str
    name: str
    state: str
    hot_load_bucket_url: str | None = None
    hot_load_trainer_job: str | None = None
    hot_load_transition_type: str | None = None
    deployment_shape_version: str | None = None
    inference_model: str | None = None
    base_model: str | None = None
    replicas: tuple[ReplicaInfo, ...] = ()
    current_snapshot_identity: str | None = None
    backend: str | None = None
    owner_pid: int | None = None
    config: DeploymentConfig | None = field(default=None, repr=False, compare=False)
    last_error: str | None = None

    @property
    def replica_urls(self) -> list[str]:
        return [r.url for r in self.replicas if r.url is not None and r.state == "READY"]
