"""One timing rule for every comparison: each implementation runs ROUNDS
rounds and is reported by its best (fastest) round, so rollstream and the
reference are measured with the same number of rounds and the same
statistic. (Best-of: this shared 2-core machine is noisy, and the minimum is
the round least disturbed by other work.)"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

ROUNDS = 3


def best_of(fn: Callable[[], Any], rounds: int = ROUNDS) -> float:
    """Seconds of the fastest of ``rounds`` calls of ``fn``."""
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timed(fn: Callable[[], Any], rounds: int = ROUNDS) -> tuple[float, Any]:
    """:func:`best_of`, also returning the last call's result."""
    best, out = float("inf"), None
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def pedantic_best(benchmark: Any, fn: Callable[[], Any], rounds: int = ROUNDS) -> float:
    """Run ``fn`` under pytest-benchmark with ``rounds`` rounds and return the
    best round, the statistic :func:`best_of` gives the reference."""
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
    return float(benchmark.stats.stats.min)
