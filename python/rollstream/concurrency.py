"""Concurrency control for sampling: how many requests may be in flight.

Both controllers share one admission gate that fixes the reference SDK's
flaws: waiters are admitted in FIFO order, *as many as the window allows*
(a grown window is used at once, not one waiter per release), it is safe to
use from any thread and any event loop, and a cancelled waiter never leaks a
slot. The sampler releases its slot while it sleeps in retry back-off.

- :class:`FixedConcurrencyController`: a static window.
- :class:`AdaptiveConcurrencyController`: AIMD on the server's queueing
  signal (vLLM's per-request ``metrics.queue_time_ms``, else client-measured
  time to first token above its baseline), shrinking at once on 429/503 or
  transport errors. The state machine is in the Rust core.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from . import _core

__all__ = ["AdaptiveConcurrencyController", "ConcurrencyController", "FixedConcurrencyController"]


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
    """Base of the controllers: a gate plus per-step counters."""

    def __init__(self, window: int) -> None:
        self._gate = _Gate(window)
        self._stats_lock = threading.Lock()
        self._requests = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._congestion = 0

    @property
    def window(self) -> int:
        """Requests allowed in flight."""
        return self._gate.window

    @property
    def in_flight(self) -> int:
        return self._gate.in_flight

    async def acquire(self) -> None:
        """Wait for a slot (FIFO)."""
        await self._gate.acquire()

    def release(self) -> None:
        self._gate.release()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def record_success(
        self,
        *,
        queue_time_s: float | None = None,
        first_token_s: float | None = None,
        prompt_tokens: int = 0,
        cached_tokens: int | None = None,
    ) -> None:
        """A request finished; feed its signals."""
        with self._stats_lock:
            self._requests += 1
            self._prompt_tokens += prompt_tokens
            self._cached_tokens += cached_tokens or 0

    def record_congestion(self, retry_attempt: int = 0) -> None:
        """A request met 429/503 or a transport error."""
        with self._stats_lock:
            self._congestion += 1

    def _base_summary(self) -> dict[str, Any]:
        with self._stats_lock:
            out: dict[str, Any] = {
                "window": self.window,
                "requests": self._requests,
                "max_in_flight": self._gate.reset_max(),
                "in_flight": self.in_flight,
                "congestion_events": self._congestion,
                "cache_hit_rate": (self._cached_tokens / self._prompt_tokens)
                if self._prompt_tokens
                else None,
            }
            self._requests = self._prompt_tokens = self._cached_tokens = self._congestion = 0
        return out

    def step_completed(self) -> dict[str, Any]:
        """Call between training steps: a summary of the step (and a reset of
        its counters)."""
        return self._base_summary()


class FixedConcurrencyController(ConcurrencyController):
    """A static window of ``max_concurrency`` requests in flight."""

    def __init__(self, max_concurrency: int) -> None:
        if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive int, got {max_concurrency!r}")
        super().__init__(max_concurrency)

    def __repr__(self) -> str:
        return f"FixedConcurrencyController({self.window})"


class AdaptiveConcurrencyController(ConcurrencyController):
    """AIMD window on the server's prefill-queue delay.

    ``prefill_queue_target`` is in seconds. The window is adjusted every
    ``interval`` finished requests and at :meth:`step_completed`.
    """

    def __init__(
        self,
        initial_window: int = 16,
        min_window: int = 1,
        max_window: int = 256,
        prefill_queue_target: float = 0.5,
        *,
        interval: int = 32,
        congestion_cooldown: float = 1.0,
    ) -> None:
        self._aimd = _core.Aimd(
            float(initial_window),
            float(min_window),
            float(max_window),
            float(prefill_queue_target),
            interval,
            congestion_cooldown,
        )
        super().__init__(self._aimd.window)
        self.prefill_queue_target = prefill_queue_target
        self.min_window = min_window
        self.max_window = max_window

    def record_success(
        self,
        *,
        queue_time_s: float | None = None,
        first_token_s: float | None = None,
        prompt_tokens: int = 0,
        cached_tokens: int | None = None,
    ) -> None:
        super().record_success(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens)
        now = time.monotonic()
        if queue_time_s is not None:
            window = self._aimd.queue_time(queue_time_s, now)
        elif first_token_s is not None:
            window = self._aimd.first_token(first_token_s, now)
        else:
            return
        if window != self._gate.window:
            self._gate.set_window(window)

    def record_congestion(self, retry_attempt: int = 0) -> None:
        super().record_congestion(retry_attempt)
        window = self._aimd.congestion(retry_attempt, time.monotonic())
        if window != self._gate.window:
            self._gate.set_window(window)

    def step_completed(self) -> dict[str, Any]:
        aimd = self._aimd.step(time.monotonic())
        self._gate.set_window(aimd["window"])
        out = self._base_summary()
        out.update(
            window=aimd["window"],
            window_before=aimd["window_before"],
            avg_pq=aimd["avg_pq"],
            ema_pq=aimd["ema_pq"],
            queue_samples=aimd["queue_samples"],
            ttft_samples=aimd["ttft_samples"],
            shrinks=aimd["shrinks"],
            grows=aimd["grows"],
        )
        return out

    def __repr__(self) -> str:
        return (
            f"AdaptiveConcurrencyController(window={self.window}, min={self.min_window}, "
            f"max={self.max_window}, target={self.prefill_queue_target}s)"
        )
