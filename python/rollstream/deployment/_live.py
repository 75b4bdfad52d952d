"""The deployments this process owns, and the registry samplers in the same
process route through."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

from ..routing import EnginePool
from ._config import DeploymentConfig
from ._hotload import HotloadStatus
from ._replica import Replica, Weights

__all__ = ["OWNED", "SCHEME", "Live", "owned_pool"]

#: URL scheme of a manager's ``inference_url``: samplers resolve the replicas
#: of a deployment from it, client-side (no proxy in the data path).
SCHEME = "rollstream://"

# Live (owned) deployments of this process, by (state root, id), for samplers
# in the same process: they route on the owner's pool and see pauses at once.
OWNED: weakref.WeakValueDictionary[tuple[str, str], Live] = weakref.WeakValueDictionary()


class Live:
    """A deployment this process owns."""

    def __init__(self, config: DeploymentConfig, weights: Weights, bucket: str) -> None:
        self.config = config
        self.weights = weights
        self.bucket = bucket
        self.replicas: list[Replica] = []
        self.pool = EnginePool(name=f"deployment {config.deployment_id!r}")
        self.lock = threading.RLock()
        self.status = HotloadStatus(target=weights.identity)
        self.status.done.set()
        self.hotload_thread: threading.Thread | None = None
        self.state = "CREATING"
        self.last_error: str | None = None
        self.changed = threading.Condition()
        self.closed = False
        self.next_index = 0

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


def owned_pool(state_dir: str, deployment_or_model: str) -> EnginePool | None:
    """The pool of a deployment owned by this process, by id or served name."""
    root = str(Path(state_dir).expanduser().resolve())
    dep = deployment_or_model.rsplit("/deployments/", 1)[-1]
    live = OWNED.get((root, dep))
    if live is None:
        for (r, _), candidate in list(OWNED.items()):
            if r == root and candidate.config.served_model_name == deployment_or_model:
                live = candidate
                break
    return live.pool if live is not None else None
