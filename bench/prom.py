"""Prometheus text exposition: parse a /metrics scrape and turn two scrapes into the server-side split."""

from __future__ import annotations

import math
import re

# name{labels} value  (timestamps, if any, are ignored)
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (metric name, sorted label pairs)


def parse(text: str) -> dict[Sample, float]:
    """Every sample of a scrape keyed by (name, sorted labels); comments and unparsable lines are skipped."""
    out: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        pairs = tuple(sorted((k, re.sub(r"\\.", lambda e: _UNESCAPE.get(e.group(0), e.group(0)[1]), val))
                             for k, val in _LABEL.findall(labels or "")))
        out[(name, pairs)] = v
    return out


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = {k: str(v) for k, v in labels.items()}
    return sum(v for (n, pairs), v in samples.items()
               if n == name and all(dict(pairs).get(k) == w for k, w in want.items()))


def delta(before: dict[Sample, float], after: dict[Sample, float], name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def mean_delta(before: dict[Sample, float], after: dict[Sample, float], histogram: str, **labels: str) -> float:
    """(sum after - sum before) / (count after - count before) of a histogram; NaN when nothing was observed."""
    count = delta(before, after, histogram + "_count", **labels)
    return delta(before, after, histogram + "_sum", **labels) / count if count > 0 else math.nan


def split(before: dict[Sample, float], after: dict[Sample, float], model: str, graph: str) -> dict[str, float]:
    """The server-side split between two scrapes for one model's graph: mean queue wait per item (ms), mean
    compute per batch (ms), mean batch size, and the number of batches."""
    lab = {"model": model, "graph": graph}
    return {
        "queue_wait_ms": 1000.0 * mean_delta(before, after, "genserve_queue_wait_seconds", **lab),
        "compute_per_batch_ms": 1000.0 * mean_delta(before, after, "genserve_compute_seconds", **lab),
        "mean_batch_size": mean_delta(before, after, "genserve_batch_size", **lab),
        "batches": delta(before, after, "genserve_batch_size_count", **lab),
    }
