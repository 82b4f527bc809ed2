"""Statistics of rankings: pairwise win rates with Wilson intervals, mean ranks, Krippendorff's alpha.

A judgement is one annotator's ranks of the systems of one item on one criterion (system → rank, 1 = best,
ties share a rank). Win rates count every pair of systems in a judgement as one comparison: a win scores 1, a
tie 0.5. Wilson intervals treat comparisons as independent, which is optimistic when one annotator judges
many items or one item is judged by several annotators; they are still the usual, honest-enough summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Hashable, Literal, Mapping, Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class WinRate:
    wins: float  # ties count 0.5
    comparisons: int
    rate: float
    ci_low: float
    ci_high: float


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n (NaNs when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def pairwise_scores(ranks: Mapping[str, float]) -> list[tuple[str, str, float]]:
    """(s, t, score of s against t) for each unordered pair: 1 if s ranks better (lower), 0.5 if tied, else 0."""
    out = []
    for s, t in combinations(sorted(ranks), 2):
        score = 1.0 if ranks[s] < ranks[t] else 0.5 if ranks[s] == ranks[t] else 0.0
        out.append((s, t, score))
    return out


def fractional_ranks(given: Mapping[str, int]) -> dict[str, float]:
    """Ranks with ties averaged, like the two-summary "about the same" (1.5 each):
    {A: 1, B: 1, C: 2} -> {A: 1.5, B: 1.5, C: 3.0}, so mean ranks compare across items."""
    ordered = sorted(given, key=lambda s: given[s])
    ranks: dict[str, float] = {}
    start = 0
    while start < len(ordered):
        end = start
        while end < len(ordered) and given[ordered[end]] == given[ordered[start]]:
            end += 1
        for s in ordered[start:end]:
            ranks[s] = (start + 1 + end) / 2  # mean of the positions start+1 .. end
        start = end
    return ranks


def win_rates(judgements: Sequence[Mapping[str, float]], systems: Sequence[str]) -> dict[str, WinRate]:
    """Per system: wins over all other systems / comparisons, with a 95% Wilson interval."""
    wins = {s: 0.0 for s in systems}
    comparisons = {s: 0 for s in systems}
    for ranks in judgements:
        for s, t, score in pairwise_scores(ranks):
            wins[s] += score
            wins[t] += 1.0 - score
            comparisons[s] += 1
            comparisons[t] += 1
    out = {}
    for s in systems:
        n = comparisons[s]
        low, high = wilson_interval(wins[s], n)
        out[s] = WinRate(wins[s], n, wins[s] / n if n else math.nan, low, high)
    return out


def head_to_head(judgements: Sequence[Mapping[str, float]], systems: Sequence[str]) -> dict[tuple[str, str], WinRate]:
    """(row, column) → how often row beat column (ties 0.5), for every ordered pair of distinct systems."""
    wins = {(s, t): 0.0 for s in systems for t in systems if s != t}
    counts = {pair: 0 for pair in wins}
    for ranks in judgements:
        for s, t, score in pairwise_scores(ranks):
            wins[(s, t)] += score
            wins[(t, s)] += 1.0 - score
            counts[(s, t)] += 1
            counts[(t, s)] += 1
    out = {}
    for pair, w in wins.items():
        n = counts[pair]
        low, high = wilson_interval(w, n)
        out[pair] = WinRate(w, n, w / n if n else math.nan, low, high)
    return out


def mean_ranks(judgements: Sequence[Mapping[str, float]], systems: Sequence[str]) -> dict[str, float]:
    """Average rank of each system over the judgements that include it (1 = best)."""
    totals = {s: [] for s in systems}
    for ranks in judgements:
        for s, r in ranks.items():
            totals[s].append(r)
    return {s: float(np.mean(v)) if v else math.nan for s, v in totals.items()}


def krippendorff_alpha(
    units: Mapping[Hashable, Sequence[float]] | Sequence[Sequence[float]],
    level: Literal["nominal", "ordinal", "interval"] = "ordinal",
) -> float | None:
    """Krippendorff's alpha from the values each unit received (one per coder; missing values left out).

    Built from the coincidence matrix (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"):
    alpha = 1 - (n - 1) * sum(o_ck * d_ck) / sum(n_c * n_k * d_ck), over units with at least two values.
    None when fewer than two values are pairable or all pairable values are equal (no variation to agree on).
    """
    groups = list(units.values()) if isinstance(units, Mapping) else list(units)
    pairable = [np.asarray(v, dtype=float) for v in groups if len(v) >= 2]
    if not pairable:
        return None
    values = np.unique(np.concatenate(pairable))
    if len(values) < 2:
        return None
    index = {v: i for i, v in enumerate(values)}
    coincidences = np.zeros((len(values), len(values)))
    for unit in pairable:
        m = len(unit)
        counts = np.zeros(len(values))
        for v in unit:
            counts[index[v]] += 1
        # Every ordered pair of values from different coders in the unit, weighted 1/(m-1).
        coincidences += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    n_c = coincidences.sum(axis=1)
    n = n_c.sum()
    delta = _distance(values, n_c, level)
    expected = (np.outer(n_c, n_c) * delta).sum()
    return float(1.0 - (n - 1) * (coincidences * delta).sum() / expected)


def _distance(values: np.ndarray, n_c: np.ndarray, level: str) -> np.ndarray:
    """Squared difference function delta²(c, k) of the chosen level of measurement."""
    k = len(values)
    if level == "nominal":
        return 1.0 - np.eye(k)
    if level == "interval":
        return np.subtract.outer(values, values) ** 2
    if level == "ordinal":
        # (sum of n_g for g from c to k, minus half of n_c and n_k)²: ranks spaced by how often they occur.
        cumulative = np.concatenate([[0.0], np.cumsum(n_c)])
        low, high = np.minimum.outer(np.arange(k), np.arange(k)), np.maximum.outer(np.arange(k), np.arange(k))
        spans = cumulative[high + 1] - cumulative[low] - (n_c[low] + n_c[high]) / 2
        return spans ** 2
    raise ValueError(f"unknown level of measurement {level!r}: use nominal, ordinal or interval")
