"""Benchmarks (`make bench` = `python -m distill.bench [section ...]`), and the timing helper they share.

Each section is a module in this package with a `main()`; `__main__.SECTIONS` lists them in order.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 2,
    setup: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time (s, by `clock`: wall time by default) of each function over `reps` rounds; each round runs
    every function once in a fresh random order, so that a noisy, shared machine slows all of them
    alike. `setup` runs (untimed) before each call. Returns the times per function, round by round.
    With one torch thread, `clock=time.thread_time` (CPU time of this thread) ignores time spent
    waiting for other processes."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            if setup is not None:
                setup()
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            if setup is not None:
                setup()
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den (rounds paired, as `time_interleaved` returns them)."""
    return statistics.median(a / b for a, b in zip(num, den))
