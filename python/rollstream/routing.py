"""Several inference servers as one: client-side routing with no router
process in the data path.

:class:`EnginePool` wraps the Rust router (``rollstream_core::router``:
sticky least-loaded sessions, least-outstanding otherwise, rendezvous-hash
tie-breaks) with what an asyncio caller needs: :meth:`EnginePool.acquire`
waits, without holding a thread or a lock, while every eligible engine is
paused (a weight update) or down (a restart), and is woken the moment one
comes back. It is safe to use from any thread and any event loop, and
engines can be added, removed, paused and resumed at any time.

The DeploymentSampler, the InferenceEngineClient and the DeploymentManager
all route through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from . import _core
from ._exceptions import EngineUnavailableError

__all__ = ["EngineLoad", "EnginePool", "Route"]

EngineState = Literal["active", "paused", "down"]


@dataclass(frozen=True)
class Route:
    """Where one request goes: ``url`` is the engine's base URL. Give it
    back with :meth:`EnginePool.release` exactly once."""

    url: str
    slot: int
    session: str | None = None


@dataclass(frozen=True)
class EngineLoad:
    url: str
    state: EngineState
    outstanding: int
    sessions: int


class EnginePool:
    """Engines (base URLs) behind one :meth:`acquire`.

    ``acquire(session)`` returns a :class:`Route`; requests of one session
    stay on one engine until :meth:`finish_session`. Paused engines take no
    new request; a down engine's sessions move. :meth:`acquire` raises
    :class:`EngineUnavailableError` only when the pool has no engine at all
    (or was closed).
    """

    def __init__(self, urls: Iterable[str] = (), *, name: str = "engines") -> None:
        self.name = name
        self._router = _core.Router()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closed = False
        for url in urls:
            self.add(url)

    # -- membership and state (any thread) ------------------------------------------------------

    def add(self, url: str) -> None:
        """Add an engine (or set a known one active again)."""
        self._router.add(_normalize(url))
        self._wake()

    def remove(self, url: str) -> None:
        """Remove an engine; its sessions move on their next request."""
        try:
            self._router.remove(_normalize(url))
        except KeyError:
            return
        self._wake()

    def set_state(self, url: str, state: EngineState) -> None:
        self._router.set_state(_normalize(url), state)
        # Any change may unblock a waiter (a resumed engine, or a session
        # whose paused engine went down and may now move).
        self._wake()

    def pause(self, urls: Iterable[str] | None = None) -> None:
        """Hold new requests for these engines (default: all)."""
        for url in self.urls if urls is None else urls:
            self.set_state(url, "paused")

    def resume(self, urls: Iterable[str] | None = None) -> None:
        for url in self.urls if urls is None else urls:
            self.set_state(url, "active")

    @property
    def urls(self) -> list[str]:
        return [load[0] for load in self._router.loads()]

    def loads(self) -> list[EngineLoad]:
        return [EngineLoad(u, s, o, n) for u, s, o, n in self._router.loads()]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._router)

    def close(self) -> None:
        """Fail every waiter and every later acquire."""
        self._closed = True
        self._wake()

    # -- requests -------------------------------------------------------------------------------

    def route_now(self, session: str | None = None) -> Route | None:
        """A route if an engine is eligible right now, else None (never waits)."""
        slot, url = self._router.route(session)
        if slot >= 0:
            return Route(url, slot, session)
        if url == "none":
            raise EngineUnavailableError(f"{self.name}: no engine in the pool")
        return None

    async def acquire(self, session: str | None = None) -> Route:
        """A route for one request; waits while every eligible engine is
        paused or down."""
        while True:
            if self._closed:
                raise EngineUnavailableError(f"{self.name}: the pool was closed")
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            # Register before routing: a resume between the two cannot be missed.
            with self._lock:
                self._waiters.append((loop, fut))
            try:
                route = self.route_now(session)
                if route is not None:
                    return route
                await fut
            finally:
                with self._lock:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))

    def release(self, route: object, *, ok: bool = True) -> None:
        """The request on ``route`` (a :class:`Route` from :meth:`acquire`)
        finished; ``ok=False``: it failed on the transport (whether the
        engine is down is the caller's call)."""
        if not isinstance(route, Route):
            raise TypeError(f"release() takes a Route from this pool's acquire(), got {route!r}")
        self._router.done(route.slot)

    def finish_session(self, session: str) -> bool:
        """Release a session's binding (its engine's share of sessions)."""
        return bool(self._router.finish_session(session))

    def session_engine(self, session: str) -> str | None:
        engine: str | None = self._router.session_engine(session)
        return engine

    def _wake(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(_set, fut)

    def __repr__(self) -> str:
        states = ", ".join(f"{load.url}:{load.state}" for load in self.loads())
        return f"EnginePool({self.name!r}, [{states}])"


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _normalize(url: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"engine URL must be an http(s) URL, got {url!r}")
    return url.rstrip("/")
