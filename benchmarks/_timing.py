"""Small timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1, budget_s: float = float("inf")) -> float:
    """Median wall time of ``fn()`` over up to ``repeats`` runs after ``warmup`` runs.

    Stops repeating once ``budget_s`` seconds were spent on measured runs (at least one run is measured), so
    that a slow baseline at a large size does not dominate the whole benchmark.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max(repeats, 1) and (not times or spent < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)
