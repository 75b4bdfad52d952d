"""DeploymentManager: vLLM deployments on this machine or a Ray cluster.

Names, arguments and return shapes follow the Fireworks training SDK's
``DeploymentManager``; the control plane is this process. The process that
creates (or restarts) a deployment *owns* it: it runs the replicas, watches
them and performs hot-loads; nothing it starts outlives it. Other processes
see the same deployments through the state directory and forward mutations
to the owner (:mod:`._control`).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from .._exceptions import DeploymentError, HotloadError
from ..routing import EnginePool
from ..snapshots import SnapshotStore, check_identity
from . import _control
from ._backends import Backend, link_dir, make_backend
from ._config import MUTABLE_FIELDS, DeploymentConfig, DeploymentInfo
from ._hotload import FaultHook, HotloadStatus, commit
from ._lifecycle import ReplicaLifecycle
from ._live import OWNED, SCHEME, Live, owned_pool
from ._replica import Weights
from ._state import StateStore, default_state_dir, owner_alive, process_identity
from ._views import StateViews

__all__ = ["SCHEME", "DeploymentManager", "owned_pool"]

log = logging.getLogger("rollstream.deployment")


class DeploymentManager(ReplicaLifecycle, StateViews):
    """Starts, watches, scales, hot-loads and stops vLLM deployments.

    ``backend``: ``"local"`` (replicas are processes of this machine, the
    default), ``"ray"`` (Ray actors in placement groups; ``backend_options``
    go to :class:`~rollstream.deployment.RayBackend`, e.g. ``address``), or
    a backend object. ``state_dir``: where deployments are recorded (default
    ``$ROLLSTREAM_STATE_DIR`` or ``~/.cache/rollstream``).

    The Fireworks SDK's constructor arguments are accepted by keyword:
    ``api_key`` becomes the servers' API key (vLLM ``--api-key``) and the
    key of every control request; ``additional_headers`` go on every
    control request; ``base_url``, ``inference_url``, ``hotload_api_url`` and
    ``verify_ssl`` name a hosted control plane and are ignored (the manager
    is the control plane).

    ``probe_interval`` and ``probe_timeout`` (seconds) pace the liveness
    probe; a replica that fails it twice, or whose process exits, is taken
    out of rotation and restarted (at most ``max_restarts`` times), then
    brought to the deployment's weights before it serves again.

    ``verify_hotloads``: ``"before_resume"`` (default) verifies what every
    replica computes with while it is still paused, so no request runs on
    unverified weights; ``"after_resume"`` keeps the paused window to pause +
    reload + resume and verifies right after (a failure pauses again and
    rolls back).
    """

    account_id = "local"

    def __init__(
        self,
        backend: str | Backend = "local",
        state_dir: str | os.PathLike[str] | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        inference_url: str | None = None,
        hotload_api_url: str | None = None,
        additional_headers: Mapping[str, str] | None = None,
        verify_ssl: bool | None = None,
        backend_options: Mapping[str, Any] | None = None,
        probe_interval: float = 2.0,
        probe_timeout: float = 10.0,
        max_restarts: int = 3,
        startup_timeout: float = 900.0,
        python: str | None = None,
        verify_hotloads: str = "before_resume",
    ) -> None:
        if isinstance(backend, str) and backend not in ("local", "ray"):
            raise ValueError(
                f"backend must be 'local', 'ray' or a backend object, got {backend!r} (an API key "
                "passed positionally, Fireworks-style? pass api_key=...)"
            )
        for name, value in (("probe_interval", probe_interval), ("probe_timeout", probe_timeout)):
            if not (isinstance(value, (int, float)) and 0 < value < 3600):
                raise ValueError(f"{name}={value!r} must be a number of seconds in (0, 3600)")
        if verify_hotloads not in ("before_resume", "after_resume"):
            raise ValueError(f"verify_hotloads={verify_hotloads!r}: 'before_resume' or 'after_resume'")
        self.verify_hotloads = verify_hotloads
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts={max_restarts!r} must be a non-negative int")
        self._backend_spec = backend
        self._backend_options = dict(backend_options or {})
        self._backend: Backend | None = None
        self.store = StateStore(state_dir if state_dir is not None else default_state_dir())
        self.api_key = api_key
        self._headers = dict(additional_headers or {})
        self.probe_interval = float(probe_interval)
        self.probe_timeout = float(probe_timeout)
        self.max_restarts = max_restarts
        self.startup_timeout = startup_timeout
        self.python = python
        self._live: dict[str, Live] = {}
        self._lock = threading.RLock()
        self._control: _control.ControlServer | None = None
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        self._last_hotload_error_message: str | None = None
        #: Seconds spent in the most recent :meth:`wait_for_ready`.
        self.boot_time_s: float | None = None
        #: Fault injection for tests: ``fault_hook(point, replica, staged_path)``
        #: at named points of a hot-load (``"staged"``, ``"reloading"``).
        self.fault_hook: FaultHook | None = None
        del base_url, inference_url, hotload_api_url, verify_ssl

    # -- properties the reference has ------------------------------------------------------------

    @property
    def inference_url(self) -> str:
        """Pass to ``DeploymentSampler(inference_url=..., model=info.inference_model)``:
        the sampler resolves the deployment's replicas and spreads requests
        over them itself."""
        return SCHEME + str(self.store.root)

    @property
    def hotload_api_url(self) -> str:
        return self.inference_url

    @property
    def state_dir(self) -> Path:
        return self.store.root

    @property
    def last_hotload_error_message(self) -> str | None:
        return self._last_hotload_error_message

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = make_backend(self._backend_spec, **self._backend_options)
        return self._backend

    def __repr__(self) -> str:
        name = (
            self._backend_spec if isinstance(self._backend_spec, str) else type(self._backend_spec).__name__
        )
        return f"DeploymentManager(backend={name!r}, state_dir={str(self.store.root)!r})"

    # -- create, read ----------------------------------------------------------------------------

    def create_or_get(self, config: DeploymentConfig, force_recreate: bool = False) -> DeploymentInfo:
        """Create the deployment, or return it when it exists with the same
        configuration. A stored deployment whose immutable fields differ is
        refused with the differences named (``force_recreate=True`` deletes
        and recreates it); replica counts that differ are applied as by
        :meth:`update`. A deployment that is stopped (its owner is gone),
        scaled to zero or failed is started again at the weights it last
        served."""
        if not isinstance(config, DeploymentConfig):
            raise TypeError(f"config must be a DeploymentConfig, got {type(config).__name__}")
        config.validate()
        dep = config.deployment_id
        with self._lock:
            live = self._live.get(dep)
            if live is not None and not force_recreate:
                self._check_drift(live.config, config)
                self._apply_counts(live, config)
                return self._info_live(live)
            doc = self.store.read(dep)
            if doc is not None and not force_recreate:
                stored = DeploymentConfig.from_dict(doc["config"])
                self._check_drift(stored, config)
                owner = doc.get("owner")
                if owner_alive(owner) and not self._is_me(owner):
                    if any(getattr(stored, f) != getattr(config, f) for f in MUTABLE_FIELDS):
                        self._forward(doc, "update", {"deployment_id": dep, "fields": _mutable(config)})
                    info = self.get(dep)
                    assert info is not None
                    return info
                weights = Weights.from_dict(doc["weights"]) if doc.get("weights") else None
                return self._start(config, weights)
            if doc is not None or live is not None:
                self.delete(dep)
            return self._start(config, None)

    def _check_drift(self, stored: DeploymentConfig, wanted: DeploymentConfig) -> None:
        diff = {k: v for k, v in stored.differences(wanted).items() if k not in MUTABLE_FIELDS}
        if diff:
            listed = "; ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in sorted(diff.items()))
            raise DeploymentError(
                f"deployment {stored.deployment_id!r} exists with a different configuration ({listed}); "
                "pass force_recreate=True to delete and recreate it"
            )

    def get(self, deployment_id: str) -> DeploymentInfo | None:
        """The deployment, or None when there is none."""
        live = self._live.get(deployment_id)
        if live is not None:
            return self._info_live(live)
        doc = self.store.read(deployment_id)
        return self._info_doc(doc) if doc is not None else None

    def list(self) -> list[DeploymentInfo]:
        out = []
        for dep in self.store.ids():
            info = self.get(dep)
            if info is not None:
                out.append(info)
        return out

    def wait_for_ready(
        self, deployment_id: str, timeout_s: float = 600.0, poll_interval_s: float = 15.0
    ) -> DeploymentInfo:
        """Block until every replica is READY; raises ``RuntimeError``
        (:class:`DeploymentError`) if the deployment fails, is missing or is
        deleted, and :class:`TimeoutError` after ``timeout_s``."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while True:
            info = self.get(deployment_id)
            if info is None:
                raise DeploymentError(f"deployment {deployment_id!r} not found: create it first")
            if info.state == "READY":
                self.boot_time_s = time.monotonic() - t0
                return info
            if info.state in ("FAILED", "DELETING", "STOPPED", "SCALED_TO_ZERO"):
                raise DeploymentError(
                    f"deployment {deployment_id!r} is {info.state}"
                    + (f": {info.last_error}" if info.last_error else "")
                    + _replica_errors(info)
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"deployment {deployment_id!r} not ready within {timeout_s:.0f} s (state {info.state}; "
                    + ", ".join(f"replica {r.index}: {r.state}" for r in info.replicas)
                    + ")"
                )
            live = self._live.get(deployment_id)
            if live is not None:
                with live.changed:
                    live.changed.wait(min(remaining, 1.0))
            else:
                time.sleep(min(remaining, poll_interval_s, 1.0))

    # -- starting and watching -------------------------------------------------------------------

    def _is_me(self, owner: Mapping[str, Any] | None) -> bool:
        me = process_identity()
        return bool(owner) and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]  # type: ignore[union-attr]

    def _start(self, config: DeploymentConfig, weights: Weights | None) -> DeploymentInfo:
        dep = config.deployment_id
        bucket = config.hot_load_bucket_url or str(self.store.root / "buckets" / dep)
        bucket = bucket.removeprefix("file://")
        SnapshotStore(bucket)
        if weights is None:
            weights = Weights(
                None,
                str(Path(config.base_model).resolve())
                if Path(config.base_model).exists()
                else config.base_model,
            )
        live = Live(config, weights, bucket)
        # Created here, on the caller's thread (Ray's init wants the main one).
        self.backend  # noqa: B018
        with self._lock:
            self._live[dep] = live
            OWNED[(str(self.store.root), dep)] = live
            self._ensure_services()
            with self.store.lock(dep):
                self._save(live)
            for _ in range(config.replicas):
                self._add_replica(live)
            live.state = "CREATING" if config.replicas else "SCALED_TO_ZERO"
            self._save(live)
        return self._info_live(live)

    def _ensure_services(self) -> None:
        if self._control is None:
            self._control = _control.ControlServer(self._dispatch)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="rollstream-deploy-watch", daemon=True)
            self._watcher.start()

    def _owner_doc(self, deployment_id: str) -> tuple[Live | None, dict[str, Any] | None]:
        live = self._live.get(deployment_id)
        if live is not None:
            return live, None
        doc = self.store.read(deployment_id)
        if doc is None:
            raise DeploymentError(f"deployment {deployment_id!r} not found in {self.store.root}")
        return None, doc

    def _forward(self, doc: Mapping[str, Any], op: str, args: dict[str, Any], timeout: float = 3600.0) -> Any:
        owner = doc.get("owner") or {}
        dep = doc["config"]["deployment_id"]
        if not owner_alive(owner) or not owner.get("control"):
            raise DeploymentError(
                f"deployment {dep!r} is not running: the process that ran it (pid {owner.get('pid')}) is "
                "gone. create_or_get(config) starts it again at the weights it last served"
            )
        return _control.call(owner["control"], op, args, timeout)

    def _dispatch(self, op: str, args: dict[str, Any]) -> Any:
        """Control requests from other processes (see :mod:`._control`)."""
        dep = str(args.get("deployment_id"))
        if dep not in self._live:
            raise DeploymentError(f"this process (pid {os.getpid()}) does not own deployment {dep!r}")
        if op == "hotload":
            return self.hotload(**args)
        if op == "hotload_check_status":
            return self.hotload_check_status(dep, args.get("base_model", ""))
        if op == "update":
            self._update_fields(dep, dict(args.get("fields") or {}))
            return None
        if op == "scale_to_zero":
            self.scale_to_zero(dep)
            return None
        if op == "delete":
            self.delete(dep)
            return None
        raise DeploymentError(f"unknown control operation {op!r}")

    # -- hot-loading -----------------------------------------------------------------------------

    def hotload(
        self,
        deployment_id: str,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: Mapping[str, Any] | None = None,
        reset_prompt_cache: bool = True,
        timeout: int = 60,
        path: str | None = None,
        cmek_resource: str | None = None,
    ) -> dict[str, Any]:
        """Start loading snapshot ``snapshot_identity`` (from the deployment's
        bucket, or the snapshot store at ``path``) onto every replica; returns
        the status (:meth:`hotload_check_status`) at once. Refused before
        anything is paused: an unknown snapshot, a base model other than the
        deployment's, a delta whose ``previous_snapshot_identity`` is not
        what the deployment serves, a corrupt snapshot (checksums), a
        checkpoint a replica's host would refuse. ``reset_prompt_cache`` is
        accepted for compatibility: the prefix cache is always reset (stale
        KV after a weight change gives wrong outputs)."""
        live, doc = self._owner_doc(deployment_id)
        if live is None:
            assert doc is not None
            return dict(
                self._forward(
                    doc,
                    "hotload",
                    {
                        "deployment_id": deployment_id,
                        "base_model": base_model,
                        "snapshot_identity": snapshot_identity,
                        "incremental_snapshot_metadata": dict(incremental_snapshot_metadata or {}) or None,
                        "path": path,
                    },
                )
            )
        check_identity(snapshot_identity)
        if base_model and base_model not in (live.config.base_model, live.config.deployment_id):
            raise ValueError(
                f"base_model={base_model!r} is not deployment {deployment_id!r}'s base model "
                f"{live.config.base_model!r}"
            )
        with live.lock:
            if not live.status.done.is_set():
                raise HotloadError(
                    f"deployment {deployment_id!r} is already loading {live.status.target!r}", stage="check"
                )
            live.status = HotloadStatus(target=snapshot_identity, stage="staging")
            self._refresh_state(live)
            self._save(live)
        bucket = path.removeprefix("file://") if path else live.bucket
        meta = dict(incremental_snapshot_metadata or {})
        live.hotload_thread = threading.Thread(
            target=self._run_hotload,
            args=(live, snapshot_identity, bucket, meta),
            name=f"rollstream-hotload-{deployment_id}",
            daemon=True,
        )
        live.hotload_thread.start()
        del reset_prompt_cache, timeout, cmek_resource
        return self.hotload_check_status(deployment_id, base_model)

    def _run_hotload(self, live: Live, identity: str, bucket: str, meta: dict[str, Any]) -> None:
        status = live.status
        t0 = time.perf_counter()
        try:
            target = self._stage(live, identity, bucket, meta, status)
            with live.lock:
                replicas = [r for r in live.replicas if r.state == "READY"]
                if not replicas:
                    raise HotloadError(
                        f"deployment {live.config.deployment_id!r} has no ready replica to load "
                        f"{identity!r} into",
                        stage="check",
                    )
                for r in replicas:
                    r.state = "LOADING"
                self._save(live)
                try:
                    paths = {r.index: target[1].get(r.index, target[0].path) for r in replicas}
                    weights = commit(
                        replicas,
                        live.pool,
                        live.weights,
                        target[0],
                        paths,
                        transition=live.config.transition,
                        status=status,
                        fault=self.fault_hook,
                        verify=self.verify_hotloads,
                    )
                    live.weights = weights
                finally:
                    for r in replicas:
                        if r.state == "LOADING":
                            r.state = "READY"
                        elif r.state == "DOWN" and r.url is not None:
                            live.pool.set_state(r.url, "down")
            status.stage = "done"
            status.error = None
        except BaseException as e:
            status.error = str(e)
            status.failed_stage = getattr(e, "stage", None) or "stage"
            status.replica = getattr(e, "replica", None)
            status.stage = "error"
            self._last_hotload_error_message = status.error
            log.warning("hot-load of %s into %s failed: %s", identity, live.config.deployment_id, e)
            if not isinstance(e, Exception):
                raise
        finally:
            status.timings["total_s"] = time.perf_counter() - t0
            with live.lock:
                status.done.set()
                self._refresh_state(live)
                self._save(live)
            live.notify()

    def _stage(
        self, live: Live, identity: str, bucket: str, meta: Mapping[str, Any], status: HotloadStatus
    ) -> tuple[Weights, dict[int, str]]:
        """Resolve, check the chain of, materialise and verify the snapshot on
        every replica's host, all before anything is paused."""
        t = time.perf_counter()
        store = SnapshotStore(bucket)
        try:
            info = store.get(identity)
        except KeyError:
            raise HotloadError(
                f"no snapshot {identity!r} in {bucket}; nothing was changed", stage="stage"
            ) from None
        current = live.weights.identity
        previous = meta.get("previous_snapshot_identity")
        if meta and previous != current:
            raise HotloadError(
                f"delta {identity!r} was made against {previous!r} but the deployment serves "
                f"{current or 'the base model'!r}: refused before any pause (load a full snapshot, or the "
                "delta's parent first)",
                stage="stage",
            )
        if info.kind == "delta" and meta and info.parent != previous:
            raise HotloadError(
                f"snapshot {identity!r} is a delta of {info.parent!r}, not of {previous!r} as the "
                "request says",
                stage="stage",
            )
        try:
            path = store.materialize(identity)
        except Exception as e:
            raise HotloadError(f"staging {identity!r} failed, nothing was paused: {e}", stage="stage") from e
        paths: dict[int, str] = {}
        for r in [r for r in live.replicas if r.state == "READY" and r.handle is not None]:
            assert r.handle is not None
            try:
                if self._backend_name() == "local":
                    # Same host: each replica gets its own directory of hard
                    # links to the verified file (no copy), as separate hosts would.
                    paths[r.index] = str(
                        link_dir(
                            path,
                            self.store.dir(live.config.deployment_id) / "staged" / identity / f"r{r.index}",
                        )
                    )
                else:
                    paths[r.index] = r.handle.stage(bucket, identity)
            except Exception as e:
                raise HotloadError(
                    f"staging {identity!r} on replica {r.index} ({r.url}) failed, nothing was paused: {e}",
                    stage="stage",
                    replica=r.url,
                ) from e
        status.timings["stage_s"] = time.perf_counter() - t
        return Weights(identity, str(path)), paths

    def hotload_check_status(
        self, deployment_id: str, base_model: str = "", timeout: int = 30
    ) -> dict[str, Any]:
        """The reference's status shape, for *every* replica:
        ``{"replicas": [{"current_snapshot_identity", "readiness",
        "loading_state": {"stage", "target_snapshot_identity"}}], ...}`` plus
        rollstream's ``"hotload"`` (stage, error, replica, timings)."""
        live, doc = self._owner_doc(deployment_id)
        if live is None:
            assert doc is not None
            if owner_alive(doc.get("owner")) and (doc.get("owner") or {}).get("control"):
                return dict(
                    self._forward(doc, "hotload_check_status", {"deployment_id": deployment_id}, timeout)
                )
            replicas = doc.get("replicas", [])
            status = doc.get("hotload") or {}
        else:
            with live.lock:
                replicas = [dataclasses.asdict(r.info()) for r in live.replicas]
                status = live.status.to_dict()
        stage = status.get("stage", "done")
        return {
            "replicas": [
                {
                    "current_snapshot_identity": r.get("snapshot_identity"),
                    "readiness": r.get("state") == "READY" and stage in ("done", "error"),
                    "loading_state": {"stage": stage, "target_snapshot_identity": status.get("target")},
                    "url": r.get("url"),
                    "state": r.get("state"),
                }
                for r in replicas
            ],
            "hotload": status,
        }

    def wait_for_hotload(
        self,
        deployment_id: str,
        base_model: str,
        expected_identity: str,
        timeout_seconds: int = 400,
        poll_interval: int = 5,
    ) -> bool:
        """True once *every* replica is ready on ``expected_identity`` (the
        reference checks ``replicas[0]`` only); False on a failure for that
        snapshot (:attr:`last_hotload_error_message` says why) or a timeout."""
        self._last_hotload_error_message = None
        deadline = time.monotonic() + timeout_seconds
        live = self._live.get(deployment_id)
        while True:
            status = self.hotload_check_status(deployment_id, base_model)
            h = status["hotload"]
            replicas = status["replicas"]
            if h.get("stage") == "error" and h.get("target") == expected_identity:
                self._last_hotload_error_message = h.get("error")
                return False
            if (
                replicas
                and h.get("stage") == "done"
                and all(
                    r["readiness"] and r["current_snapshot_identity"] == expected_identity for r in replicas
                )
            ):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._last_hotload_error_message = (
                    f"hot-load of {expected_identity!r} into {deployment_id!r} not done within "
                    f"{timeout_seconds} s (stage {h.get('stage')})"
                )
                return False
            if live is not None:
                live.status.done.wait(min(remaining, 1.0))
                with live.changed:
                    live.changed.wait(min(remaining, 0.2))
            else:
                time.sleep(min(remaining, max(0.2, min(poll_interval, 1.0))))

    def hotload_and_wait(
        self,
        deployment_id: str,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: Mapping[str, Any] | None = None,
        reset_prompt_cache: bool = True,
        timeout_seconds: int = 400,
        path: str | None = None,
        cmek_resource: str | None = None,
    ) -> bool:
        """:meth:`hotload` then :meth:`wait_for_hotload`. Returns True; a
        failure raises :class:`HotloadError` (a ``RuntimeError``) naming the
        replica, the stage and the cause, instead of returning False."""
        self.hotload(
            deployment_id,
            base_model,
            snapshot_identity,
            incremental_snapshot_metadata,
            reset_prompt_cache,
            path=path,
            cmek_resource=cmek_resource,
        )
        if self.wait_for_hotload(deployment_id, base_model, snapshot_identity, timeout_seconds):
            return True
        status = self.hotload_check_status(deployment_id, base_model)["hotload"]
        raise HotloadError(
            self._last_hotload_error_message or f"hot-load of {snapshot_identity!r} failed",
            stage=status.get("failed_stage"),
            replica=status.get("replica"),
        )

    def hotload_timings(self, deployment_id: str) -> dict[str, float]:
        """Seconds per stage of the latest hot-load: ``stage_s``, ``check_s``,
        ``pause_s``, ``reload_s``, ``verify_s``, ``resume_s``,
        ``paused_window_s`` (first pause to last resume), ``total_s``."""
        return dict(self.hotload_check_status(deployment_id)["hotload"].get("timings", {}))

    # -- warmup ----------------------------------------------------------------------------------

    def warmup(self, model: str, max_retries: int = 30, retry_interval_s: float = 10.0) -> bool:
        """Send a short completion to every replica of the deployment serving
        ``model`` until each answers 200; False after ``max_retries``."""
        info = self._find_model(model)
        if info is None:
            raise DeploymentError(f"no deployment serves model {model!r} in {self.store.root}")
        headers = dict(self._headers)
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        body = {"model": info.inference_model, "prompt": [1, 2], "max_tokens": 4, "temperature": 0.0}
        pending = set(info.replica_urls)
        if not pending:
            return False
        with httpx.Client(timeout=60.0, headers=headers) as client:
            for _attempt in range(max_retries):
                for url in sorted(pending):
                    with contextlib.suppress(httpx.HTTPError):
                        if client.post(url + "/v1/completions", json=body).status_code == 200:
                            pending.discard(url)
                if not pending:
                    return True
                time.sleep(retry_interval_s)
        return False

    def _find_model(self, model: str) -> DeploymentInfo | None:
        dep = model.rsplit("/deployments/", 1)[-1]
        info = self.get(dep) if (dep in self._live or self.store.dir(dep).exists()) else None
        if info is not None:
            return info
        return next((i for i in self.list() if i.inference_model == model), None)

    # -- update, scale, delete -------------------------------------------------------------------

    def update(
        self,
        deployment_id: str,
        body: Mapping[str, Any] | None = None,
        update_mask: str | builtins.list[str] | None = None,
        **fields: Any,
    ) -> DeploymentInfo:
        """Change mutable fields (replica counts, description, annotations)
        without restarting healthy replicas: new replicas start at the
        deployment's current weights and join after verification; removed
        replicas leave rotation first and finish their requests. Accepts
        the reference's ``body`` (camelCase) + ``update_mask`` form, or
        keywords (``min_replica_count=2``)."""
        merged = dict(fields)
        if body is not None:
            mask = update_mask.split(",") if isinstance(update_mask, str) else list(update_mask or body)
            for key, value in body.items():
                snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
                if key in mask or snake in mask:
                    merged[snake] = value
        unknown = sorted(set(merged) - MUTABLE_FIELDS)
        if unknown:
            raise ValueError(
                f"cannot update {unknown} of a live deployment (mutable: {sorted(MUTABLE_FIELDS)}); "
                "create_or_get(config, force_recreate=True) recreates it"
            )
        live, doc = self._owner_doc(deployment_id)
        if live is None:
            assert doc is not None
            if not owner_alive(doc.get("owner")):
                cfg = dataclasses.replace(DeploymentConfig.from_dict(doc["config"]), **merged)
                self.store.write(deployment_id, {**doc, "config": cfg.to_dict()})
                info = self.get(deployment_id)
                assert info is not None
                return info
            self._forward(doc, "update", {"deployment_id": deployment_id, "fields": merged})
            info = self.get(deployment_id)
            assert info is not None
            return info
        self._update_fields(deployment_id, merged)
        return self._info_live(live)

    def _update_fields(self, deployment_id: str, fields: Mapping[str, Any]) -> None:
        live = self._live[deployment_id]
        with live.lock:
            cfg = dataclasses.replace(live.config, **fields)
            self._apply_counts(live, cfg)

    def scale_to_zero(self, deployment_id: str) -> None:
        """Stop every replica; the configuration and the weights it served
        are kept, and :meth:`create_or_get` brings it back at them."""
        live, doc = self._owner_doc(deployment_id)
        if live is None:
            assert doc is not None
            if owner_alive(doc.get("owner")):
                self._forward(doc, "scale_to_zero", {"deployment_id": deployment_id})
                return
            cfg = dataclasses.replace(
                DeploymentConfig.from_dict(doc["config"]), min_replica_count=0, max_replica_count=0
            )
            self.store.write(
                deployment_id, {**doc, "config": cfg.to_dict(), "state": "SCALED_TO_ZERO", "replicas": []}
            )
            return
        self._update_fields(deployment_id, {"min_replica_count": 0, "max_replica_count": 0})

    def delete(self, deployment_id: str) -> None:
        """Stop every replica (requests in flight fail with a transport
        error) and forget the deployment. Its bucket is kept."""
        live = self._live.get(deployment_id)
        if live is None:
            doc = self.store.read(deployment_id)
            if doc is None:
                return
            if owner_alive(doc.get("owner")) and not self._is_me(doc.get("owner")):
                self._forward(doc, "delete", {"deployment_id": deployment_id})
                return
            with self.store.lock(deployment_id):
                self.store.remove(deployment_id)
            return
        self._stop_live(live, "DELETING")
        with self._lock:
            self._live.pop(deployment_id, None)
        with self.store.lock(deployment_id):
            self.store.remove(deployment_id)

    def close(self) -> None:
        """Stop every deployment this process owns (their state says STOPPED;
        :meth:`create_or_get` restarts them at their weights) and the
        manager's threads. Idempotent; also runs at interpreter exit through
        the supervisor's pipe."""
        self._closed.set()
        for dep, live in list(self._live.items()):
            self._stop_live(live, "STOPPED")
            with contextlib.suppress(Exception), self.store.lock(dep):
                live.closed = False
                live.state = "STOPPED"
                self._save(live)
                live.closed = True
        self._live.clear()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._backend is not None:
            self._backend.close()

    def __enter__(self) -> DeploymentManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- samplers --------------------------------------------------------------------------------

    def pool(self, deployment_id: str) -> EnginePool:
        """The routing pool of a deployment this process owns."""
        live = self._live.get(deployment_id)
        if live is None:
            raise DeploymentError(f"this process does not own deployment {deployment_id!r}")
        return live.pool


def _mutable(config: DeploymentConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in MUTABLE_FIELDS}


def _replica_errors(info: DeploymentInfo) -> str:
    errs = [f"replica {r.index}: {r.last_error}" for r in info.replicas if r.last_error]
    return ("; " + "; ".join(errs)) if errs else ""
