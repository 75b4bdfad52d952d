"""How a deployment is recorded (its state document) and reported
(:class:`DeploymentInfo`). A mixin of the manager."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._config import DeploymentConfig, DeploymentInfo, ReplicaInfo
from ._live import Live
from ._state import owner_alive, process_identity

if TYPE_CHECKING:
    from . import _control
    from ._backends import Backend
    from ._state import StateStore

__all__ = ["StateViews"]


class StateViews:
    """State documents and DeploymentInfo (mixed into the manager)."""

    store: StateStore
    account_id: str
    _backend_spec: str | Backend
    _control: _control.ControlServer | None

    if TYPE_CHECKING:  # provided by ReplicaLifecycle

        def _refresh_state(self, live: Live) -> None: ...

    def _save(self, live: Live) -> None:
        dep = live.config.deployment_id
        doc = {
            "config": live.config.to_dict(),
            "state": live.state,
            "backend": self._backend_name(),
            "owner": {**process_identity(), "control": self._control.address if self._control else None},
            "weights": live.weights.to_dict(),
            "bucket": live.bucket,
            "replicas": [dataclasses.asdict(r.info()) for r in live.replicas],
            "hotload": live.status.to_dict(),
            "last_error": live.last_error,
            "updated": time.time(),
        }
        self.store.write(dep, doc)

    def _backend_name(self) -> str:
        b = self._backend_spec
        return b if isinstance(b, str) else str(getattr(b, "name", type(b).__name__))

    def _info_live(self, live: Live) -> DeploymentInfo:
        with live.lock:
            self._refresh_state(live)
            return self._make_info(
                live.config,
                live.state,
                tuple(r.info() for r in live.replicas),
                live.weights.identity,
                live.bucket,
                os.getpid(),
                live.last_error,
            )

    def _info_doc(self, doc: Mapping[str, Any]) -> DeploymentInfo:
        config = DeploymentConfig.from_dict(doc["config"])
        state = str(doc.get("state"))
        replicas = tuple(ReplicaInfo(**r) for r in doc.get("replicas", []))
        owner = doc.get("owner")
        if state not in ("SCALED_TO_ZERO", "DELETING") and not owner_alive(owner):
            state = "STOPPED"
            replicas = tuple(dataclasses.replace(r, state="STOPPED") for r in replicas)
        weights = doc.get("weights") or {}
        return self._make_info(
            config,
            state,
            replicas,
            weights.get("identity"),
            doc.get("bucket"),
            (owner or {}).get("pid"),
            doc.get("last_error"),
        )

    def _make_info(
        self,
        config: DeploymentConfig,
        state: str,
        replicas: tuple[ReplicaInfo, ...],
        identity: str | None,
        bucket: str | None,
        owner_pid: int | None,
        last_error: str | None,
    ) -> DeploymentInfo:
        dep = config.deployment_id
        return DeploymentInfo(
            deployment_id=dep,
            name=f"accounts/{self.account_id}/deployments/{dep}",
            state=state,
            hot_load_bucket_url=bucket,
            hot_load_trainer_job=config.hot_load_trainer_job,
            hot_load_transition_type=config.transition,
            deployment_shape_version=config.shape.name,
            inference_model=config.served_model_name or dep,
            base_model=config.base_model,
            replicas=replicas,
            current_snapshot_identity=identity,
            backend=self._backend_name(),
            owner_pid=owner_pid,
            config=config,
            last_error=last_error,
        )

    # -- forwarding to the owner -----------------------------------------------------------------
