"""Benchmarks (`make bench` = `python -m distill.bench [section ...]`), and the helpers they share.

Each section is a module in this package with a `main()`; `__main__.SECTIONS` lists them in order.

A section reports each figure with `record(name, samples, unit=..., goal=..., better=...)`: every
sample is one repeat (one interleaved round) of the measurement. The figure's statistics go into
`results[section][name]` (the section is `current_section`, set by `__main__` through `begin_section`):

    median, min, max, n, samples, unit, goal, better, met
    spread  = (max - min) / median: the relative full range of the repeats (0 for one sample)
    max_dev = max(|max - median|, |median - min|) / median: every sample lies within median * (1 ± max_dev)

`fmt(samples)` prints a figure as "1.234 (±1.2%, n=5)": the median and `max_dev`. A goal is a string;
these forms are checked (`goal_met`), anything else is reported as not checkable:
"<= X", "< X", ">= X", "> X" (X may end in %: X/100, unless the unit is "%"), "A +- B" (or "A ± B"),
"within P% of T". `__main__ --reps N` sets `REPS`; a section asks `reps(default)` for its repeat count.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

results: dict[str, dict[str, dict[str, Any]]] = {}  # section -> figure name -> stats
current_section = "misc"
REPS: int | None = None  # --reps N of `python -m distill.bench`; None: each section's default


def begin_section(name: str) -> None:
    """Figures recorded from now on belong to section `name`."""
    global current_section
    current_section = name
    results.setdefault(name, {})


def reps(default: int) -> int:
    """The number of repeats a section should take: `--reps N` when given, else `default`."""
    return max(1, REPS) if REPS is not None else default


def stats(samples: list[float]) -> dict[str, Any]:
    """median, min, max, spread, max_dev, n and the samples (see the module docstring)."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("no samples")
    med, lo, hi = statistics.median(xs), min(xs), max(xs)
    if med != 0:
        spread, dev = (hi - lo) / abs(med), max(hi - med, med - lo) / abs(med)
    else:
        spread = dev = 0.0 if hi == lo else None  # type: ignore[assignment]
    return {"median": med, "min": lo, "max": hi, "spread": spread, "max_dev": dev, "n": len(xs), "samples": xs}


_NUM = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"


def _value(text: str, pct: str, unit: str) -> float:
    return float(text) / 100 if pct and unit != "%" else float(text)


def goal_met(median: float, goal: str | None, unit: str = "") -> bool | None:
    """Whether `median` meets `goal` (the forms in the module docstring); None when not checkable."""
    if not goal:
        return None
    g = goal.strip().replace("±", "+-")
    if m := re.fullmatch(rf"(<=|<|>=|>)\s*{_NUM}\s*(%?).*", g):
        op, x = m.group(1), _value(m.group(2), m.group(3), unit)
        eps = 1e-9 * max(abs(x), 1e-300)  # exact counts computed in floating point meet "<= 0.50"
        return {"<=": median <= x + eps, "<": median < x, ">=": median >= x - eps, ">": median > x}[op]
    if m := re.fullmatch(rf"{_NUM}\s*\+-\s*{_NUM}\s*(%?).*", g):
        return abs(median - float(m.group(1))) <= _value(m.group(2), m.group(3), unit) + 1e-12
    if m := re.fullmatch(rf"within\s+{_NUM}\s*%\s+of\s+{_NUM}.*", g):
        target = float(m.group(2))
        return target != 0 and abs(median / target - 1) <= float(m.group(1)) / 100 + 1e-12
    return None


def record(
    name: str, samples: list[float], *, unit: str = "", goal: str | None = None, better: str = "lower"
) -> float:
    """Store figure `name` of the current section from its repeats; returns the median.

    `better` ("lower" or "higher") says which way is an improvement (read by `--compare`)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    s = stats(samples)
    s.update(unit=unit, goal=goal, better=better, met=goal_met(s["median"], goal, unit))
    results.setdefault(current_section, {})[name] = s
    return s["median"]


def fmt(samples: list[float], digits: int = 3) -> str:
    """"1.234 (±1.2%, n=5)": the median, then how far the farthest sample lies from it, relative."""
    s = stats(samples)
    dev = "±?" if s["max_dev"] is None else f"±{100 * s['max_dev']:.1f}%"
    return f"{s['median']:.{digits}f} ({dev}, n={s['n']})"


def fmt_stats(s: dict[str, Any], digits: int = 3) -> str:
    """`fmt` of stored statistics (a `results` entry or one read back from bench.json)."""
    dev = "±?" if s.get("max_dev") is None else f"±{100 * s['max_dev']:.1f}%"
    med = s["median"]
    num = f"{med:,.0f}" if abs(med) >= 1000 else f"{med:.{digits}f}"
    return f"{num} ({dev}, n={s['n']})"


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


def ratios(num: list[float], den: list[float]) -> list[float]:
    """num/den round by round (rounds paired, as `time_interleaved` returns them)."""
    return [a / b for a, b in zip(num, den, strict=True)]


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den (rounds paired, as `time_interleaved` returns them)."""
    return statistics.median(a / b for a, b in zip(num, den))

