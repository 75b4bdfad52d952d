"""Deployments of vLLM: replicas on this machine or a Ray cluster, sampled as
one, hot-loaded as one, verified on every replica.

The API follows the Fireworks training SDK's ``DeploymentManager``,
``DeploymentConfig``, ``DeploymentInfo`` and ``WeightSyncer``, so a cookbook
loop keeps working with a change of import::

    mgr = DeploymentManager()
    info = mgr.create_or_get(DeploymentConfig("grpo", base_model="/models/qwen3-8b", min_replica_count=2))
    info = mgr.wait_for_ready("grpo")
    sampler = DeploymentSampler(inference_url=mgr.inference_url, model=info.inference_model, tokenizer=tok)
"""

from ._backends import Backend, LaunchSpec, LocalBackend, RayBackend, ReplicaHandle
from ._config import SHAPES, DeploymentConfig, DeploymentInfo, DeploymentShape, ReplicaInfo, default_shape
from ._manager import SCHEME, DeploymentManager, owned_pool
from ._pools import StatePool, deployment_pool
from ._state import default_state_dir
from ._syncer import WeightSyncer

__all__ = [
    "SCHEME",
    "SHAPES",
    "Backend",
    "DeploymentConfig",
    "DeploymentInfo",
    "DeploymentManager",
    "DeploymentShape",
    "LaunchSpec",
    "LocalBackend",
    "RayBackend",
    "ReplicaHandle",
    "ReplicaInfo",
    "StatePool",
    "WeightSyncer",
    "default_shape",
    "default_state_dir",
    "deployment_pool",
    "owned_pool",
]
