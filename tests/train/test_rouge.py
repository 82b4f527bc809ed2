"""ROUGE: our wrapper against rouge_score computed directly, and several human summaries per example."""

import pytest
from rouge_score import rouge_scorer

from train.rouge import ROUGE_TYPES, compute_rouge, split_sentences

PREDICTIONS = ["#Person1# wants to buy a red jacket. They agree on 40 dollars.", "The doctor tells Mr. Smith to quit smoking."]
REFERENCES = [
    ["#Person1# buys a red jacket for 40 dollars.", "A customer wants a jacket. The price is 40 dollars.", "Shopping for jackets."],
    ["Mr. Smith is advised to stop smoking by the doctor."],
]


def test_one_target_summary_equals_rouge_score_directly():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    res = compute_rouge(PREDICTIONS[1:], [REFERENCES[1][0]])
    direct = scorer.score(REFERENCES[1][0], PREDICTIONS[1])
    for k in ("rouge1", "rouge2", "rougeL"):
        assert res.mean[k] == pytest.approx(direct[k].fmeasure)
    assert res.mean["rouge1"] > 0.3  # the stemmer matches "smoking"/"smoking", "doctor"/"doctor"


def test_several_target_summaries_take_the_best_one_per_metric():
    res = compute_rouge(PREDICTIONS[:1], [REFERENCES[0]])
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    singles = [scorer.score(split_sentences(r), split_sentences(PREDICTIONS[0])) for r in REFERENCES[0]]
    for k in ROUGE_TYPES:
        assert res.mean[k] == pytest.approx(max(s[k].fmeasure for s in singles))
    assert res.num_examples == 1


def test_rouge_lsum_uses_sentence_boundaries():
    # Two sentences whose order is swapped: LCS over the whole text is short, summary-level LCS is not.
    pred = "the price is forty dollars. a man buys a jacket."
    ref = "a man buys a jacket. the price is forty dollars."
    res = compute_rouge([pred], [[ref]])
    assert res.mean["rougeLsum"] == pytest.approx(1.0)
    assert res.mean["rougeL"] < 0.7


def test_mean_is_the_average_of_examples():
    res = compute_rouge(PREDICTIONS, REFERENCES)
    for k in ROUGE_TYPES:
        assert res.mean[k] == pytest.approx(sum(r[k] for r in res.per_example) / 2)


def test_mismatched_lengths_and_missing_target_summaries_are_rejected():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        compute_rouge(PREDICTIONS, REFERENCES[:1])
    with pytest.raises(ValueError, match="no target summary"):
        compute_rouge(PREDICTIONS[:1], [[]])
