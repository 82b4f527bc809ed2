"""Distributed evaluation (eval/evaluate.py) on the tiny models: the command end to end, sharding, systems, errors.

One single-process run and one 2-process run (accelerate launch, gloo) of the same 7 examples (the `runs` fixture of
tests/eval/conftest.py) are shared by the tests below; the SFT/PPO adapters are the tiny T5's LoRA with random
weights, so the three systems differ. The statistics are tested in test_stats.py, the report in test_report.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from eval import evaluate as ev
from eval.report import read_ppo_log
from train.config import load_config
from train.data import build_eval_dataset
from train.errors import ConfigError, DataError, ModelError
from train.generation import generate_texts
from helpers import EVAL_ENV, EVAL_EXAMPLES, EVAL_RUN_ARGS, read_eval_examples


# ----------------------------------------------------------------------------------------------------
# End to end


def test_zero_shot_baseline_alone_writes_rouge_that_matches_rouge_score(tiny_artifacts, repo_root, tmp_path,
                                                                       monkeypatch, capsys):
    """The zero-shot baseline is `--eval.systems base`: one system, its ROUGE recomputed directly."""
    monkeypatch.chdir(repo_root)
    summary = ev.main([*EVAL_RUN_ARGS, "--eval.max_examples", "6", "--eval.systems", "base", "--output_dir", str(tmp_path)])
    assert summary["num_examples"] == 6 and [s["name"] for s in summary["systems"]] == ["base"]
    rows = read_eval_examples(tmp_path)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert all(len(r["human_summaries"]) == 3 for r in rows)  # the tiny test split has three human summaries
    # Recompute ROUGE-1 directly: best reference per example, then the mean.
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    direct = np.mean([max(scorer.score(ref, r["systems"]["base"]["summary"])["rouge1"].fmeasure
                          for ref in r["human_summaries"]) for r in rows])
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert saved["metrics"]["systems"]["base"]["rouge"]["rouge1"]["value"] == pytest.approx(direct)
    assert saved["config"]["model"]["name_or_path"] == "artifacts/tiny/t5-dialogsum"
    assert "| base |" in capsys.readouterr().out  # the metrics table is printed, not only written


def test_zero_shot_baseline_on_the_real_dialogsum_test_split(tiny_artifacts, repo_root, shared_dialogsum, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(repo_root)
    summary = ev.main([*EVAL_RUN_ARGS, "--data.path", str(shared_dialogsum), "--eval.max_examples", "3",
                       "--eval.generation.max_new_tokens", "8", "--eval.systems", "base", "--output_dir", str(tmp_path),
                       "--eval.out_dir", "{output_dir}/eval-baseline"])
    assert summary["num_examples"] == 3 and summary["split"] == "test"
    # eval.out_dir keeps this evaluation apart from the run's default <output_dir>/eval.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-baseline"]
    first = json.loads((tmp_path / "eval-baseline" / "examples.jsonl").read_text().splitlines()[0])
    assert first["id"] == "test_0" and len(first["human_summaries"]) == 3


def test_evaluation_compares_zero_shot_and_sft_on_the_same_examples(tiny_artifacts, repo_root, trained, tmp_path,
                                                                       capsys):
    summary = ev.main(
        ["--config", str(repo_root / "configs/tiny.yaml"), "--output_dir", str(tmp_path),
         "--data.path", str(tiny_artifacts.dialogsum), "--model.name_or_path", str(tiny_artifacts.t5),
         "--reward.model_name_or_path", str(tiny_artifacts.roberta),
         "--eval.systems", f"base,sft={trained / 'sft/adapter'}", "--eval.max_examples", "5",
         "--eval.generation.max_new_tokens", "8", "--eval.bootstrap_samples", "50"]
    )
    cfg = load_config(repo_root / "configs/tiny.yaml", ["--data.path", str(tiny_artifacts.dialogsum)])
    expected = build_eval_dataset(cfg.data, "test", 5)
    assert summary["num_examples"] == len(expected) == 5 and summary["split"] == "test"
    assert [s["name"] for s in summary["systems"]] == ["base", "sft"]

    rows = read_eval_examples(tmp_path)
    assert [r["id"] for r in rows] == expected["id"]
    assert all(len(r["human_summaries"]) == 3 for r in rows)  # the tiny test split has three human summaries
    for system, scores in summary["metrics"]["systems"].items():  # the table's means are the per-example means
        assert scores["rouge"]["rouge1"]["value"] == pytest.approx(sum(r["systems"][system]["rouge1"] for r in rows) / 5)
    assert json.loads((tmp_path / "eval/summary.json").read_text()) == summary
    table = capsys.readouterr().out
    assert "| base |" in table and "| sft |" in table


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
        (["--config", "configs/tiny.yaml", "--model.name_or_path", "no/such/dir/anywhere"], "no/such/dir/anywhere"),
        (["--config", "configs/tiny.yaml", "--data.path", "missing_data_dir"], "missing_data_dir"),
        (["--config", "configs/tiny.yaml", "--eval.batch_size", "4"], "valid keys in eval"),
        (["--config", "configs/tiny.yaml", "--eval.samples_per_prompt", "0"], "eval.samples_per_prompt must be at least 1"),
        (["--config", "configs/tiny.yaml", "--rollout.do_sample", "false"], "the samples would be copies of one summary"),
        (["--config", "configs/tiny.yaml", "--eval.judges",
          "[{model_name_or_path: artifacts/tiny/judge, toxic_label: toxic}]"],
         "has no single class named 'toxic' (eval.judges[0].toxic_label); its labels are ['LABEL_0', 'LABEL_1']"),
        (["--config", "configs/tiny.yaml", "--eval.judges", "[{model_name_or_path: artifacts/tiny/nope, toxic_label: t}]"],
         "eval.judges[0].model_name_or_path 'artifacts/tiny/nope' does not exist (and is not a hub id)"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(tiny_artifacts, repo_root, extra, message):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.evaluate", *extra, "--eval.systems", "base"], cwd=repo_root, capture_output=True,
        text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr


def test_two_processes_give_exactly_the_single_process_results(runs):
    _, one, two, _ = runs
    single, double = read_eval_examples(one), read_eval_examples(two)
    assert [r["id"] for r in single] == [f"test_{i}" for i in range(EVAL_EXAMPLES)]  # no drops, no duplicates, in order
    assert double == single  # every summary, reward, toxicity and ROUGE value, bit for bit
    summary_one = json.loads((one / "eval" / "summary.json").read_text())
    summary_two = json.loads((two / "eval" / "summary.json").read_text())
    assert summary_two["throughput"]["num_processes"] == 2 and summary_one["throughput"]["num_processes"] == 1
    assert summary_two["metrics"] == summary_one["metrics"]
    # The systems really differ, so equality above is not three copies of one model.
    assert len({r["systems"][s]["summary"] for r in single for s in ("base", "sft", "ppo")}) > EVAL_EXAMPLES


def test_examples_jsonl_has_the_documented_layout_and_rouge_matches_rouge_score(runs):
    _, one, _, summary = runs
    records = read_eval_examples(one)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    split = lambda text: "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)  # noqa: E731
    for record in records:
        assert set(record) == {"id", "dialogue", "human_summaries", "systems"} and len(record["human_summaries"]) == 3
        for name, out in record["systems"].items():
            assert set(out) == {"summary", "reward", "toxicity", "rouge1", "rouge2", "rougeL", "rougeLsum", "judges",
                                "length_tokens", "samples"}
            assert 0.0 <= out["toxicity"] <= 1.0 and set(out["judges"]) == {"tiny-judge"}
            assert len(out["samples"]) == 3 and all(set(x) == {"summary", "reward", "toxicity", "judges"}
                                                    for x in out["samples"])
            for key in ("rouge1", "rouge2", "rougeL"):  # best reference, as rouge_score's score_multi
                assert out[key] == pytest.approx(max(scorer.score(ref, out["summary"])[key].fmeasure
                                                     for ref in record["human_summaries"]))
            assert out["rougeLsum"] == pytest.approx(max(scorer.score(split(ref), split(out["summary"]))["rougeLsum"]
                                                         .fmeasure for ref in record["human_summaries"]))
    for name in ("base", "sft", "ppo"):
        m = summary["metrics"]["systems"][name]
        for key in ("rouge1", "rougeLsum"):
            assert m["rouge"][key]["value"] == pytest.approx(np.mean([r["systems"][name][key] for r in records]))
        assert m["toxicity"]["mean"]["value"] == pytest.approx(np.mean([r["systems"][name]["toxicity"] for r in records]))
        assert m["toxicity"]["std"]["value"] == pytest.approx(np.std([r["systems"][name]["toxicity"] for r in records]))
    assert any(r["systems"][s]["rouge1"] > 0 for r in records for s in ("base", "sft", "ppo"))


def test_every_summary_and_sample_carries_the_scores_of_its_own_text(runs, tiny_artifacts):
    """Each text's reward-model and judge scores, recomputed one text at a time, and its length in tokens: a shifted
    offset between summaries, samples and systems would pair a text with another's scores."""
    from eval.judges import load_judges
    from rewards.config import RewardConfig
    from rewards.scorer import RewardScorer
    from train.config import JudgeConfig, load_config
    from transformers import AutoTokenizer

    _, one, _, _ = runs
    records = read_eval_examples(one)
    cfg = load_config("configs/tiny.yaml")
    reward = RewardScorer.from_config(cfg.reward)
    judge = load_judges([JudgeConfig(model_name_or_path=str(tiny_artifacts.judge), toxic_label="LABEL_1")],
                        RewardConfig(text="summary"), torch.device("cpu"))[0]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_artifacts.t5))
    outputs = [(r, out) for r in records for out in r["systems"].values()]
    texts = [x for _, out in outputs for x in [out, *out["samples"]]]
    for x in texts:
        alone = reward.score([x["summary"]])
        assert x["toxicity"] == pytest.approx(alone.toxicity.item(), abs=1e-5)
        assert x["reward"] == pytest.approx(alone.rewards.item(), abs=1e-4)
        assert x["judges"]["tiny-judge"] == pytest.approx(judge.toxicity([""], [x["summary"]])[0], abs=1e-5)
    for _, out in outputs:
        assert out["length_tokens"] == len(tokenizer(out["summary"], add_special_tokens=False)["input_ids"])
    # Sampled (the rollout settings), not greedy: a prompt's samples differ from each other.
    assert sum(len({x["summary"] for x in out["samples"]}) > 1 for _, out in outputs) > len(outputs) / 2
    assert len({x["judges"]["tiny-judge"] for x in texts}) > len(texts) / 2  # the judge's scores vary


