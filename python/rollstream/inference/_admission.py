"""How the client admits requests: failover over the router's pool, and
staleness pacing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import httpx

from .._exceptions import EngineUnavailableError
from .._pool import Route
from ..routing import EnginePool

__all__ = ["FailoverPool", "Staleness"]

log = logging.getLogger("rollstream.inference")


class FailoverPool:
    """The sampler's endpoint pool: the router's pool, plus taking an engine
    out of rotation when it stops answering (a transport failure) and back
    in when its ``/health`` answers again.

    While engines are paused, :meth:`acquire` waits for the resume; when
    every engine is down it waits ``down_timeout`` seconds for one to come
    back, then raises :class:`EngineUnavailableError` (None: waits, for
    deployments whose manager restarts replicas)."""

    def __init__(self, pool: EnginePool, probe_interval: float, down_timeout: float | None) -> None:
        self.pool = pool
        self.probe_interval = probe_interval
        self.down_timeout = down_timeout
        #: Set while the client holds admissions: a recovered engine rejoins paused.
        self.held = False
        #: The weight version every engine must serve to rejoin (set by weight
        #: updates through the client): an engine that was down during an
        #: update stays out rather than serve old weights.
        self.expected_version: str | None = None
        self._probing: set[str] = set()
        self._lock = threading.Lock()

    async def acquire(self, session: str | None) -> Route:
        route = self.pool.route_now(session)
        if route is not None:
            return route
        loads = self.pool.loads()
        if self.down_timeout is None or not loads or any(ld.state != "down" for ld in loads):
            return await self.pool.acquire(session)
        try:
            return await asyncio.wait_for(self.pool.acquire(session), self.down_timeout)
        except asyncio.TimeoutError:
            raise EngineUnavailableError(
                f"no engine left: every engine of {self.pool.name} has been down for "
                f"{self.down_timeout:g} s ({', '.join(ld.url for ld in loads)})"
            ) from None

    def release(self, route: Route, *, ok: bool) -> None:
        self.pool.release(route, ok=ok)
        if not ok:
            self._take_out(route.url)

    def _take_out(self, url: str) -> None:
        with self._lock:
            if url in self._probing:
                return
            self._probing.add(url)
        log.warning("engine %s stopped answering: out of rotation until /health answers", url)
        with contextlib.suppress(ValueError, KeyError):
            self.pool.set_state(url, "down")
        threading.Thread(target=self._probe, args=(url,), name=f"rollstream-probe-{url}", daemon=True).start()

    def _probe(self, url: str) -> None:
        try:
            with httpx.Client(timeout=5.0) as http:
                while url in self.pool.urls:
                    try:
                        if http.get(url + "/health").status_code == 200:
                            paused = http.get(url + "/is_paused").json().get("is_paused")
                            served = http.get(url + "/weight_info").json().get("weight_version")
                            stale = self.expected_version is not None and served != self.expected_version
                            if stale:
                                log.warning(
                                    "engine %s answers again but serves weights %r, not %r: kept out",
                                    url,
                                    served,
                                    self.expected_version,
                                )
                                return
                            if not paused:
                                self.pool.set_state(url, "paused" if self.held else "active")
                                log.warning("engine %s answers again: back in rotation", url)
                                return
                    except (httpx.HTTPError, ValueError, AttributeError):
                        pass
                    time.sleep(self.probe_interval)
        finally:
            with self._lock:
                self._probing.discard(url)

    def __repr__(self) -> str:
        return repr(self.pool)


class Staleness:
    """Admission pacing (AReaL's rule): rollout number ``i`` (from 0) may
    start once ``i < (version + max_staleness + 1) * batch_size``, so a
    trainer that consumes ``batch_size`` rollouts per weight version never
    trains on one admitted more than ``max_staleness`` versions earlier. It
    holds new work; it never discards finished work."""

    def __init__(self, max_staleness: int, batch_size: int) -> None:
        self.max_staleness = max_staleness
        self.batch_size = batch_size
        self.admitted = 0
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.version = 0

    def _cond(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._changed, self._loop = asyncio.Condition(), loop
        return self._changed

    def capacity(self) -> int:
        return (self.version + self.max_staleness + 1) * self.batch_size

    async def admit(self) -> int:
        cond = self._cond()
        async with cond:
            await cond.wait_for(lambda: self.admitted < self.capacity())
            self.admitted += 1
            return self.version

    async def advance(self, version: int) -> None:
        cond = self._cond()
        async with cond:
            self.version = version
            cond.notify_all()
