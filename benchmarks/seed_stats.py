"""The interval every multi-seed figure of the benchmarks is reported with: mean and a 95 % Student t
half width (imported by the scripts beside it)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from scipy import stats

T_LEVEL = 0.975  # two-sided 95 %


def t_interval(values: Iterable[float]) -> tuple[float, float]:
    """(mean, half width of the 95 % Student t interval) of ``values`` (nan, a missing value, is left
    out); the half width is nan for one value, both are nan for none."""
    data = [float(v) for v in values if not math.isnan(v)]
    if not data:
        return math.nan, math.nan
    mean = statistics.fmean(data)
    if len(data) < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(T_LEVEL, len(data) - 1)) * statistics.stdev(data) / math.sqrt(len(data))