def test_comparison_is_ppo_against_base_by_default(runs):
    _, one, _, summary = runs
    records = read_eval_examples(one)
    metrics = summary["metrics"]
    assert (metrics["before"], metrics["after"]) == ("base", "ppo")
    tox = {s: np.mean([r["systems"][s]["toxicity"] for r in records]) for s in ("base", "ppo")}
    change = metrics["comparisons"]["ppo"]["toxicity_relative_change_pct"]
    assert change["value"] == pytest.approx(100 * (tox["ppo"] - tox["base"]) / tox["base"])
    assert change["ci_low"] <= change["value"] <= change["ci_high"]
    rouge_diff = metrics["comparisons"]["ppo"]["rouge_difference"]["rougeL"]["value"]
    assert rouge_diff == pytest.approx(np.mean([r["systems"]["ppo"]["rougeL"] - r["systems"]["base"]["rougeL"]
                                                for r in records]))
    assert set(metrics["comparisons"]) == {"sft", "ppo"}


# ----------------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize("num_examples", [1, 7, 10, 33])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_cover_every_example_once_with_world_size_independent_batches(num_examples, world_size):
    shards = [ev.shard_batches(num_examples, 4, rank, world_size) for rank in range(world_size)]
    indices = [i for shard in shards for _, batch in shard for i in batch]
    assert sorted(indices) == list(range(num_examples))
    single = dict(ev.shard_batches(num_examples, 4, 0, 1))
    assert all(single[k] == batch for shard in shards for k, batch in shard)  # same batch k everywhere


