"""Held-out toxicity judges: probabilities as computed by hand (softmax and sigmoid heads), placement in-process or
behind a reward server, and one clear error for a wrong label, a missing path or a bad judge list."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from eval.judges import check_judges_before_loading, close_judges, load_judges
from rewards.config import RewardConfig
from rewards.errors import RewardError
from train.config import JudgeConfig, load_config
from train.errors import ConfigError
from helpers import REWARD_TOKEN, RewardServerProcess

SUMMARIES = ["you are a kind friend", "you stupid lazy coward", "thank you for the help", "I hate you idiot"]
PROMPTS = ["dialogue one ", "dialogue two ", "dialogue three ", "dialogue four "]


def logits_by_hand(path, texts) -> list[list[float]]:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0].tolist() for text in texts]


def test_sigmoid_and_softmax_judges_give_the_probabilities_computed_by_hand(three_label_classifiers):
    multi, single = three_label_classifiers
    judges = load_judges(
        [JudgeConfig(name="multi", model_name_or_path=str(multi), toxic_label="insult", text="summary"),
         JudgeConfig(name="single", model_name_or_path=str(single), toxic_label="insult", text="summary"),
         JudgeConfig(name="forced", model_name_or_path=str(multi), toxic_label="insult", text="summary",
                     toxicity_activation="softmax")],
        RewardConfig(), torch.device("cpu"))
    try:
        by_judge = {j.name: j.toxicity(PROMPTS, SUMMARIES) for j in judges}
    finally:
        close_judges(judges)
    for name, path, sigmoid in (("multi", multi, True), ("single", single, False), ("forced", multi, False)):
        for row, toxicity in zip(logits_by_hand(path, SUMMARIES), by_judge[name]):
            by_hand = (1 / (1 + math.exp(-row[1])) if sigmoid else math.exp(row[1]) / sum(math.exp(x) for x in row))
            assert toxicity == pytest.approx(by_hand, abs=1e-5)
    assert by_judge["multi"] != pytest.approx(by_judge["forced"], abs=1e-3)  # the two readings really differ


def test_judge_scores_the_summary_alone_unless_told_otherwise(three_label_classifiers):
    _, single = three_label_classifiers
    summary_only = load_judges([JudgeConfig(model_name_or_path=str(single), toxic_label="toxic")],
                               RewardConfig(text="prompt_and_summary"), torch.device("cpu"))[0]
    with_prompt = load_judges([JudgeConfig(model_name_or_path=str(single), toxic_label="toxic",
                                           text="prompt_and_summary")], RewardConfig(), torch.device("cpu"))[0]
    assert summary_only.name == single.name and summary_only.text_mode == "summary"
    prompts, summaries = ["you stupid lazy coward "] * 2, ["thank you", "nice day"]

    def softmax_toxic(texts):
        return [math.exp(r[0]) / sum(math.exp(x) for x in r) for r in logits_by_hand(single, texts)]

    assert summary_only.toxicity(prompts, summaries) == pytest.approx(softmax_toxic(summaries), abs=1e-5)
    assert with_prompt.toxicity(prompts, summaries) == pytest.approx(
        softmax_toxic([p + s for p, s in zip(prompts, summaries)]), abs=1e-5)
    assert summary_only.toxicity(prompts, summaries) != pytest.approx(with_prompt.toxicity(prompts, summaries), abs=1e-4)


def test_a_judge_behind_a_reward_server_equals_the_same_judge_in_process(tiny_artifacts, monkeypatch):
    server = RewardServerProcess(tiny_artifacts.roberta)
    try:
        monkeypatch.setenv("DETOX_REWARD_TOKEN", REWARD_TOKEN)
        served = JudgeConfig(name="served", model_name_or_path="unused-when-served", toxic_label="hate", url=server.url)
        local = JudgeConfig(name="local", model_name_or_path=str(tiny_artifacts.roberta), toxic_label="hate")
        judges = load_judges([served, local], RewardConfig(text="summary"), torch.device("cpu"))
        assert judges[0].where == f"server {server.url}"
        assert judges[0].toxicity(PROMPTS, SUMMARIES) == pytest.approx(judges[1].toxicity(PROMPTS, SUMMARIES), abs=1e-5)
        close_judges(judges)
        wrong = JudgeConfig(name="served", model_name_or_path="x", toxic_label="LABEL_1", url=server.url)
        with pytest.raises(RewardError, match=r"eval.judges\[0\].toxic_label.*\['nothate', 'hate'\]"):
            load_judges([wrong], RewardConfig(), torch.device("cpu"))
        monkeypatch.delenv("DETOX_REWARD_TOKEN")  # without the token /health does not say the labels
        with pytest.raises(RewardError, match=r"set its token in \$DETOX_REWARD_TOKEN"):
            load_judges([served], RewardConfig(), torch.device("cpu"))
    finally:
        server.stop()


def test_wrong_label_and_missing_path_are_found_before_any_model_loads(three_label_classifiers, tmp_path, monkeypatch):
    multi, _ = three_label_classifiers
    loaded = []
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(RewardError) as error:
        check_judges_before_loading([JudgeConfig(model_name_or_path=str(multi), toxic_label="LABEL_1")])
    assert "eval.judges[0].toxic_label" in str(error.value) and "['toxic', 'insult', 'threat']" in str(error.value)
    with pytest.raises(RewardError, match=r"eval.judges\[1\].model_name_or_path .*does not exist"):
        check_judges_before_loading([JudgeConfig(model_name_or_path=str(multi), toxic_label="toxic"),
                                     JudgeConfig(model_name_or_path=str(tmp_path / "no" / "judge"), toxic_label="x")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match=r"eval.judges\[0\].*not a classifier directory"):
        check_judges_before_loading([JudgeConfig(model_name_or_path=str(tmp_path / "empty"), toxic_label="x")])
    assert loaded == []


@pytest.mark.parametrize("judges, message", [
    ("[{model_name_or_path: a/b}]", "eval.judges[0].toxic_label is missing"),
    ("[{toxic_label: LABEL_1}]", "eval.judges[0].model_name_or_path is missing"),
    ("[{model_name_or_path: x/judge, toxic_label: t}, {model_name_or_path: y/judge, toxic_label: t}]",
     "names 'judge' twice"),
    ("[{name: reward_model, model_name_or_path: a/b, toxic_label: t}]", "the reward model's place"),
    ("[{model_name_or_path: a/b, toxic_label: t, batch_size: 0}]", "eval.judges[0].batch_size must be a positive"),
    ("[{model_name_or_path: a/b, toxic_label: t, colour: red}]", "unknown key 'eval.judges[0].colour'"),
    ("{oops", "takes a YAML list of mappings"),
])
def test_bad_judge_lists_are_one_config_error(judges, message):
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny.yaml", ["--eval.judges", judges])
    assert message in str(error.value)


def test_samples_per_prompt_below_one_is_refused():
    for k in ("0", "-3"):
        with pytest.raises(ConfigError, match="eval.samples_per_prompt must be at least 1 or null"):
            load_config("configs/tiny.yaml", ["--eval.samples_per_prompt", k])
    assert load_config("configs/tiny.yaml", ["--eval.samples_per_prompt", "null"]).eval.samples_per_prompt is None
