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


def interleaved_median_seconds(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, budget_s: float = float("inf")
) -> dict[str, float]:
    """Median wall time of every ``fns[name]()``, measured in rounds that run each function once, in turn.

    On a shared machine the load changes over minutes; interleaving makes each change hit every function of a
    round alike, so ratios between them stay meaningful where back-to-back medians would not. ``warmup`` rounds
    run first; then up to ``rounds`` measured rounds, no new one once ``budget_s`` seconds were spent on measured
    runs (at least one round is measured).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    for done in range(max(rounds, 1)):
        if done and spent >= budget_s:
            break
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
    return {name: statistics.median(ts) for name, ts in times.items()}
