"""Pure helpers: percentiles, the window stability rule, Poisson arrival schedules, latency summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default);
    NaN for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must lie in 0..100, got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean / max in milliseconds (NaN when empty)."""
    ms = [x * 1000.0 for x in latencies_s]
    return {"p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
            "mean_ms": (sum(ms) / len(ms)) if ms else math.nan, "max_ms": max(ms) if ms else math.nan}


def is_stable(rates: Sequence[float], tolerance: float = 0.10) -> bool:
    """The last two window throughputs agree within `tolerance` of the larger one (and are not both zero)."""
    if len(rates) < 2:
        return False
    a, b = rates[-2], rates[-1]
    top = max(a, b)
    return top > 0.0 and abs(a - b) <= tolerance * top


def poisson_schedule(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [0, duration_s) of a Poisson process of `rate` per second: cumulative sums of
    exponential inter-arrival gaps of mean 1 / rate."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be > 0")
    expected = rate * duration_s
    n = int(expected + 10 * math.sqrt(expected) + 10)  # enough gaps to pass duration_s almost surely
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    while times[-1] < duration_s:  # vanishingly rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return times[times < duration_s]


def ratio(num: float, den: float) -> float:
    return num / den if den and math.isfinite(den) and den > 0 else math.nan
