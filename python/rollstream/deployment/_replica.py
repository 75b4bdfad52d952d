"""One replica of a deployment owned by this process: its server handle,
its control client and its state, from launch to stop."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..hotload import ServerControl
from ._config import ReplicaInfo

if TYPE_CHECKING:
    from ._backends import ReplicaHandle

__all__ = ["Replica", "Weights"]


@dataclass(frozen=True)
class Weights:
    """What a deployment serves: the snapshot identity (None for the base
    model), the checkpoint directory on the manager's host, and the digest
    of what its replicas compute with (see ``docs/ENGINE.md``, section 6)."""

    identity: str | None
    path: str
    digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "path": self.path, "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Weights:
        return cls(d.get("identity"), str(d["path"]), d.get("digest"))


class Replica:
    """Runtime state of one replica. Mutated under the owning deployment's
    lock; ``state`` transitions are documented on :class:`ReplicaInfo`."""

    def __init__(self, index: int, api_key: str | None, headers: dict[str, str]) -> None:
        self.index = index
        self.handle: ReplicaHandle | None = None
        self.control: ServerControl | None = None
        self.state = "STARTING"
        self.snapshot_identity: str | None = None
        self.restarts = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_probe = 0.0
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        self.starter: threading.Thread | None = None
        #: The URL of the previous start, kept (down) in the routing pool
        #: until the restarted server joins.
        self.stale_url: str | None = None
        #: Set by stop(): the replica left its deployment and never starts again.
        self.retired = False
        self.cancel = threading.Event()
        self._api_key = api_key
        self._headers = headers

    @property
    def url(self) -> str | None:
        return self.handle.url if self.handle is not None else None

    def attach(self, handle: ReplicaHandle) -> None:
        self.handle = handle
        if self.control is not None:
            self.control.close()
        self.control = ServerControl(handle.url, api_key=self._api_key, headers=self._headers)

    def info(self) -> ReplicaInfo:
        h = self.handle
        return ReplicaInfo(
            index=self.index,
            url=h.url if h is not None else None,
            state=self.state,
            snapshot_identity=self.snapshot_identity,
            restarts=self.restarts,
            host=h.host if h is not None else None,
            pid=h.pid if h is not None else None,
            log_path=h.log_path if h is not None else None,
            last_error=self.last_error,
        )

    def stop(self, timeout: float = 30.0) -> None:
        self.retired = True
        self.cancel.set()
        h, self.handle = self.handle, None
        if self.control is not None:
            self.control.close()
            self.control = None
        if h is not None:
            h.stop(timeout)
        self.state = "STOPPED"
