"""EnginePool: client-side routing over several servers (no server needed:
routing only hands out URLs)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rollstream._exceptions import EngineUnavailableError
from rollstream.routing import EnginePool, Route

URLS = [f"http://10.0.0.{i}:8000" for i in range(4)]


def test_sessions_stick_and_spread_evenly() -> None:
    pool = EnginePool(URLS)

    async def go() -> dict[str, str]:
        bound = {}
        for i in range(40):
            r = await pool.acquire(f"s{i}")
            pool.release(r)
            bound[f"s{i}"] = r.url
        for s, url in bound.items():
            r = await pool.acquire(s)
            pool.release(r)
            assert r.url == url, "later turns stay on the session's engine"
        return bound

    bound = asyncio.run(go())
    counts = {u: list(bound.values()).count(u) for u in URLS}
    assert set(counts.values()) == {10}, counts
    assert all(load.sessions == 10 and load.outstanding == 0 for load in pool.loads())
    assert pool.finish_session("s0")
    assert not pool.finish_session("s0")
    assert pool.session_engine("s0") is None


def test_requests_without_a_session_go_to_the_least_loaded() -> None:
    pool = EnginePool(URLS[:2])

    async def go() -> None:
        held = [await pool.acquire() for _ in range(6)]
        assert sorted(ld.outstanding for ld in pool.loads()) == [3, 3]
        for r in held[:3]:
            pool.release(r)
        busy = {ld.url: ld.outstanding for ld in pool.loads()}
        r = await pool.acquire()
        assert busy[r.url] == min(busy.values())
        pool.release(r)
        for r in held[3:]:
            pool.release(r)

    asyncio.run(go())


def test_acquire_waits_while_every_engine_is_paused_and_wakes_on_resume() -> None:
    pool = EnginePool(URLS[:2])
    pool.pause()

    async def go() -> Route:
        task = asyncio.ensure_future(pool.acquire("s"))
        await asyncio.sleep(0.2)
        assert not task.done(), "held, not failed, while paused"
        # Resumed from another thread, as the hot-load thread does.
        threading.Thread(target=pool.resume, args=([URLS[1]],)).start()
        return await asyncio.wait_for(task, 5)

    route = asyncio.run(go())
    assert route.url == URLS[1]
    pool.release(route)


def test_a_session_waits_for_its_paused_engine_but_moves_off_a_down_one() -> None:
    pool = EnginePool(URLS[:2])

    async def go() -> None:
        first = await pool.acquire("s")
        pool.release(first)
        pool.set_state(first.url, "paused")
        task = asyncio.ensure_future(pool.acquire("s"))
        await asyncio.sleep(0.1)
        assert not task.done(), "the session waits for its engine (its prefix cache is there)"
        pool.set_state(first.url, "down")
        moved = await asyncio.wait_for(task, 5)
        assert moved.url != first.url
        pool.release(moved)

    asyncio.run(go())


def test_no_engine_and_closed_pools_raise_typed_errors() -> None:
    with pytest.raises(EngineUnavailableError, match="no engine"):
        asyncio.run(EnginePool().acquire())
    pool = EnginePool(URLS[:1])
    pool.pause()

    async def go() -> None:
        task = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.05)
        pool.close()
        await asyncio.wait_for(task, 5)

    with pytest.raises(EngineUnavailableError, match="closed"):
        asyncio.run(go())


def test_removed_engine_is_ignored_by_late_releases_and_bad_input_is_refused() -> None:
    pool = EnginePool(URLS[:2])

    async def go() -> None:
        r = await pool.acquire()
        pool.remove(r.url)
        pool.release(r)  # the request finished after its engine left
        assert len(pool) == 1
        with pytest.raises(TypeError, match="Route"):
            pool.release("http://10.0.0.0:8000")  # type: ignore[arg-type]

    asyncio.run(go())
    with pytest.raises(ValueError, match="http"):
        EnginePool(["10.0.0.1:8000"])
