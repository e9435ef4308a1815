"""Statistics over repeated runs (seeds): Student's t quantile, the mean with its 95% t-interval, and the
smallest difference a number of seeds can detect. The experiments' verdicts and ``sigattn compare --seeds``
both rest on them."""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

# The power and two-sided level of ``detectable_difference`` (``POWER_FORMULA``).
POWER = 0.8
ALPHA = 0.05


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (0 < p < 1).

    Bisection on the CDF, which is 1/2 plus the integral of the density from 0 (Simpson's rule, 2000
    intervals: |error| < 1e-7 for df >= 1 and |t| < 100); the normal quantile for df > 1e6."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if df > 1e6:
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    def cdf(t: float) -> float:
        steps = 2000
        h = t / steps
        total = density(0.0) + density(t)
        total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"the {p}-quantile of t({df}) is beyond 1e6")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


POWER_FORMULA = (
    "Detectable difference (80% power, two-sided α = 0.05): δ = (t(0.975, n−1) + t(0.80, n−1))·s/√n, the smallest "
    "true mean distance from the claim's bound that a t-test over these n seeds would detect 4 times in 5, "
    "computed from the observed between-seed standard deviation s (the usual approximation: the exact "
    "non-central-t power at this δ is 0.79 with 5 seeds, 0.80 with 8)."
)


@dataclass
class SeedSummary:
    """One statistic over seeds: the per-seed values, their mean, the between-seed standard deviation, the 95%
    t-interval of the mean and the detectable difference (both None with fewer than 2 seeds)."""

    values: list[float]
    mean: float
    sd: float | None
    ci95: tuple[float, float] | None
    detectable: float | None

    @property
    def seeds(self) -> int:
        return len(self.values)

    def to_dict(self) -> dict:
        return {
            "values": self.values,
            "mean": self.mean,
            "sd": self.sd,
            "ci95": None if self.ci95 is None else list(self.ci95),
            "detectable": self.detectable,
            "seeds": self.seeds,
        }


def detectable_difference(sd: float, seeds: int, *, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest true mean difference that a two-sided one-sample t-test at level ``alpha`` over ``seeds``
    values with standard deviation ``sd`` detects with probability ``power`` (``POWER_FORMULA``):

        δ = (t(1 − alpha/2, n − 1) + t(power, n − 1)) · sd / √n
    """
    if seeds < 2:
        raise ValueError(f"a detectable difference needs >= 2 seeds, got {seeds}")
    if not 0.0 < power < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"power and alpha must be in (0, 1), got {power} and {alpha}")
    df = seeds - 1
    return (student_t_quantile(1 - alpha / 2, df) + student_t_quantile(power, df)) * sd / math.sqrt(seeds)


def summarize_seeds(values: list[float]) -> SeedSummary:
    """Mean, between-seed SD, 95% t-interval of the mean and detectable difference of per-seed values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize_seeds needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return SeedSummary(values, mean, None, None, None)
    if not all(map(math.isfinite, values)):  # a diverged seed: no spread to speak of (stdev raises on nan)
        return SeedSummary(values, mean, math.nan, (math.nan, math.nan), math.nan)
    sd = statistics.stdev(values)
    half = student_t_quantile(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return SeedSummary(values, mean, sd, (mean - half, mean + half), detectable_difference(sd, len(values)))
