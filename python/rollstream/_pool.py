"""Where each attempt is sent: the endpoint pool.

Every attempt of :class:`~rollstream.DeploymentSampler` asks one
:class:`EndpointPool` for a :class:`Route` (a replica's base URL) after it
holds its concurrency slot, sends the request and, when sampling masks are
wanted, fetches them from the same route, then releases the route exactly
once. ``session`` (a call's ``prompt_cache_key``, or ``session=``) lets a
pool keep a conversation on one replica, where its prefix is cached.

:class:`StaticPool` is the single-server pool. A multi-replica pool may make
``acquire`` wait, e.g. while a replica is paused for a weight update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["EndpointPool", "Route", "StaticPool", "pool_for"]


@runtime_checkable
class Route(Protocol):
    """One server an attempt goes to."""

    @property
    def url(self) -> str:
        """Base URL, e.g. ``"http://127.0.0.1:8001"`` (no trailing slash)."""
        ...


@runtime_checkable
class EndpointPool(Protocol):
    """Hands out routes. ``release`` is called exactly once per ``acquire``
    (in ``finally``), with ``ok=False`` when the attempt failed at the
    transport level (connect error, reset, timeout)."""

    async def acquire(self, session: str | None) -> Route: ...

    def release(self, route: Route, *, ok: bool) -> None: ...


@dataclass(frozen=True)
class StaticRoute:
    url: str


class StaticPool:
    """One server, never waits."""

    def __init__(self, url: str) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"StaticPool needs an http(s) base URL, got {url!r}")
        self._route = StaticRoute(url.rstrip("/"))

    @property
    def url(self) -> str:
        return self._route.url

    async def acquire(self, session: str | None) -> Route:
        return self._route

    def release(self, route: Route, *, ok: bool) -> None:
        pass

    def __repr__(self) -> str:
        return f"StaticPool({self._route.url!r})"


def pool_for(inference_url: str | Sequence[str], model: str) -> EndpointPool:
    """The pool an ``inference_url`` names: one server (``http(s)://...``),
    several (a list of URLs, routed by :class:`rollstream.routing.EnginePool`),
    or a deployment's replicas (a DeploymentManager's ``rollstream://...``
    URL, with ``model`` naming the deployment), resolved client-side."""
    if isinstance(inference_url, str):
        if inference_url.startswith(("http://", "https://")):
            return StaticPool(inference_url)
        if inference_url.startswith("rollstream://"):
            from .deployment import deployment_pool

            return deployment_pool(inference_url, model)
    elif (
        isinstance(inference_url, Sequence)
        and inference_url
        and all(isinstance(u, str) for u in inference_url)
    ):
        from .routing import EnginePool

        return EnginePool(inference_url)
    raise ValueError(
        f"inference_url must be an http(s) URL, a list of them, or a DeploymentManager's "
        f"inference_url (rollstream://...), got {inference_url!r}"
    )
