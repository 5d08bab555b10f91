"""Statistics: of attention distributions (in nats unless said otherwise), and the 95 % intervals every reported
number carries (Wilson for pass rates, a seeded bootstrap for means over units, the standard error of a mean)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RopeliteError


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """H(p) = -sum p ln p over ``dim``, with 0 ln 0 = 0 (seed paper Algorithm 1). Uniform over n gives ln n."""
    p = p.double()
    return -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(dim)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(p || q) = sum p ln(p/q), 0 where p = 0."""
    p, q = p.double(), q.double()
    ratio = torch.where(p > 0, p / q.clamp_min(1e-300), torch.ones_like(p))
    return (p * ratio.log()).sum(dim)


def js_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence JS(p, q) = (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2: symmetric,
    0 for identical distributions, at most ln 2 nats (1 bit). Divide by ln 2 for bits."""
    m = (p.double() + q.double()) / 2
    return (kl_divergence(p, m, dim) + kl_divergence(q, m, dim)) / 2


NATS_PER_BIT = math.log(2)


# --------------------------------------------------------------------------------------------------------------
# Uncertainty: a 95 % interval on every reported number
# --------------------------------------------------------------------------------------------------------------

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval
MIN_UNITS = 3            # fewer units than this: no interval, the table gives n instead
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95 % interval over ``n`` units (documents, windows, samples, trials, seeds).
    ``low`` and ``high`` are None when there are fewer than MIN_UNITS units: too few to say anything."""

    estimate: float
    low: float | None
    high: float | None
    n: int
    method: str  # "wilson" or "bootstrap"

    @property
    def known(self) -> bool:
        return self.low is not None

    def fields(self, name: str) -> dict:
        """Result-row fields: name, name_low, name_high, name_n (the interval's ends are null below MIN_UNITS)."""
        return {name: self.estimate, f"{name}_low": self.low, f"{name}_high": self.high, f"{name}_n": self.n}

    def text(self, spec: str = ".2f") -> str:
        """'0.50 [0.24, 0.76] (n=10)', or '0.50 (n=2)' without an interval."""
        ends = f" [{self.low:{spec}}, {self.high:{spec}}]" if self.known else ""
        return f"{self.estimate:{spec}}{ends} (n={self.n})"


def wilson(passed: int, n: int, z: float = Z95) -> Interval:
    """Wilson's score interval of a pass rate k/n: centre (p + z^2/2n) / (1 + z^2/n), half-width
    z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n). Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not
    empty at k = 0 or k = n (0/10 gives [0, 0.278])."""
    if n < 1 or not 0 <= passed <= n:
        raise RopeliteError(f"a pass rate needs 0 <= passed <= n and n >= 1, got {passed}/{n}")
    p, shrink = passed / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    # at k = 0 or n one end is exactly 0 or 1 (the formula gives it up to rounding)
    low, high = (0.0 if passed == 0 else centre - half), (1.0 if passed == n else centre + half)
    return Interval(p, low, high, n, "wilson") if n >= MIN_UNITS else Interval(p, None, None, n, "wilson")


def bootstrap_mean(values, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, transform=None) -> Interval:
    """The mean over units with a seeded percentile-bootstrap 95 % interval: resample the units with
    replacement ``resamples`` times, take each resample's mean, and read the 2.5 and 97.5 percentiles.

    ``values`` is 1-D (one value per unit) or 2-D (seeds x units, e.g. one row of per-document values per
    finetune seed): then seeds and units are resampled independently, so the interval holds both sources of
    variation. ``transform`` maps a mean to the reported scale (``math.exp`` for a perplexity from mean NLLs:
    the percentiles of exp(mean) are exp of the percentiles). The same seed gives the same interval. ``n`` is the
    number of values (seeds x units); an interval needs MIN_UNITS units, or MIN_UNITS seeds for a 2-D array."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]                                                               # (1, units)
    if x.ndim != 2 or x.size == 0:
        raise RopeliteError(f"bootstrap_mean takes a non-empty 1-D or 2-D array, got shape {x.shape}")
    f = transform or (lambda v: v)
    seeds, units = x.shape
    estimate = float(f(x.mean()))
    if (units if seeds == 1 else seeds) < MIN_UNITS:  # 2-D: the seeds are the scarce units
        return Interval(estimate, None, None, x.size, "bootstrap")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: memory 1000 x seeds x units
        b = min(1000, resamples - start)
        rows = rng.integers(0, seeds, (b, seeds))                                   # (b, seeds)
        cols = rng.integers(0, units, (b, units))                                   # (b, units)
        picked = x[rows[:, :, None], cols[:, None, :]]                               # (b, seeds, units)
        means[start:start + b] = picked.mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(estimate, float(f(low)), float(f(high)), x.size, "bootstrap")


def standard_error(values) -> float | None:
    """The standard error of a mean, s / sqrt(n) with the n - 1 sample deviation; None for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else None


def compare(a: Interval, b: Interval) -> str:
    """How a stands to b by their intervals: 'lower' or 'higher' when they do not overlap, else 'overlap'
    (the data cannot tell); 'unknown' when either has no interval."""
    if not (a.known and b.known):
        return "unknown"
    if a.high < b.low:
        return "lower"
    if a.low > b.high:
        return "higher"
    return "overlap"
