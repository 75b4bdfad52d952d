"""A hot-load of every replica of a deployment, as one transaction.

Staging (materialising and verifying the snapshot on each replica's host)
happens before anything is paused, so the paused window does not grow with
the snapshot's size. Then, under pause on every replica: reload (with the
worker falling back to the previous weights on a failed load), reset the
prefix cache, verify what each replica computes with against the checkpoint
and against each other, set the weight version, resume. Any failure rolls
every replica back to the previous weights, so the deployment never serves
two versions as one, and every paused replica is resumed on every path
(``KeyboardInterrupt`` included). The vLLM facts behind each step:
``docs/ENGINE.md``, sections 3-6.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._exceptions import HotloadError
from ..hotload import ServerControl, verify_fingerprint
from ..routing import EnginePool
from ._replica import Replica, Weights

__all__ = ["HotloadStatus", "commit"]

T = TypeVar("T")

#: Called as ``hook(point, replica, staged_path)`` at named points of the
#: transaction (``"staged"``, ``"reloading"``): tests inject real faults
#: through it, e.g. corrupting one replica's staged checkpoint.
FaultHook = Callable[[str, Replica, str], None]


@dataclass
class HotloadStatus:
    """Progress of the deployment's latest hot-load, for
    ``hotload_check_status`` (stages: ``staging``, ``checking``, ``pausing``,
    ``loading``, ``verifying``, ``rolling_back``, ``resuming``, ``done``,
    ``error``)."""

    target: str | None = None
    stage: str = "done"
    error: str | None = None
    failed_stage: str | None = None
    replica: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "stage": self.stage,
            "error": self.error,
            "failed_stage": self.failed_stage,
            "replica": self.replica,
            "timings": dict(self.timings),
        }


def _parallel(
    replicas: Sequence[Replica], fn: Callable[[Replica], T]
) -> list[tuple[Replica, T | BaseException]]:
    """``fn`` on every replica at once; results (or exceptions) in order."""
    if not replicas:
        return []
    with ThreadPoolExecutor(max_workers=len(replicas), thread_name_prefix="rollstream-hotload") as ex:
        futures = [ex.submit(fn, r) for r in replicas]
        out: list[tuple[Replica, T | BaseException]] = []
        for r, f in zip(replicas, futures, strict=True):
            try:
                out.append((r, f.result()))
            except BaseException as e:
                out.append((r, e))
        return out


def _control(r: Replica) -> ServerControl:
    if r.control is None:
        raise HotloadError(f"replica {r.index} has no server", stage="check", replica=None)
    return r.control


def _first_failure(results: list[tuple[Replica, Any]], stage: str) -> HotloadError | None:
    for r, res in results:
        if isinstance(res, BaseException):
            if isinstance(res, HotloadError):
                return HotloadError(
                    f"replica {r.index} ({r.url}): {res}", stage=res.stage or stage, replica=r.url
                )
            return HotloadError(
                f"replica {r.index} ({r.url}): {stage} failed: {res!r}", stage=stage, replica=r.url
            )
    return None


def _verify(
    replicas: Sequence[Replica],
    paths: dict[int, str],
    version: str,
    expected: dict[int, dict[str, str]] | None,
) -> str:
    """Fingerprint every replica against its checkpoint; the common digest."""

    def fp(r: Replica) -> dict[str, Any]:
        report = _control(r).fingerprint(paths[r.index], expected.get(r.index) if expected else None)
        verify_fingerprint(report, str(r.url), version)
        return report

    results = _parallel(replicas, fp)
    err = _first_failure(results, "verify")
    if err is not None:
        raise err
    digests = {r.index: res["digest"] for r, res in results if isinstance(res, dict)}
    if len(set(digests.values())) > 1:
        listed = ", ".join(f"replica {i}: {d}" for i, d in sorted(digests.items()))
        raise HotloadError(f"replicas serve different weights for {version}: {listed}", stage="verify")
    return str(next(iter(digests.values())))


def commit(
    replicas: Sequence[Replica],
    pool: EnginePool,
    current: Weights,
    target: Weights,
    paths: dict[int, str],
    *,
    transition: str,
    status: HotloadStatus,
    fault: FaultHook | None = None,
    verify: str = "before_resume",
) -> Weights:
    """Switch ``replicas`` from ``current`` to ``target`` (staged at
    ``paths[replica.index]``); returns ``target`` with its digest. On failure
    every replica is back on ``current`` (or named as lost in the error).

    ``verify``: ``"before_resume"`` checks what every replica computes with
    while still paused, so no request ever runs on unverified weights;
    ``"after_resume"`` shortens the paused window to pause + reload + resume
    and checks right after (a failure pauses again and rolls back)."""
    label = target.identity or "base"
    t0 = time.perf_counter()

    status.stage = "checking"

    def check(r: Replica) -> dict[str, str]:
        c = _control(r)
        c.check_checkpoint(paths[r.index])
        return c.checkpoint_hashes(paths[r.index])

    checks = _parallel(replicas, check)
    err = _first_failure(checks, "check")
    if err is not None:
        raise err
    expected = {r.index: res for r, res in checks if isinstance(res, dict)}
    status.timings["check_s"] = time.perf_counter() - t0
    if fault is not None:
        for r in replicas:
            fault("staged", r, paths[r.index])

    urls = [str(r.url) for r in replicas]
    mode = "wait" if transition == "SYNC" else "keep"
    window_start = time.perf_counter()
    committed = False
    pool.pause(urls)
    try:
        status.stage = "pausing"
        results = _parallel(replicas, lambda r: _control(r).pause(mode))
        err = _first_failure(results, "pause")
        if err is not None:
            raise err
        status.timings["pause_s"] = time.perf_counter() - window_start

        status.stage = "loading"
        t = time.perf_counter()

        def reload(r: Replica) -> dict[str, Any]:
            if fault is not None:
                fault("reloading", r, paths[r.index])
            return _control(r).reload(paths[r.index], fallback=current.path)

        reloads = _parallel(replicas, reload)
        status.timings["reload_s"] = time.perf_counter() - t
        err = _first_failure(reloads, "reload")
        if err is not None:
            # Failed replicas restored the previous weights themselves; the
            # others now hold the new ones and go back.
            switched = [r for r, res in reloads if not isinstance(res, BaseException)]
            _rollback(switched, replicas, current, status)
            raise err

        status.stage = "verifying"
        t = time.perf_counter()
        try:
            _parallel_or_raise(replicas, lambda r: _control(r).reset_prefix_cache(), "reset_prefix_cache")
            if verify == "before_resume":
                digest = _verify(replicas, paths, label, expected)
            if target.identity is not None:
                _parallel_or_raise(
                    replicas,
                    lambda r: _control(r).set_weight_version(str(target.identity)),
                    "update_weight_version",
                )
        except BaseException:
            _rollback(list(replicas), replicas, current, status)
            raise
        status.timings["verify_s"] = time.perf_counter() - t
        committed = True
    finally:
        status.stage = "resuming"
        t = time.perf_counter()
        # Every replica, paused or not (resuming is idempotent): an interrupt
        # can land between a pause and its bookkeeping.
        resumes = _parallel(replicas, lambda r: _control(r).resume_shielded())
        pool.resume(urls)
        status.timings["resume_s"] = time.perf_counter() - t
        status.timings["paused_window_s"] = time.perf_counter() - window_start
        err = _first_failure(resumes, "resume")
        if err is not None:
            for r, res in resumes:
                if isinstance(res, BaseException):
                    r.state = "DOWN"
                    r.last_error = f"resume failed: {res}"
            if committed:  # otherwise the original failure is on its way out
                raise err
    if verify == "after_resume":
        # Serving already: a failure pauses again and goes back.
        status.stage = "verifying"
        t = time.perf_counter()
        try:
            digest = _verify(replicas, paths, label, expected)
        except BaseException:
            pool.pause(urls)
            try:
                _parallel(replicas, lambda r: _control(r).pause("keep"))
                _rollback(list(replicas), replicas, current, status)
                if current.identity is not None:
                    _parallel(replicas, lambda r: _control(r).set_weight_version(str(current.identity)))
            finally:
                _parallel(replicas, lambda r: _control(r).resume_shielded())
                pool.resume(urls)
            raise
        status.timings["verify_s"] = status.timings.get("verify_s", 0.0) + time.perf_counter() - t
    status.timings["commit_s"] = time.perf_counter() - t0
    for r in replicas:
        r.snapshot_identity = target.identity
    return Weights(target.identity, target.path, digest)


def _parallel_or_raise(replicas: Sequence[Replica], fn: Callable[[Replica], object], stage: str) -> None:
    err = _first_failure(_parallel(replicas, fn), stage)
    if err is not None:
        raise err


def _rollback(
    switched: Sequence[Replica], everyone: Sequence[Replica], current: Weights, status: HotloadStatus
) -> None:
    """Put ``switched`` back on ``current`` and check every replica serves it.
    A replica that cannot be restored is marked DOWN (the watcher restarts it
    at ``current``); the rollback itself never raises."""
    status.stage = "rolling_back"
    t = time.perf_counter()

    def back(r: Replica) -> None:
        c = _control(r)
        c.reload(current.path, fallback=None)

    for r, res in _parallel(switched, back):
        if isinstance(res, BaseException):
            r.state = "DOWN"
            r.last_error = f"rollback to {current.identity or 'base'} failed: {res}"

    def check(r: Replica) -> None:
        c = _control(r)
        c.reset_prefix_cache()
        verify_fingerprint(c.fingerprint(current.path), str(r.url), current.identity or "base")

    for r, res in _parallel([r for r in everyone if r.state != "DOWN"], check):
        if isinstance(res, BaseException):
            r.state = "DOWN"
            r.last_error = f"after rollback the replica does not serve {current.identity or 'base'}: {res}"
    status.timings["rollback_s"] = time.perf_counter() - t
