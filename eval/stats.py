"""Bootstrap confidence intervals for evaluation metrics.

The original notebook reported toxicity on 10 samples, so its "improvement" moved by tens of percent from
run to run. Here every mean comes with a percentile bootstrap interval, and every before/after comparison
is *paired*: the same resampled example indices are used for both systems, so the interval reflects the
per-example differences rather than two independent noisy means.

All functions take a `seed` and build their own `numpy.random.Generator`: the same inputs and seed give the
same interval, whatever else ran before. Standard deviations are population std (ddof=0), as the
notebook's `np.std`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Callable, Optional, Sequence

import numpy as np

# Resampled statistics are computed this many bootstrap rows at a time, to bound memory on large splits.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, Optional[float]]:
        """For JSON: NaN (e.g. a relative change from a zero mean) becomes None, since JSON has no NaN."""
        return {k: (v if math.isfinite(v) else None) for k, v in asdict(self).items()}

    def format(self, digits: int = 4) -> str:
        return f"{self.value:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"


@dataclass(frozen=True)
class Distribution:
    """Mean and std of per-example values, each with its bootstrap CI."""

    n: int
    mean: Estimate
    std: Estimate

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean.to_dict(), "std": self.std.to_dict()}


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: a bootstrap needs at least one value")
    return array


def _check(samples: int, confidence: float) -> None:
    if samples < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")


def _resampled(
    arrays: Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray],
    samples: int,
    seed: int,
) -> np.ndarray:
    """`statistic` of `samples` bootstrap resamples; all arrays share each resample's indices (paired).

    `statistic` maps resampled arrays of shape (rows, n) to (rows,) or (rows, k); the result is (samples, ...).
    """
    n = arrays[0].size
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    chunks = []
    for start in range(0, samples, rows_per_chunk):
        idx = rng.integers(0, n, size=(min(rows_per_chunk, samples - start), n))
        chunks.append(statistic(*(a[idx] for a in arrays)))
    return np.concatenate(chunks)


def _interval(point: float, resampled: np.ndarray, confidence: float) -> Estimate:
    alpha = (1.0 - confidence) / 2.0
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return Estimate(point, float("nan"), float("nan"))
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return Estimate(float(point), float(low), float(high))


def bootstrap_mean(values: Sequence[float], samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of `values` with a percentile bootstrap CI."""
    _check(samples, confidence)
    x = _as_array(values, "values")
    return _interval(x.mean(), _resampled([x], lambda r: r.mean(axis=1), samples, seed), confidence)


def describe(values: Sequence[float], samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Distribution:
    """Mean and std of `values`, each with a percentile bootstrap CI (one set of resamples for both)."""
    _check(samples, confidence)
    x = _as_array(values, "values")
    # Mean and std from the same resamples, in one pass over the index matrix.
    boot = _resampled([x], lambda r: np.stack([r.mean(axis=1), r.std(axis=1)], axis=1), samples, seed)
    return Distribution(
        n=int(x.size),
        mean=_interval(x.mean(), boot[:, 0], confidence),
        std=_interval(x.std(), boot[:, 1], confidence),
    )


def paired_difference(
    before: Sequence[float], after: Sequence[float], samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """mean(after) - mean(before) over the same examples, with a paired bootstrap CI."""
    _check(samples, confidence)
    b, a = _paired(before, after)
    diff = a - b
    return _interval(diff.mean(), _resampled([diff], lambda r: r.mean(axis=1), samples, seed), confidence)


def paired_relative_change(
    before: Sequence[float], after: Sequence[float], samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Relative change of the mean in percent, 100 * (mean(after) - mean(before)) / mean(before), with a paired
    bootstrap CI (each resample draws the same example indices for both systems). NaN when mean(before) is 0."""
    _check(samples, confidence)
    b, a = _paired(before, after)

    def change(rb: np.ndarray, ra: np.ndarray) -> np.ndarray:
        mb = rb.mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return 100.0 * (ra.mean(axis=-1) - mb) / mb

    point = float(change(b, a)) if b.mean() != 0 else float("nan")
    return _interval(point, _resampled([b, a], change, samples, seed), confidence)


def jackknife_interval(point: float, leave_one_out: Sequence[float], confidence: float = 0.95) -> Estimate:
    """A normal interval around `point` with the delete-one jackknife's standard error, from the statistic recomputed
    without each example in turn. For corpus statistics such as distinct n-grams over all summaries, where a bootstrap
    resample's repeated examples would bias the statistic itself (repeats add no new n-grams)."""
    _check(1, confidence)
    loo = _as_array(leave_one_out, "leave_one_out")
    n = loo.size
    if n < 2:
        return Estimate(float(point), float("nan"), float("nan"))
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return Estimate(float(point), float(point) - z * se, float(point) + z * se)


def _paired(before: Sequence[float], after: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    b, a = _as_array(before, "before"), _as_array(after, "after")
    if b.size != a.size:
        raise ValueError(f"paired values need the same examples: {b.size} before but {a.size} after")
    return b, a
