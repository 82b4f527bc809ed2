"""eval/human/stats.py: Wilson intervals, Krippendorff's alpha, win rates, mean ranks and fractional ranks against
published and hand-worked values."""

from __future__ import annotations

import math

import pytest

from eval.human.stats import fractional_ranks, head_to_head, krippendorff_alpha, mean_ranks, wilson_interval, win_rates


def test_wilson_interval_matches_published_values() -> None:
    # 8 successes of 10: Wilson 95% interval [0.4902, 0.9433] (e.g. Newcombe 1998, Table I style examples).
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10: lower bound exactly 0, upper bound z²/(n+z²).
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_krippendorff_alpha_on_published_and_hand_worked_data() -> None:
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units, missing values.
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[row[u] for row in observers if row[u] is not None] for u in range(12)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)

    # By hand: units (1,1), (2,2), (1,2). Coincidences o11 = 2, o22 = 2, o12 = o21 = 1; n1 = n2 = 3, n = 6.
    # With two values every metric has one distance d12 (nominal 1, ordinal (3+3-(3+3)/2)² = 9):
    # alpha = 1 - (n-1) * 2 * d12 / (2 * n1 * n2 * d12) = 1 - 5 * 2 / 18 = 4/9.
    hand = [[1, 1], [2, 2], [1, 2]]
    assert krippendorff_alpha(hand, "nominal") == pytest.approx(4 / 9)
    assert krippendorff_alpha(hand, "ordinal") == pytest.approx(4 / 9)
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "ordinal") == pytest.approx(1.0)
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None  # no variation: undefined
    assert krippendorff_alpha([[1], [2]]) is None  # nothing pairable


def test_win_rates_mean_ranks_and_head_to_head_by_hand() -> None:
    judgements = [{"a": 1, "b": 2}, {"a": 1.5, "b": 1.5}, {"a": 2, "b": 1}, {"a": 1, "b": 2}]
    rates = win_rates(judgements, ["a", "b"])
    assert (rates["a"].wins, rates["a"].comparisons, rates["a"].rate) == (2.5, 4, 0.625)
    assert (rates["b"].wins, rates["b"].rate) == (1.5, 0.375)
    assert (rates["a"].ci_low, rates["a"].ci_high) == wilson_interval(2.5, 4)
    assert mean_ranks(judgements, ["a", "b"]) == {"a": 5.5 / 4, "b": 6.5 / 4}

    three = [{"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 1, "c": 2}]
    rates = win_rates(three, ["a", "b", "c"])
    # a beats b, c in the first and loses both in the second; b: 1 + 2; c: 0 + 1 (beats a).
    assert [rates[s].wins for s in "abc"] == [2, 3, 1] and all(rates[s].comparisons == 4 for s in "abc")
    pairs = head_to_head(three, ["a", "b", "c"])
    assert pairs[("a", "b")].rate == 0.5 and pairs[("b", "c")].rate == 1.0 and pairs[("c", "b")].rate == 0.0


def test_fractional_ranks_average_ties():
    assert fractional_ranks({"A": 1, "B": 2, "C": 3}) == {"A": 1.0, "B": 2.0, "C": 3.0}
    assert fractional_ranks({"A": 2, "B": 1, "C": 2}) == {"B": 1.0, "A": 2.5, "C": 2.5}
    assert fractional_ranks({"A": 1, "B": 1, "C": 1, "D": 4}) == {"A": 2.0, "B": 2.0, "C": 2.0, "D": 4.0}
