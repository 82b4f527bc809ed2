"""In-process reward scoring (rewards/scorer.py): label lookup by name, toxicity, batching, truncation, the scored
text, and one clear error for each kind of bad model, label, device or dtype."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.scorer import RewardScorer, scored_texts

TEXTS = [
    "You are a kind friend.",
    "You stupid lazy coward, I hate you.",
    "Thank you for the help.",
    "idiot",
    "",
    "nice day " * 40,
]


def direct_logits(model_dir, texts, max_length):
    """Logits from a plain transformers forward pass, one text at a time (no padding, no batching)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0])
    return torch.stack(rows)


def test_reward_is_the_nothate_logit_looked_up_by_name(reversed_classifier):
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu"))
    assert (scorer.reward_index, scorer.toxic_index) == (1, 0)
    scores = scorer.score(TEXTS)
    expected = direct_logits(reversed_classifier, TEXTS, scorer.max_length)
    torch.testing.assert_close(scores.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.rewards, expected[:, 1], atol=1e-5, rtol=1e-5)
    manual_hate = expected[:, 0].exp() / expected.exp().sum(-1)
    torch.testing.assert_close(scores.toxicity, manual_hate, atol=1e-5, rtol=1e-5)
    assert scores.rewards.dtype == torch.float32 and scores.rewards.shape == (len(TEXTS),)
    # The random head really separates the classes, so picking the wrong column would be caught.
    assert (scores.logits[:, 0] - scores.logits[:, 1]).abs().min() > 1e-3


def test_tiny_hate_classifier_toxicity_is_softmax_hate_probability(tiny_artifacts):
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))
    texts = [json.loads(line)["text"] for line in (tiny_artifacts.toxicity / "test.jsonl").read_text().splitlines()[:16]]
    labels = [json.loads(line)["label"] for line in (tiny_artifacts.toxicity / "test.jsonl").read_text().splitlines()[:16]]
    scores = scorer.score(texts)
    id2label = json.loads((tiny_artifacts.roberta / "config.json").read_text())["id2label"]
    hate = next(int(i) for i, name in id2label.items() if name == "hate")
    logits = scores.logits.double()
    manual = torch.exp(logits[:, hate]) / torch.exp(logits).sum(-1)
    torch.testing.assert_close(scores.toxicity.double(), manual, atol=1e-6, rtol=1e-6)
    # The trained tiny classifier agrees with the labels, so toxicity is high exactly for the hateful texts.
    assert [bool(t > 0.5) for t in scores.toxicity] == [label == "hate" for label in labels]
    assert set(labels) == {"hate", "nothate"}


def test_a_multi_label_head_gives_the_sigmoid_of_the_toxic_logit_and_a_single_label_head_the_softmax(
        three_label_classifiers):
    import math

    multi, single = three_label_classifiers

    def scorer(path, activation="auto"):
        return RewardScorer.from_config(RewardConfig(model_name_or_path=str(path), device="cpu", reward_label="insult",
                                                     toxic_label="toxic", toxicity_activation=activation))

    for path, sigmoid in ((multi, True), (single, False)):
        scores = scorer(path).score(TEXTS[:4])
        for row, toxicity in zip(scores.logits.tolist(), scores.toxicity.tolist()):
            by_hand = (1 / (1 + math.exp(-row[0])) if sigmoid
                       else math.exp(row[0]) / sum(math.exp(x) for x in row))
            assert toxicity == pytest.approx(by_hand, abs=1e-6)
        assert scorer(path).describe()["toxicity"] == ("sigmoid" if sigmoid else "softmax")
    # The setting overrides what the config says; the two readings really differ on these logits.
    forced = scorer(multi, "softmax").score(TEXTS[:4]).toxicity
    assert not torch.allclose(forced, scorer(multi).score(TEXTS[:4]).toxicity, atol=1e-3)
    assert scorer(single, "sigmoid").describe()["toxicity"] == "sigmoid"


