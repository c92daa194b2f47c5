"""Small timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


class Medians(dict):
    """Median seconds by name; ``rounds``: how many measured rounds they are the medians of."""

    rounds: int = 0


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, budget_s: float = float("inf")
) -> Medians:
    """Median wall time of each ``fns[name]()`` over rounds that call every function once, in order.

    Interleaving spreads a shared machine's changing load over all entries alike, so their ratios are
    fairer than those of back-to-back runs. Stops after ``repeats`` rounds, or earlier once the measured
    rounds took ``budget_s`` seconds together (at least one round): the result's ``rounds`` says how many ran.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        if spent >= budget_s:
            break
    medians = Medians({name: statistics.median(values) for name, values in times.items()})
    medians.rounds = len(next(iter(times.values()), []))
    return medians
