"""Concurrency control for sampling: how many requests may be in flight.

The controllers follow the Fireworks SDK's protocol
(:class:`SamplingConcurrencyController`: ``window_size``, ``acquire()``,
``release(metrics=None)`` with the attempt's :class:`~rollstream.ServerMetrics`,
``step_completed()``, ``note_retry_exhausted(metrics)``), its constructor
arguments and defaults, so either side's controllers work with either side's
sampler. Both share one admission gate that fixes the SDK's flaws: waiters
are admitted in FIFO order, *as many as the window allows* (a grown window
is used at once, not one waiter per release), it is safe to use from any
thread and any event loop, and a cancelled waiter never leaks a slot. The
sampler releases its slot while it sleeps in retry back-off.

- :class:`FixedConcurrencyController`: a static window.
- :class:`AdaptiveConcurrencyController`: AIMD on the server's queueing
  signal (``prefill_queue_duration``: vLLM's per-request ``queue_time_ms``;
  without it, client-measured time to first token above what prefilling that
  prompt length takes), shrinking at once on 429/503 or transport errors.
  The state machine is in the Rust core.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import _core

if TYPE_CHECKING:
    from ._models import ServerMetrics

__all__ = [
    "AdaptiveConcurrencyController",
    "ConcurrencyController",
    "FixedConcurrencyController",
    "SamplingConcurrencyController",
]

#: Statuses that signal overload.
CONGESTION_STATUS = frozenset({429, 503})


@runtime_checkable
class SamplingConcurrencyController(Protocol):
    """What the sampler needs of a controller (the Fireworks SDK's protocol).
    ``note_retry_exhausted(metrics)`` is optional."""

    @property
    def window_size(self) -> int: ...

    async def acquire(self) -> None: ...

    def release(self, metrics: ServerMetrics | None = None) -> None: ...

    def step_completed(self) -> dict[str, float]: ...


def check_controller(controller: object) -> SamplingConcurrencyController:
    """``controller`` if it implements the protocol, else a TypeError naming
    what is missing."""
    missing = [
        name
        for name in ("window_size", "acquire", "release", "step_completed")
        if not hasattr(type(controller), name) and not hasattr(controller, name)
    ]
    acquire = getattr(controller, "acquire", None)
    if not missing and not inspect.iscoroutinefunction(acquire):
        missing.append("acquire (must be `async def`)")
    if missing:
        raise TypeError(
            f"concurrency_controller={controller!r} ({type(controller).__module__}."
            f"{type(controller).__name__}) does not implement the controller protocol: missing "
            f"{', '.join(missing)}. Pass rollstream.FixedConcurrencyController(n), "
            "rollstream.AdaptiveConcurrencyController(...) or an object with window_size, "
            "async acquire(), release(metrics=None) and step_completed()"
        )
    return controller  # type: ignore[return-value]


def is_congestion(metrics: ServerMetrics) -> bool:
    """A 429/503 or a failure below HTTP."""
    return bool(metrics.transport_error) or metrics.http_status_code in CONGESTION_STATUS


class _Gate:
    """FIFO admission of up to ``window`` holders, across threads and loops."""

    def __init__(self, window: int) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._in_flight = 0
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self.max_in_flight = 0

    @property
    def window(self) -> int:
        return self._window

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _admit_locked(self) -> list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]:
        granted = []
        while self._waiters and self._in_flight < self._window:
            granted.append(self._waiters.popleft())
            self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        return granted

    def _grant(self, granted: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
        for loop, fut in granted:
            try:
                loop.call_soon_threadsafe(self._resolve, fut)
            except RuntimeError:  # that loop is closed: give the slot back
                self.release()

    def _resolve(self, fut: asyncio.Future[None]) -> None:
        if fut.done():  # cancelled while the grant was on its way
            self.release()
        else:
            fut.set_result(None)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._in_flight < self._window:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove((loop, fut))
                    holding = False
                except ValueError:
                    holding = True  # already granted
            if holding and fut.done() and not fut.cancelled():
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            if self._in_flight <= 0:
                raise RuntimeError("release() without a matching acquire()")
            self._in_flight -= 1
            granted = self._admit_locked()
        self._grant(granted)

    def set_window(self, window: int) -> None:
        with self._lock:
            self._window = max(1, int(window))
            granted = self._admit_locked()
        self._grant(granted)

    def reset_max(self) -> int:
        with self._lock:
            peak, self.max_in_flight = self.max_in_flight, self._in_flight
        return peak


class ConcurrencyController:
    """Base of the controllers: the admission gate plus per-step counters."""

    def __init__(self, window: int) -> None:
        self._gate = _Gate(window)
        self._stats_lock = threading.Lock()
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._requests = 0
        self._cache_hits = 0
        self._cache_total = 0
        self._window_sum = 0.0
        self._window_samples = 0
        self._status_responses = 0
        self._congestion_responses = 0
        self._retry_exhaustions = 0

    @property
    def window_size(self) -> int:
        """Requests allowed in flight."""
        return self._gate.window

    @property
    def window(self) -> int:
        """Alias of :attr:`window_size`."""
        return self._gate.window

    @property
    def in_flight(self) -> int:
        return self._gate.in_flight

    async def acquire(self) -> None:
        """Wait for a slot (FIFO)."""
        await self._gate.acquire()

    def release(self, metrics: ServerMetrics | None = None) -> None:
        """Give the slot back; ``metrics`` (the attempt's) feeds the controller."""
        window = self._gate.window
        self._gate.release()
        with self._stats_lock:
            self._window_sum += window
            self._window_samples += 1
            if metrics is not None:
                self._requests += 1
                # Only pairs the server reported: an unknown cache is not a miss.
                if metrics.cached_prompt_tokens is not None and metrics.prompt_tokens:
                    self._cache_hits += metrics.cached_prompt_tokens
                    self._cache_total += metrics.prompt_tokens
                code = metrics.http_status_code
                if is_congestion(metrics):
                    self._status_responses += 1
                    self._congestion_responses += 1
                elif code is not None and 200 <= code < 300:
                    self._status_responses += 1
        if metrics is not None:
            self._observe(metrics)

    def _observe(self, metrics: ServerMetrics) -> None:
        """Hook: adapt the window to one attempt's metrics."""

    def note_retry_exhausted(self, metrics: ServerMetrics | None = None) -> None:
        """A request failed for good (after its last release)."""
        if metrics is not None and is_congestion(metrics):
            with self._stats_lock:
                self._retry_exhaustions += 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def _summary(self, window_before: int) -> dict[str, float]:
        """The step's counters (reset); keys without data are absent."""
        with self._stats_lock:
            out: dict[str, float] = {
                "window": float(window_before),
                "requests": float(self._requests),
                "max_in_flight": float(self._gate.reset_max()),
            }
            pending = self._gate.in_flight - window_before
            if pending > 0:
                out["pending_decrease"] = float(pending)
            if self._window_samples:
                out["avg_window"] = self._window_sum / self._window_samples
            if self._status_responses:
                out["status_responses"] = float(self._status_responses)
                out["congestion_responses"] = float(self._congestion_responses)
                out["congestion_rate"] = self._congestion_responses / self._status_responses
            if self._retry_exhaustions:
                out["retry_exhaustions"] = float(self._retry_exhaustions)
            if self._cache_total > 0:
                out["cache_hit_rate"] = self._cache_hits / self._cache_total
            self._reset_stats()
        return out

    def step_completed(self) -> dict[str, float]:
        """Call between training steps: a summary of the step (and a reset of
        its counters). ``window`` is the window during the step."""
        return self._summary(self._gate.window)


class FixedConcurrencyController(ConcurrencyController):
    """A static window of ``max_concurrency`` requests in flight."""

    def __init__(self, max_concurrency: int) -> None:
        if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive int, got {max_concurrency!r}")
        super().__init__(max_concurrency)

    def __repr__(self) -> str:
        return f"FixedConcurrencyController({self.window_size})"


class AdaptiveConcurrencyController(ConcurrencyController):
    """AIMD window on the server's prefill-queue delay (the Fireworks SDK's
    rules, arguments and defaults).

    ``prefill_queue_target`` is in seconds. Queue samples are averaged every
    ``adjustment_interval`` released requests (0: only at
    :meth:`step_completed`) into an EMA (weight ``ema_alpha``); above the
    target the window is multiplied by ``multiplicative_decrease``, below it
    grows by ``additive_increase * min(target / ema, 4)``. A 429/503 or
    transport failure shrinks at once (twice as hard from the third attempt
    of a request), once per ``shrink_cooldown_s``. ``initial_window`` is
    clamped into ``[min_window, max_window]``; contradictory settings
    (``min_window < 1``, ``max_window < min_window``, a non-positive target,
    factors outside their ranges) raise ``ValueError`` naming the value.

    Without ``prefill_queue_duration`` (vLLM's generate endpoint), the
    signal is the client-measured time to first token minus what prefilling
    that many uncached prompt tokens takes unqueued (estimated from recent
    requests, scaled to the prompt's length).
    """

    def __init__(
        self,
        initial_window: int = 8,
        min_window: int = 1,
        max_window: int = 256,
        prefill_queue_target: float = 0.5,
        additive_increase: float = 1.0,
        multiplicative_decrease: float = 0.5,
        ema_alpha: float = 0.3,
        adjustment_interval: int = 32,
        shrink_cooldown_s: float = 1.0,
        **deprecated: Any,
    ) -> None:
        for old, new in (("interval", "adjustment_interval"), ("congestion_cooldown", "shrink_cooldown_s")):
            if old in deprecated:
                warnings.warn(f"{old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=2)
                if old == "interval":
                    adjustment_interval = deprecated.pop(old)
                else:
                    shrink_cooldown_s = deprecated.pop(old)
        if deprecated:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(deprecated))}")
        if not isinstance(adjustment_interval, int) or adjustment_interval < 0:
            raise ValueError(f"adjustment_interval={adjustment_interval!r} must be a non-negative int")
        self._aimd = _core.Aimd(
            float(initial_window),
            float(min_window),
            float(max_window),
            float(prefill_queue_target),
            additive_increase=float(additive_increase),
            decrease=float(multiplicative_decrease),
            alpha=float(ema_alpha),
            interval=adjustment_interval,
            cooldown=float(shrink_cooldown_s),
        )
        super().__init__(self._aimd.window)
        self.prefill_queue_target = prefill_queue_target
        self.min_window = min_window
        self.max_window = max_window

    @property
    def ema_prefill_queue(self) -> float | None:
        """Smoothed queue signal, or None before the first adjustment."""
        return self._aimd.ema

    def _observe(self, metrics: ServerMetrics) -> None:
        now = time.monotonic()
        if is_congestion(metrics):
            window = self._aimd.congestion(max(1, metrics.retry_attempt or 1), now)
        elif metrics.prefill_queue_duration is not None:
            window = self._aimd.queue_time(metrics.prefill_queue_duration, now)
        elif metrics.client_ttft is not None and metrics.http_status_code in (None, 200):
            prefill = (metrics.prompt_tokens or 0) - (metrics.cached_prompt_tokens or 0)
            window = self._aimd.first_token(metrics.client_ttft, max(prefill, 0), now)
        else:
            return
        if window != self._gate.window:
            self._gate.set_window(window)

    def step_completed(self) -> dict[str, float]:
        """Adjust the window on the step's remaining samples and summarise
        the step: ``window`` is the value before this adjustment,
        ``window_after`` (present when there were samples) the value after;
        ``avg_pq``/``ema_pq`` the queue signal (seconds), ``cache_hit_rate``
        only when the server reported cached tokens."""
        aimd = self._aimd.step(time.monotonic())
        out = self._summary(int(aimd["window_before"]))
        self._gate.set_window(aimd["window"])
        if aimd["adjusted"]:
            out["window_after"] = float(aimd["window"])
        for key in ("avg_pq", "ema_pq"):
            if aimd[key] is not None:
                out[key] = float(aimd[key])
        for key in ("queue_samples", "ttft_samples", "shrinks", "grows"):
            out[key] = float(aimd[key])
        if aimd["congestion_events"]:
            out["congestion_events"] = float(aimd["congestion_events"])
        return out

    def __repr__(self) -> str:
        return (
            f"AdaptiveConcurrencyController(window={self.window_size}, min={self.min_window}, "
            f"max={self.max_window}, target={self.prefill_queue_target}s)"
        )
