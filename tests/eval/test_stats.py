"""eval/stats.py: bootstrap confidence intervals, paired comparisons of two systems, and their input checks."""

from __future__ import annotations

import numpy as np
import pytest

from eval.stats import bootstrap_mean, describe, paired_difference, paired_relative_change


def test_bootstrap_is_deterministic_under_a_seed_and_brackets_the_mean():
    values = np.random.default_rng(0).beta(0.5, 2.0, size=200)
    first, again = bootstrap_mean(values, 500, 0.95, seed=7), bootstrap_mean(values, 500, 0.95, seed=7)
    assert first == again and first != bootstrap_mean(values, 500, 0.95, seed=8)
    assert first.value == pytest.approx(values.mean())
    assert first.ci_low < first.value < first.ci_high
    # The interval shrinks with the sample size roughly as 1/sqrt(n), near the textbook normal interval.
    normal_half_width = 1.96 * values.std() / np.sqrt(values.size)
    assert (first.ci_high - first.ci_low) / 2 == pytest.approx(normal_half_width, rel=0.2)
    dist = describe(values, 500, 0.95, seed=7)
    assert dist.mean == first  # same resamples for the mean as bootstrap_mean
    assert dist.std.value == pytest.approx(values.std()) and dist.std.ci_low < dist.std.value < dist.std.ci_high


def test_paired_bootstrap_uses_the_same_examples_for_both_systems():
    before = np.random.default_rng(1).uniform(0.1, 0.9, size=100)
    halved = paired_relative_change(before, before * 0.5, 200, seed=3)
    # Every paired resample halves its own mean exactly; an unpaired bootstrap would give a wide interval.
    assert (halved.value, halved.ci_low, halved.ci_high) == pytest.approx((-50.0, -50.0, -50.0))
    noisy_after = before - 0.1 + np.random.default_rng(2).normal(0, 0.05, size=100)
    diff = paired_difference(before, noisy_after, 500, seed=3)
    assert diff.value == pytest.approx(np.mean(noisy_after - before))
    assert diff.ci_low < diff.value < diff.ci_high < 0
    with pytest.raises(ValueError, match="same examples"):
        paired_difference(before, before[:-1])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean([])
