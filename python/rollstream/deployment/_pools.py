"""A deployment's replicas as a sampler's endpoint pool, resolved client-side.

In the process that owns the deployment, samplers route on the manager's own
:class:`~rollstream.routing.EnginePool`: a replica paused for a hot-load or
down for a restart is seen at once. In any other process, :class:`StatePool`
follows the deployment's state file (a light poll of its modification time)
and holds new requests while a replica is loading, starting or down. No
request goes through a proxy either way.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from pathlib import Path

from .._exceptions import EngineUnavailableError
from ..routing import EnginePool, Route
from ._live import SCHEME, owned_pool
from ._state import StateStore, owner_alive

__all__ = ["StatePool", "deployment_pool"]

#: Seconds between checks of the state file.
POLL_S = 0.25


def _resolve(store: StateStore, model: str) -> str:
    """The deployment id ``model`` names: an id, ``accounts/*/deployments/<id>``
    or a deployment's served model name."""
    dep = model.rsplit("/deployments/", 1)[-1]
    if store.read(dep) is not None:
        return dep
    for candidate in store.ids():
        doc = store.read(candidate) or {}
        if (doc.get("config") or {}).get("served_model_name") == model:
            return candidate
    known = ", ".join(store.ids()) or "none"
    raise EngineUnavailableError(
        f"no deployment serves model {model!r} in {store.root} (deployments: {known})"
    )


class StatePool(EnginePool):
    """The READY replicas of a deployment owned by another process."""

    def __init__(self, store: StateStore, deployment_id: str) -> None:
        super().__init__(name=f"deployment {deployment_id!r}")
        self.store = store
        self.deployment_id = deployment_id
        self._problem: str | None = None
        self._mtime: float | None = None
        self._stop = threading.Event()
        self.refresh()
        ref = weakref.ref(self)
        threading.Thread(
            target=_follow, args=(ref, self._stop), name="rollstream-state-pool", daemon=True
        ).start()

    def refresh(self) -> None:
        path = self.store.dir(self.deployment_id) / "state.json"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            self._problem = f"deployment {self.deployment_id!r} was deleted"
            self._wake()
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        doc = self.store.read(self.deployment_id) or {}
        state = doc.get("state")
        if state in ("SCALED_TO_ZERO", "FAILED", "DELETING") or not owner_alive(doc.get("owner")):
            why = (
                "its owner process is gone"
                if state not in ("SCALED_TO_ZERO", "FAILED", "DELETING")
                else state
            )
            self._problem = (
                f"deployment {self.deployment_id!r} is not serving ({why}); "
                "DeploymentManager.create_or_get starts it again"
            )
        else:
            self._problem = None
        wanted: dict[str, str] = {}
        for r in doc.get("replicas", []):
            url = r.get("url")
            if not url:
                continue
            wanted[url] = {"READY": "active", "LOADING": "paused", "PAUSED": "paused"}.get(
                r.get("state"), "down"
            )
        for url in self.urls:
            if url not in wanted:
                self.remove(url)
        for url, st in wanted.items():
            if url not in self.urls:
                self.add(url)
            self.set_state(url, st)  # type: ignore[arg-type]
        self._wake()

    async def acquire(self, session: str | None = None) -> Route:
        if self._problem is not None:
            raise EngineUnavailableError(self._problem)
        return await super().acquire(session)

    def close(self) -> None:
        self._stop.set()
        super().close()


def _follow(ref: weakref.ref[StatePool], stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        pool = ref()
        if pool is None:
            return
        with contextlib.suppress(Exception):  # an unreadable state: try again
            pool.refresh()
        del pool


def deployment_pool(inference_url: str, model: str) -> EnginePool:
    """The pool of the deployment ``model`` under a manager's ``inference_url``."""
    if not inference_url.startswith(SCHEME):
        raise ValueError(f"not a DeploymentManager inference_url: {inference_url!r}")
    root = inference_url[len(SCHEME) :]
    if not Path(root).is_dir():
        raise EngineUnavailableError(f"no deployment state directory at {root}")
    pool = owned_pool(root, model)
    if pool is not None:
        return pool
    store = StateStore(root)
    return StatePool(store, _resolve(store, model))
