"""Replica lifecycle of the deployments a manager owns: launch, join at the
deployment's weights, liveness, restart, scale, stop.

A mixin of :class:`~rollstream.deployment.DeploymentManager` (it uses the
manager's backend, state store and settings); the public API is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import EngineStartError, HotloadError
from ..hotload import verify_fingerprint
from ._backends import LaunchSpec, view_dir
from ._config import DeploymentConfig
from ._live import Live
from ._replica import Replica, Weights

if TYPE_CHECKING:
    from ._backends import Backend
    from ._state import StateStore

__all__ = ["ReplicaLifecycle"]

log = logging.getLogger("rollstream.deployment")


class ReplicaLifecycle:
    """Launching, watching and stopping replicas (mixed into the manager)."""

    store: StateStore
    api_key: str | None
    python: str | None
    probe_interval: float
    probe_timeout: float
    max_restarts: int
    startup_timeout: float
    account_id: str
    _headers: dict[str, str]
    _live: dict[str, Live]
    _closed: threading.Event

    if TYPE_CHECKING:  # provided by the manager and StateViews

        @property
        def backend(self) -> Backend: ...

        def _save(self, live: Live) -> None: ...

    def _add_replica(self, live: Live) -> Replica:
        r = Replica(live.next_index, self.api_key, self._headers)
        live.next_index += 1
        live.replicas.append(r)
        self._launch(live, r)
        return r

    def _launch(self, live: Live, r: Replica) -> None:
        if r.retired:
            return
        r.cancel.clear()
        r.state = "STARTING"
        r.started_at = time.monotonic()
        r.starter = threading.Thread(
            target=self._run_start, args=(live, r), name=f"rollstream-replica-{r.index}", daemon=True
        )
        r.starter.start()

    def _spec(self, live: Live, r: Replica, weights: Weights) -> LaunchSpec:
        cfg = live.config
        shape = cfg.shape
        dep = cfg.deployment_id
        base = Path(cfg.base_model)
        model = cfg.base_model
        if weights.identity is not None:
            model = str(
                view_dir(cfg.base_model, Path(weights.path), self.store.dir(dep) / "views" / weights.identity)
            )
        roots = [self.store.dir(dep), Path(live.bucket)]
        if base.exists():
            roots.append(base.resolve())
        env = dict(shape.env)
        env.update(cfg.extra_values or {})
        env["ROLLSTREAM_SNAPSHOT_ROOTS"] = os.pathsep.join(str(Path(p).resolve()) for p in roots)
        args = list(shape.args)
        if self.api_key:
            args += ["--api-key", self.api_key]
        args += list(cfg.extra_args or [])
        name = cfg.served_model_name or dep
        logs = self.store.dir(dep) / "logs"
        return LaunchSpec(
            deployment_id=dep,
            index=r.index,
            model=model,
            served_model_name=(name, f"accounts/{self.account_id}/deployments/{dep}"),
            args=args,
            env=env,
            log_path=str(logs / f"replica-{r.index}-{int(time.time())}-{r.restarts}.log"),
            resources=dict(shape.resources),
            python=self.python,
            replicas=max(1, cfg.replicas),
        )

    def _run_start(self, live: Live, r: Replica) -> None:
        """Launch a replica, wait for it, bring it to the deployment's weights
        and put it into rotation. Runs in its own thread."""
        try:
            started_with = live.weights
            handle = self.backend.launch(self._spec(live, r, started_with))
            with live.lock:
                r.attach(handle)
                self._save(live)
            handle.wait_healthy(self.startup_timeout, cancelled=r.cancel.is_set)
            with live.lock:
                if r.cancel.is_set() or live.closed:
                    return
                r.state = "SYNCING"
                self._sync_joiner(live, r, started_with)
                r.state = "READY"
                r.failures = 0
                r.ready_at = time.monotonic()
                r.last_error = None
                live.pool.add(str(r.url))
                if r.stale_url is not None and r.stale_url != r.url:
                    live.pool.remove(r.stale_url)
                r.stale_url = None
                self._refresh_state(live)
                self._save(live)
        except Exception as e:
            with live.lock:
                if r.cancel.is_set() or live.closed:
                    return
                r.last_error = str(e)[-4000:]
                log.warning("replica %d of %s failed to start: %s", r.index, live.config.deployment_id, e)
                # A server that exits before it ever served has a problem a
                # restart will not fix (arguments, model, memory): fail now
                # with its log instead of retrying for minutes.
                never_served = r.ready_at is None and r.restarts == 0
                r.state = "FAILED" if never_served and isinstance(e, EngineStartError) else "DOWN"
                self._refresh_state(live)
                self._save(live)
        finally:
            live.notify()

    def _sync_joiner(self, live: Live, r: Replica, started_with: Weights) -> None:
        """Bring a replica that just started to the deployment's current
        weights and check it serves them (called under ``live.lock``, so no
        hot-load runs meanwhile)."""
        assert r.control is not None
        assert r.handle is not None
        w = live.weights
        if w.path != started_with.path:
            # A hot-load happened while this replica was starting.
            path = r.handle.stage(live.bucket, w.identity) if w.identity is not None else w.path
            r.control.check_checkpoint(path)
            r.control.pause("keep")
            try:
                r.control.reload(path, fallback=started_with.path)
                r.control.reset_prefix_cache()
            finally:
                r.control.resume()
        path = w.path
        report = r.control.fingerprint(path)

        verify_fingerprint(report, str(r.url), w.identity or "base")
        if w.digest is None:
            live.weights = dataclasses.replace(w, digest=report["digest"])
        elif report["digest"] != w.digest:
            raise HotloadError(
                f"replica {r.index} ({r.url}) serves weights whose digest {report['digest']} differs "
                f"from the deployment's {w.digest}",
                stage="verify",
                replica=r.url,
            )
        if w.identity is not None:
            r.control.set_weight_version(w.identity)
        r.snapshot_identity = w.identity

    def _watch(self) -> None:
        """Liveness of every owned replica; restarts; state upkeep."""
        while not self._closed.wait(self.probe_interval):
            for live in list(self._live.values()):
                if live.closed:
                    continue
                try:
                    self._probe(live)
                except Exception:  # the watcher must never die
                    log.exception("deployment watcher error on %s", live.config.deployment_id)

    def _probe(self, live: Live) -> None:
        for r in list(live.replicas):
            if r.state != "READY" or not live.status.done.is_set():
                continue
            h, c = r.handle, r.control
            if h is None or c is None:
                continue
            reason = None
            if not h.alive():
                reason = "its process exited"
            else:
                try:
                    c.liveness(timeout=self.probe_timeout)
                    r.failures = 0
                except Exception as e:
                    r.failures += 1
                    if r.failures >= 2:
                        reason = f"it failed {r.failures} liveness probes ({e})"
            if reason is not None:
                self._replica_down(live, r, reason)
        with live.lock:
            for r in list(live.replicas):
                if r.state == "DOWN" and (r.starter is None or not r.starter.is_alive()):
                    if r.restarts >= self.max_restarts:
                        r.state = "FAILED"
                        r.last_error = f"{r.last_error} (gave up after {r.restarts} restarts)"
                        self._refresh_state(live)
                        self._save(live)
                        continue
                    self._restart(live, r)

    def _replica_down(self, live: Live, r: Replica, reason: str) -> None:
        with live.lock:
            # A replica being retired (scale-down, delete) stops on purpose.
            if r.state != "READY" or r.retired or r not in live.replicas:
                return
            log.warning("replica %d of %s is down: %s", r.index, live.config.deployment_id, reason)
            if r.url is not None:
                with contextlib.suppress(KeyError):
                    live.pool.set_state(r.url, "down")
            r.state = "DOWN"
            r.last_error = reason
            self._refresh_state(live)
            self._save(live)
        live.notify()

    def _restart(self, live: Live, r: Replica) -> None:
        # The old URL stays in the pool, down, until the new one joins: a
        # sampler waits for the replica instead of finding no engine at all.
        r.stale_url = r.url or r.stale_url
        h = r.handle
        r.handle = None
        if h is not None:
            with contextlib.suppress(Exception):
                h.stop(10.0)
        r.restarts += 1
        self._launch(live, r)
        self._save(live)

    def _refresh_state(self, live: Live) -> None:
        if live.closed:
            return
        want = live.config.replicas
        ready = sum(r.state == "READY" for r in live.replicas)
        if want == 0:
            live.state = "SCALED_TO_ZERO"
        elif not live.status.done.is_set():
            live.state = "UPDATING"
        elif ready >= want and len(live.replicas) == want:
            live.state = "READY"
        elif all(r.state == "FAILED" for r in live.replicas):
            live.state = "FAILED"
        elif ready == 0:
            live.state = (
                "CREATING"
                if any(r.state in ("STARTING", "SYNCING", "DOWN") for r in live.replicas)
                else "FAILED"
            )
        elif len(live.replicas) != want:
            live.state = "UPDATING"
        else:
            live.state = "DEGRADED"

    # -- state documents -------------------------------------------------------------------------

    def _apply_counts(self, live: Live, cfg: DeploymentConfig) -> None:
        with live.lock:
            live.config = cfg
            want = cfg.replicas
            running = [r for r in live.replicas if r.state != "STOPPED"]
            while len(running) < want:
                running.append(self._add_replica(live))
            surplus = running[want:]
            for r in surplus:
                live.replicas.remove(r)
            self._refresh_state(live)
            self._save(live)
        for r in surplus:
            self._retire(live, r)
        with live.lock:
            self._refresh_state(live)
            self._save(live)
        live.notify()

    def _retire(self, live: Live, r: Replica, drain_s: float = 30.0) -> None:
        """Take a replica out of rotation, let its requests finish (up to
        ``drain_s``), stop it."""
        r.retired = True
        url = r.url
        if url is not None:
            live.pool.set_state(url, "paused")
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline:
                load = next((ld for ld in live.pool.loads() if ld.url == url), None)
                if load is None or load.outstanding == 0:
                    break
                time.sleep(0.1)
            live.pool.remove(url)
        r.stop()

    def _stop_live(self, live: Live, state: str) -> None:
        with live.lock:
            live.closed = True
            live.state = state
            replicas = list(live.replicas)
        live.pool.close()
        for r in replicas:
            r.cancel.set()
        with ThreadPoolExecutor(max_workers=max(1, len(replicas))) as ex:
            list(ex.map(lambda r: r.stop(), replicas))
        live.notify()
