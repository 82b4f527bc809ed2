"""eval/sample_metrics.py: k-sample toxicity and distinct-n against hand-computed tables."""

import math

import numpy as np
import pytest

from eval.sample_metrics import (CorpusNgrams, any_toxic_per_prompt, distinct_n_per_prompt, max_toxicity_per_prompt,
                                 ngrams)
from eval.stats import bootstrap_mean, jackknife_interval, paired_difference

# 4 prompts x 3 samples.
TABLE = [
    [0.10, 0.70, 0.20],  # max 0.7, toxic
    [0.05, 0.05, 0.05],  # max 0.05
    [0.50, 0.00, 0.10],  # exactly at the threshold: toxic
    [0.49, 0.30, 0.00],  # just below: not toxic
]


def test_expected_maximum_toxicity_and_toxicity_probability_on_a_hand_made_table():
    maxima = max_toxicity_per_prompt(TABLE)
    assert maxima.tolist() == [0.70, 0.05, 0.50, 0.49]
    assert bootstrap_mean(maxima).value == pytest.approx((0.70 + 0.05 + 0.50 + 0.49) / 4)
    toxic = any_toxic_per_prompt(TABLE)
    assert toxic.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert bootstrap_mean(toxic).value == 0.5
    assert any_toxic_per_prompt(TABLE, threshold=0.45).tolist() == [1.0, 0.0, 1.0, 1.0]


def test_one_sample_per_prompt_reduces_to_the_greedy_toxicity():
    column = [[0.3], [0.9], [0.0]]
    assert max_toxicity_per_prompt(column).tolist() == [0.3, 0.9, 0.0]
    assert any_toxic_per_prompt(column).tolist() == [0.0, 1.0, 0.0]


def test_per_prompt_values_pair_up_for_before_after_differences():
    after = [[0.0, 0.1, 0.2], [0.05, 0.0, 0.0], [0.2, 0.0, 0.1], [0.1, 0.1, 0.0]]
    change = paired_difference(max_toxicity_per_prompt(TABLE), max_toxicity_per_prompt(after), samples=200)
    assert change.value == pytest.approx(((0.2 - 0.7) + (0.05 - 0.05) + (0.2 - 0.5) + (0.1 - 0.49)) / 4)
    assert change.ci_low <= change.value <= change.ci_high


@pytest.mark.parametrize("bad", [[], [[]], [0.1, 0.2], [[0.1, math.nan]], [[1.2]], [[-0.1]]])
def test_a_table_that_is_not_probabilities_per_prompt_and_sample_is_refused(bad):
    with pytest.raises(ValueError):
        max_toxicity_per_prompt(bad)


def test_distinct_n_against_a_hand_count():
    samples = [
        ["the cat sat", "The cat ran"],  # words: the cat sat | the cat ran
        ["a a a a"],                     # one summary repeating itself
        ["hi"],                          # shorter than 2 words: no bigram
    ]
    # unigrams: {the, cat, sat, ran} of 6; {a} of 4; {hi} of 1
    assert distinct_n_per_prompt(samples, 1).tolist() == [4 / 6, 1 / 4, 1.0]
    # bigrams: {the cat, cat sat, cat ran} of 4; {a a} of 3; none: 0, not left out (a one-word policy scores low)
    assert distinct_n_per_prompt(samples, 2).tolist() == [3 / 4, 1 / 3, 0.0]
    # trigrams: {the cat sat, the cat ran} of 2; {a a a} of 2
    assert distinct_n_per_prompt(samples[:2], 3).tolist() == [1.0, 1 / 2]
    assert ngrams("One  two\nthree", 2) == [("one", "two"), ("two", "three")]
    with pytest.raises(ValueError, match="n must be at least 1"):
        distinct_n_per_prompt(samples, 0)


def test_identical_samples_are_less_distinct_than_varied_ones():
    same = distinct_n_per_prompt([["he left early"] * 4], 2)
    varied = distinct_n_per_prompt([["he left early", "she stayed late", "they met at noon", "we all went home"]], 2)
    assert same[0] == pytest.approx(2 / 8) and varied[0] == 1.0
    assert np.all(same < varied)


def test_distinct_n_across_prompts_and_without_each_prompt_match_hand_counts():
    texts = ["the cat sat", "the cat ran", "the cat sat", "hi"]
    unigrams = CorpusNgrams(texts, 1)
    assert unigrams.value() == 5 / 10  # {the, cat, sat, ran, hi} of 10 words
    # without 0: {the,cat,ran,sat,hi}/7; without 1: {the,cat,sat,hi}/7; without 2: as 0; without 3: {the,cat,sat,ran}/9
    assert unigrams.leave_one_out().tolist() == [5 / 7, 4 / 7, 5 / 7, 4 / 9]
    for left_out in range(4):  # the same by brute force
        rest = [t for i, t in enumerate(texts) if i != left_out]
        assert unigrams.leave_one_out()[left_out] == pytest.approx(CorpusNgrams(rest, 1).value())
    bigrams = CorpusNgrams(texts, 2)
    assert bigrams.value() == 3 / 6 and bigrams.leave_one_out().tolist() == [3 / 4, 2 / 4, 3 / 4, 3 / 6]
    assert CorpusNgrams(["hi", "yo"], 2).value() == 0.0 and CorpusNgrams(["hi", "yo"], 2).leave_one_out().tolist() == [0, 0]


def test_jackknife_interval_by_hand():
    from statistics import NormalDist

    loo = [0.5, 0.7, 0.6, 0.4]
    estimate = jackknife_interval(0.55, loo, confidence=0.9)
    se = math.sqrt(3 / 4 * sum((x - 0.55) ** 2 for x in loo))
    z = NormalDist().inv_cdf(0.95)
    assert (estimate.value, estimate.ci_low, estimate.ci_high) == pytest.approx((0.55, 0.55 - z * se, 0.55 + z * se))
    assert math.isnan(jackknife_interval(0.3, [0.3]).ci_low)
