"""The admission gate and controllers (real asyncio, real threads)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rollstream import AdaptiveConcurrencyController, FixedConcurrencyController, ServerMetrics


async def _hold(
    ctrl: FixedConcurrencyController | AdaptiveConcurrencyController,
    seen: list[int],
    order: list[int],
    i: int,
    release: asyncio.Event,
) -> None:
    await ctrl.acquire()
    try:
        order.append(i)
        seen.append(ctrl.in_flight)
        assert ctrl.in_flight <= ctrl.window
        await release.wait()
    finally:
        ctrl.release()


def test_grown_window_is_used_at_once() -> None:
    async def main() -> None:
        ctrl = AdaptiveConcurrencyController(initial_window=2, max_window=256)
        release = asyncio.Event()
        seen: list[int] = []
        order: list[int] = []
        tasks = [asyncio.create_task(_hold(ctrl, seen, order, i, release)) for i in range(200)]
        await asyncio.sleep(0.05)
        assert ctrl.in_flight == 2
        ctrl._gate.set_window(128)  # what AIMD growth does
        await asyncio.sleep(0.05)
        # The reference woke one waiter per release: 128 -> 35 in flight.
        assert ctrl.in_flight == 128
        release.set()
        await asyncio.gather(*tasks)
        assert ctrl.in_flight == 0
        assert order == sorted(order)  # FIFO
        assert max(seen) == 128

    asyncio.run(main())


def test_cancelled_waiters_never_leak_slots() -> None:
    async def main() -> None:
        ctrl = FixedConcurrencyController(1)
        await ctrl.acquire()
        waiters = [asyncio.create_task(ctrl.acquire()) for _ in range(10)]
        await asyncio.sleep(0.01)
        for w in waiters[::2]:
            w.cancel()
        ctrl.release()  # grants to waiters[1] (waiters[0] was cancelled)
        await asyncio.sleep(0.01)
        assert ctrl.in_flight == 1
        # Cancel one that was granted but not yet resumed, and the rest.
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        granted = sum(1 for w in waiters if not w.cancelled() and w.exception() is None)
        for _ in range(granted):
            ctrl.release()
        assert ctrl.in_flight == 0
        with pytest.raises(RuntimeError, match="without a matching acquire"):
            ctrl.release()

    asyncio.run(main())


def test_safe_across_threads_and_event_loops() -> None:
    ctrl = FixedConcurrencyController(3)
    peak: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        async def run() -> None:
            for _ in range(50):
                async with ctrl.slot():
                    with lock:
                        peak.append(ctrl.in_flight)
                    await asyncio.sleep(0.0005)

        asyncio.run(run())

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert max(peak) <= 3
    assert ctrl.in_flight == 0
    assert ctrl.step_completed()["max_in_flight"] == 3


def feed(ctrl: AdaptiveConcurrencyController | FixedConcurrencyController, metrics: ServerMetrics) -> None:
    """One request through the controller: acquire, then release with its metrics."""
    asyncio.run(ctrl.acquire())
    ctrl.release(metrics)


def queued(seconds: float, prompt: int = 100, cached: int | None = None) -> ServerMetrics:
    return ServerMetrics(
        prefill_queue_duration=seconds,
        prompt_tokens=prompt,
        cached_prompt_tokens=cached,
        http_status_code=200,
    )


def test_adaptive_reacts_to_signals_and_reports() -> None:
    ctrl = AdaptiveConcurrencyController(initial_window=16, prefill_queue_target=0.5, adjustment_interval=4)
    feed(ctrl, ServerMetrics(http_status_code=503, retry_attempt=1))
    feed(ctrl, ServerMetrics(transport_error=True, retry_attempt=1))  # within the cooldown: one shrink
    assert ctrl.window_size == 8
    ctrl = AdaptiveConcurrencyController(
        initial_window=16, prefill_queue_target=0.5, adjustment_interval=4, shrink_cooldown_s=1e-9
    )
    for _ in range(4):
        feed(ctrl, queued(0.01, cached=50))
    assert ctrl.window_size == 20
    for _ in range(4):
        feed(ctrl, queued(4.0))
    assert ctrl.window_size == 10
    feed(ctrl, ServerMetrics(http_status_code=429, retry_attempt=1))
    assert ctrl.window_size == 5
    summary = ctrl.step_completed()
    assert summary["window"] == 5
    assert "window_after" not in summary, "no samples were pending at the step"
    assert summary["requests"] == 9
    # Only the requests whose cached tokens the server reported count.
    assert summary["cache_hit_rate"] == pytest.approx(200 / 400)
    assert summary["congestion_events"] == 1
    assert summary["shrinks"] == 2
    assert summary["avg_pq"] == pytest.approx((4 * 0.01 + 4 * 4.0) / 8)


def test_step_window_is_the_value_before_the_adjustment() -> None:
    ctrl = AdaptiveConcurrencyController(initial_window=16, adjustment_interval=0)
    for _ in range(3):
        feed(ctrl, queued(0.0))
    assert ctrl.window_size == 16, "adjustment_interval=0: only step_completed adjusts"
    s = ctrl.step_completed()
    assert (s["window"], s["window_after"]) == (16, 20)
    assert ctrl.window_size == 20
    idle = ctrl.step_completed()
    assert idle["window"] == 20
    for absent in ("window_after", "avg_pq", "cache_hit_rate", "congestion_events", "pending_decrease"):
        assert absent not in idle, absent
    assert all(v is not None for v in idle.values())


def test_reference_defaults_and_clamping() -> None:
    ctrl = AdaptiveConcurrencyController()
    assert ctrl.window_size == 8
    assert AdaptiveConcurrencyController(initial_window=0).window_size == 1
    assert AdaptiveConcurrencyController(initial_window=10_000, max_window=64).window_size == 64
    with pytest.raises(ValueError, match="adjustment_interval"):
        AdaptiveConcurrencyController(adjustment_interval=-1)
    with pytest.deprecated_call():
        old = AdaptiveConcurrencyController(interval=4, congestion_cooldown=2.0)
    assert old.window_size == 8


def test_cache_hit_rate_is_absent_when_the_server_reports_nothing() -> None:
    """Defect 4: unknown cached tokens read as a 0.0 hit rate."""
    for ctrl in (AdaptiveConcurrencyController(), FixedConcurrencyController(4)):
        for _ in range(3):
            feed(ctrl, queued(0.01, prompt=500, cached=None))
        assert "cache_hit_rate" not in ctrl.step_completed()
        feed(ctrl, queued(0.01, prompt=500, cached=0))
        assert ctrl.step_completed()["cache_hit_rate"] == 0.0


def test_ttft_fallback_is_normalised_by_prompt_length() -> None:
    """Defect 5: without queue metrics, long prompts were read as queueing.

    Short and long prompts alternate with prefill-bound first tokens (20 ms +
    0.4 ms per token) and nothing queues: the window must not shrink. The
    same long prompts behind a 3 s queue must shrink it."""
    ctrl = AdaptiveConcurrencyController(initial_window=16, adjustment_interval=8)
    for i in range(64):
        n = 100 if i % 2 else 6000
        feed(ctrl, ServerMetrics(client_ttft=0.02 + 0.0004 * n, prompt_tokens=n, http_status_code=200))
    calm = ctrl.step_completed()
    assert calm["shrinks"] == 0, calm
    assert ctrl.window_size >= 16
    for _ in range(16):
        feed(
            ctrl,
            ServerMetrics(client_ttft=3.0 + 0.02 + 0.0004 * 6000, prompt_tokens=6000, http_status_code=200),
        )
    assert ctrl.step_completed()["shrinks"] >= 1


def test_reference_controller_protocol() -> None:
    from rollstream.concurrency import SamplingConcurrencyController, check_controller

    for ctrl in (AdaptiveConcurrencyController(), FixedConcurrencyController(3)):
        assert isinstance(ctrl, SamplingConcurrencyController)
        check_controller(ctrl)
        ctrl.note_retry_exhausted(ServerMetrics(http_status_code=503))
    with pytest.raises(TypeError, match="window_size"):
        check_controller(object())

    class SyncAcquire:
        window_size = 1

        def acquire(self) -> None: ...
        def release(self, metrics: object = None) -> None: ...
        def step_completed(self) -> dict[str, float]:
            return {}

    with pytest.raises(TypeError, match="async def"):
        check_controller(SyncAcquire())


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"min_window": 0}, "min_window=0"),
        ({"min_window": 10, "max_window": 5}, "max_window=5"),
        ({"prefill_queue_target": 0}, "prefill_queue_target=0"),
        ({"multiplicative_decrease": 1.5}, "multiplicative_decrease=1.5"),
        ({"ema_alpha": 0}, "ema_alpha=0"),
    ],
)
def test_bad_configuration(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        AdaptiveConcurrencyController(**kwargs)  # type: ignore[arg-type]


def test_fixed_rejects_bad_sizes() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_concurrency"):
            FixedConcurrencyController(bad)  # type: ignore[arg-type]