def test_batch_size_and_order_do_not_change_scores(reversed_classifier):
    cfg = RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", batch_size=1)
    one_by_one = RewardScorer.from_config(cfg).score(TEXTS)
    cfg.batch_size = 4
    batched = RewardScorer.from_config(cfg).score(TEXTS)
    torch.testing.assert_close(batched.logits, one_by_one.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.rewards, one_by_one.rewards, atol=1e-5, rtol=1e-5)
    assert len(set(one_by_one.rewards.tolist())) == len(TEXTS)  # distinct texts: a reordering would show


def test_max_length_ignores_tokenizer_sentinel_and_uses_roberta_positions(reversed_classifier, tiny_artifacts):
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu"))
    assert scorer.tokenizer.model_max_length > 10**6
    assert scorer.max_length == 34 - 2  # max_position_embeddings - (pad_token_id + 1)
    long_text = "you are a kind friend " * 30  # 150 words, far over 32 tokens
    truncated = scorer.tokenizer(long_text, truncation=True, max_length=32)["input_ids"]
    assert len(truncated) == 32
    short_text = scorer.tokenizer.decode(truncated, skip_special_tokens=True)
    scores = scorer.score([long_text, short_text])
    torch.testing.assert_close(scores.logits[0], scores.logits[1], atol=1e-5, rtol=1e-5)

    tiny = RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))
    config = tiny.model.config
    assert tiny.max_length == min(tiny.tokenizer.model_max_length, config.max_position_embeddings - 2)
    assert RewardScorer.from_config(
        RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", max_length=8)
    ).max_length == 8
    with pytest.raises(RewardError, match=r"max_length=500 is outside 1\.\.32"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", max_length=500))


def test_scored_text_is_prompt_and_summary_or_the_summary_alone():
    prompts, summaries = ["Summarize: A\nSummary: ", "Summarize: B\nSummary: "], ["one.", "two."]
    assert scored_texts(prompts, summaries, "prompt_and_summary") == [p + s for p, s in zip(prompts, summaries)]
    assert scored_texts(prompts, summaries, "summary") == summaries
    with pytest.raises(RewardError, match="reward.text='both'"):
        scored_texts(prompts, summaries, "both")
    with pytest.raises(RewardError, match="2 prompts but 1 summaries"):
        scored_texts(prompts, summaries[:1], "summary")


def test_missing_model_path_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-classifier"
    with pytest.raises(RewardError, match="does not exist") as info:
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(missing), device="cpu"))
    assert str(missing) in str(info.value) and "local classifier directory" in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RewardError, match="cannot load the classifier of reward from local directory"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(empty), device="cpu"))


def test_unknown_labels_list_the_classifier_labels(reversed_classifier):
    with pytest.raises(RewardError, match=r"no single class named 'toxic'.*\['hate', 'nothate'\]"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), toxic_label="toxic", device="cpu"))


def test_bad_devices_and_dtypes_are_reward_errors(reversed_classifier):
    with pytest.raises(RewardError, match="cuda:99"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="cuda:99"))
    with pytest.raises(RewardError, match="not a valid torch device"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="gpu-please"))
    scorer = RewardScorer.from_config(
        RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", dtype="bfloat16")
    )
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    assert scorer.score(TEXTS[:2]).rewards.dtype == torch.float32


def test_over_long_texts_keep_their_end_so_the_summary_is_always_scored(tiny_artifacts):
    """Texts longer than the classifier's limit lose their beginning: two texts with different prompts but the same
    (long) ending score identically, because only the ending fits in the window."""
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))
    ending = "You are a stupid useless idiot and a pathetic liar. " * 40
    assert len(scorer.tokenizer(ending)["input_ids"]) > scorer.max_length
    a, b = scorer.score_pairs(["#Person1#: Hello there. " * 30, "A completely different prompt about jackets. " * 30],
                              [ending, ending], "prompt_and_summary").logits
    torch.testing.assert_close(a, b)
    short_a, short_b = scorer.score_pairs(["#Person1#: Hello there. ", "A different prompt about jackets. "],
                                          ["They talk.", "They talk."], "prompt_and_summary").logits
    assert not torch.allclose(short_a, short_b)  # prompts that fit do change the score
