"""The admission gate and controllers (real asyncio, real threads)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rollstream import AdaptiveConcurrencyController, FixedConcurrencyController


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


def test_adaptive_reacts_to_signals_and_reports() -> None:
    ctrl = AdaptiveConcurrencyController(initial_window=16, prefill_queue_target=0.5, interval=4)
    ctrl.record_congestion(0)
    ctrl.record_congestion(0)  # within the cooldown: one burst, one shrink
    assert ctrl.window == 8
    ctrl = AdaptiveConcurrencyController(
        initial_window=16, prefill_queue_target=0.5, interval=4, congestion_cooldown=1e-9
    )
    for _ in range(4):
        ctrl.record_success(queue_time_s=0.01, prompt_tokens=100, cached_tokens=50)
    assert ctrl.window == 20
    for _ in range(4):
        ctrl.record_success(queue_time_s=4.0, prompt_tokens=100)
    assert ctrl.window == 10
    ctrl.record_congestion(0)
    assert ctrl.window == 5
    summary = ctrl.step_completed()
    assert summary["window"] == 5
    assert summary["requests"] == 8
    assert summary["cache_hit_rate"] == pytest.approx(200 / 800)
    assert summary["congestion_events"] == 1
    assert summary["shrinks"] == 2
    assert summary["avg_pq"] == pytest.approx((4 * 0.01 + 4 * 4.0) / 8)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial_window": 0}, "initial_window"),
        ({"min_window": 10, "max_window": 5}, "max_window=5"),
        ({"prefill_queue_target": 0}, "prefill_queue_target=0"),
    ],
)
def test_bad_configuration(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        AdaptiveConcurrencyController(**kwargs)  # type: ignore[arg-type]


def test_fixed_rejects_bad_sizes() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_concurrency"):
            FixedConcurrencyController(bad)  # type: ignore[arg-type]
