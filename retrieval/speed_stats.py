"""The noise of a speed: distribution-free intervals for medians and percentiles of timings, the rule for when
a percentile can be estimated from a sample at all, and paired speed ratios.

Why order statistics, not a normal approximation or a bootstrap of a mean: timings on a shared machine are
skewed with long right tails (a query that waited for a core), so means and standard errors mislead; the k-th
smallest of n timings bounds a quantile with a probability that follows from the binomial distribution alone,
whatever the timings' distribution (the classical distribution-free confidence interval for a quantile).

Why ratios per round: the sweep times a configuration and the reference (fp32 exact at the native dim) in
the same rounds, alternating their order (timing.time_rounds); a burst of load slows both in the round it
hits, so the per-round ratio cancels it where the two separate speeds do not. The speed-up's interval is the
interval of the median of those paired ratios.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95  # the level of every speed interval
# A percentile q is estimable from n samples when at least MIN_TAIL of them lie on each side of it: p99 needs
# 1,000 samples, p95 200, p50 20 (fewer and its upper bound is the sample's maximum, i.e. scheduler noise).
MIN_TAIL = 10


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A median or percentile of timings with its LEVEL interval (low <= value <= high)."""
    value: float
    low: float
    high: float


def estimable(n: int, q: float) -> bool:
    """Whether the q-quantile (0 < q < 1) can be estimated from n samples (MIN_TAIL on each side)."""
    return n * min(q, 1.0 - q) >= MIN_TAIL


def min_samples(q: float) -> int:
    """The fewest samples that make the q-quantile estimable (1,000 for p99)."""
    return math.ceil(MIN_TAIL / min(q, 1.0 - q) - 1e-9)


def _binomial_cdf(n: int, q: float) -> np.ndarray:
    """P(Binomial(n, q) <= j) for j = 0..n, in log space so that n in the thousands is exact enough."""
    j = np.arange(n + 1)
    logs = (np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in j])
            + j * math.log(q) + (n - j) * math.log1p(-q))
    return np.cumsum(np.exp(logs - logs.max())) * math.exp(logs.max())


def order_statistic_bounds(n: int, q: float, level: float = LEVEL) -> tuple[int, int]:
    """0-based ranks (l, u) of the sorted sample with P(x[l] <= xi_q <= x[u]) >= level, equal-tailed: that
    probability is P(l < B <= u) for B ~ Binomial(n, q), the number of samples below xi_q. Where a tail cannot
    reach (1 - level) / 2 the bound is the sample's minimum or maximum, and the coverage is what n allows
    (coverage(); e.g. 94% for the median of 5 rounds)."""
    cdf = _binomial_cdf(n, q)[:n]  # cdf[j] = P(B <= j), j = 0..n-1
    alpha = (1.0 - level) / 2.0
    lows = np.flatnonzero(cdf <= alpha)  # x[l] below xi_q fails only when B <= l
    highs = np.flatnonzero(cdf >= 1.0 - alpha)  # x[u] above xi_q fails only when B > u
    return (int(lows[-1]) if lows.size else 0), (int(highs[0]) if highs.size else n - 1)


def coverage(n: int, q: float = 0.5, level: float = LEVEL) -> float:
    """The probability that the interval of order_statistic_bounds covers the true q-quantile (for the median:
    94% from 5 rounds, 97% from 6, >= 95% from 6 on)."""
    if n <= 0:
        return 0.0
    low, high = order_statistic_bounds(n, q, level)
    cdf = _binomial_cdf(n, q)
    return float(cdf[high] - cdf[low]) if n > 1 else 0.0


def _interval(values: np.ndarray, q: float, level: float) -> Estimate:
    values = np.sort(values)
    low, high = order_statistic_bounds(values.size, q, level)
    return Estimate(float(np.quantile(values, q)), float(values[low]), float(values[high]))


def quantile(samples: Sequence[float], q: float, level: float = LEVEL) -> Estimate | None:
    """The q-quantile of `samples` with its distribution-free interval; None when the sample cannot estimate
    it (estimable)."""
    values = np.asarray(samples, dtype=np.float64)
    return _interval(values, q, level) if estimable(values.size, q) else None


def median(samples: Sequence[float], level: float = LEVEL) -> Estimate | None:
    """The median with its interval for any n >= 1 (rounds are few; below 6 the interval is the range and its
    coverage, coverage(n), falls short of `level`: 94% at 5, 50% at 2)."""
    values = np.asarray(samples, dtype=np.float64)
    return _interval(values, 0.5, level) if values.size else None


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], level: float = LEVEL) -> Estimate | None:
    """The median of the per-round ratios numerator[r] / denominator[r] with its interval (rounds paired)."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.size == 0 or np.any(b <= 0):
        return None
    return median(a / b, level)