def test_merge_rejects_duplicates_and_gaps():
    records = [{"index": i} for i in (2, 0, 1)]
    assert [r["index"] for r in ev.merge_shards(records, 3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="duplicates \\[1\\]"):
        ev.merge_shards(records + [{"index": 1}], 3)
    with pytest.raises(RuntimeError, match="missing \\[3\\]"):
        ev.merge_shards(records, 4)


def test_sampled_mode_is_independent_of_the_number_of_processes(runs, repo_root, monkeypatch):
    """Sampling seeds each batch with seed + batch number: ranks 0 and 1 of 2 together = one process."""
    adapters, _, _, _ = runs
    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/tiny.yaml", ["--eval.generation.do_sample", "true", "--eval.generation.batch_size", "2",
                                            "--eval.generation.max_new_tokens", "8"])
    from rewards.reward_fn import make_reward_fn

    systems = ev.parse_systems(["base", f"ppo={adapters['ppo']}"], cfg.output_dir)
    model, tokenizer = ev.load_models(cfg, systems, torch.device("cpu"))
    cfg.eval.max_examples = 5
    examples = ev.load_examples(cfg)
    with make_reward_fn(cfg.reward) as reward_fn:
        def run(rank: int, world: int) -> list[dict]:
            batches = ev.shard_batches(len(examples), 2, rank, world)
            return ev.evaluate_shard(cfg, model, tokenizer, reward_fn, examples, systems, batches, "cpu", False)

        single = ev.merge_shards(run(0, 1), 5)
        double = ev.merge_shards(run(1, 2) + run(0, 2), 5)
        cfg.seed += 1
        reseeded = ev.merge_shards(run(0, 1), 5)
    assert double == single
    assert [r["systems"]["base"]["summary"] for r in reseeded] != [r["systems"]["base"]["summary"] for r in single]


