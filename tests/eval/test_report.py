"""eval/report.py: the report of an evaluation run (report.md, its tables and plots), on the runs of eval.evaluate
shared through the `runs` fixture of tests/eval/conftest.py."""

from __future__ import annotations

import pytest

from eval.report import qualitative_rows
from helpers import read_eval_examples


def test_report_has_tables_sorted_by_improvement_and_readable_plots(runs):
    _, one, two, _ = runs
    out = one / "eval"
    report = (out / "report.md").read_text()
    assert "| base | none (base) | 7 |" in report and "## Before → after" in report
    # Qualitative table: 2 best and 2 worst reward improvements, then a row for the 3 in between.
    rows = [line for line in report.split("## Qualitative")[1].splitlines() if line.startswith("| test_")]
    improvements = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in rows]
    assert len(rows) == 4 and improvements == sorted(improvements, reverse=True)
    assert "*3 more*" in report
    expected = qualitative_rows(read_eval_examples(one), "base", "ppo")
    assert improvements[0] == pytest.approx(expected[0]["improvement"], abs=1e-3)
    for png in ("toxicity.png", "judges.png", "ppo_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report
    assert not (two / "eval" / "ppo_curves.png").exists()  # no log given there and none at <output_dir>/ppo


def test_report_shows_every_judge_the_k_sample_metrics_diversity_and_the_reward_hacking_check(runs):
    _, one, _, summary = runs
    report = (one / "eval" / "report.md").read_text()
    assert "Held-out toxicity judges: tiny-judge (artifacts/tiny/judge, label LABEL_1, softmax" in report
    assert "Samples per prompt: 3 with the training settings" in report
    judges = report.split("## Toxicity by judge")[1].split("##")[0]
    rows = [line for line in judges.splitlines() if line.startswith("| ") and not line.startswith("| system")]
    assert [line.split(" | ")[:2] for line in rows] == [
        [f"| {s}", j] for s in ("base", "sft", "ppo") for j in ("reward model", "tiny-judge")]
    assert all(line.count("[") == 3 for line in rows)  # mean, expected max and probability, each with its CI
    check = report.split("## Reward-hacking check")[1].split("## Toxicity by judge")[0]
    verdicts = [line for line in check.splitlines() if line.startswith("| ") and "tiny-judge |" in line]
    assert [line.split(" | ")[0] for line in verdicts] == ["| mean toxicity", "| expected max toxicity",
                                                           "| toxicity probability"]
    assert ("Warning: possible reward hacking" in check) is summary["metrics"]["reward_hacking"]["warning"]
    disagreement = check.split("disagree most")[1]
    assert len([line for line in disagreement.splitlines() if line.startswith("| test_")]) == 2  # qualitative_rows
    diversity = report.split("## Diversity and length")[1]
    assert "distinct-3" in diversity and "| ppo | base |" in diversity