def test_adapter_switching_matches_models_loaded_on_their_own(runs, repo_root, monkeypatch):
    """One base with both adapters, switched by set_adapter/disable_adapter, = each system loaded alone."""
    adapters, _, _, _ = runs
    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/tiny.yaml", ["--eval.generation.max_new_tokens", "8"])
    cfg.eval.max_examples = 3
    prompts = [row["prompt"] for row in ev.load_examples(cfg)]
    systems = ev.parse_systems(["base", f"sft={adapters['sft']}", f"ppo={adapters['ppo']}"], cfg.output_dir)

    def summaries(model, tokenizer, system):
        with ev.active_system(model, system):
            return generate_texts(model, tokenizer, prompts, cfg.eval.generation, 64, "cpu", progress=False)

    shared, tokenizer = ev.load_models(cfg, systems, torch.device("cpu"))
    together = {s.name: summaries(shared, tokenizer, s) for s in systems}
    assert {s.name: summaries(shared, tokenizer, s) for s in systems} == together  # switching back and forth
    for system in systems:
        alone, _ = ev.load_models(cfg, [system], torch.device("cpu"))
        assert summaries(alone, tokenizer, system) == together[system.name]
    assert together["sft"] != together["base"] != together["ppo"]


# ----------------------------------------------------------------------------------------------------
# Systems and errors


def test_systems_parse_base_adapters_and_the_output_dir_placeholder():
    systems = ev.parse_systems(["base", "sft=none", "ppo={output_dir}/ppo/adapter"], "runs/x")
    assert systems == [ev.System("base", None), ev.System("sft", None), ev.System("ppo", "runs/x/ppo/adapter")]
    for bad, message in ((["base", "base"], "twice"), (["runs/sft/adapter"], "NAME=ADAPTER_DIR"), ([], "empty")):
        with pytest.raises(ConfigError, match=message):
            ev.parse_systems(bad, "runs/x")
    with pytest.raises(ConfigError, match="eval.after='dpo' is not one of the systems"):
        ev.comparison_pair(systems, None, "dpo")
    assert ev.comparison_pair(systems, "sft", None) == ("sft", "ppo")


def test_missing_adapter_is_one_clear_error_naming_system_and_path(tiny_artifacts, repo_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.evaluate", "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path)],
        cwd=repo_root, capture_output=True, text=True, timeout=120, env=EVAL_ENV,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: system 'sft': adapter directory {tmp_path}/sft/adapter not found: train it first "
                      "(python -m train.sft / train.ppo) or fix --eval.systems (NAME=ADAPTER_DIR written by "
                      "train.sft or train.ppo, or 'base')"]


def test_adapter_directory_without_config_and_empty_split_are_clear_errors(tiny_artifacts, repo_root, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(repo_root)
    (tmp_path / "not_an_adapter").mkdir()
    with pytest.raises(ModelError, match="system 'ppo': .*not_an_adapter is not a LoRA adapter directory"):
        ev.main(["--config", "configs/tiny.yaml", "--eval.systems", f"base,ppo={tmp_path / 'not_an_adapter'}"])
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "test.csv").write_text("id,dialogue,summary,topic\n")
    with pytest.raises(DataError, match=f"the test split of {empty} has no examples"):
        ev.main(["--config", "configs/tiny.yaml", "--eval.systems", "base", "--data.path", str(empty)])


def test_damaged_adapter_of_a_system_is_one_line_naming_system_and_file(runs, repo_root, tmp_path, monkeypatch):
    adapters, _, _, _ = runs
    monkeypatch.chdir(repo_root)
    damaged = tmp_path / "ppo"
    shutil.copytree(adapters["ppo"], damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(ModelError) as error:
        ev.main(["--config", "configs/tiny.yaml", "--eval.systems", f"base,ppo={damaged}"])
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{weights} is not a valid safetensors file (truncated or damaged?)")


def test_bad_ppo_log_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="eval.ppo_log .*missing.jsonl not found"):
        ev.resolve_ppo_log(str(tmp_path / "missing.jsonl"), "runs/x")
    assert ev.resolve_ppo_log("auto", str(tmp_path)) is None
    bad = tmp_path / "log.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_ppo_log(bad)
