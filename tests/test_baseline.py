"""The zero-shot baseline command, end to end on the tiny model, and its errors through the real CLI."""

import json
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from eval import baseline


def test_baseline_writes_rouge_that_matches_rouge_score(tiny_artifacts, repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    summary = baseline.main(
        ["--config", "configs/tiny.yaml", "--eval.max_examples", "6", "--output_dir", str(tmp_path)]
    )
    assert summary["num_examples"] == 6
    rows = [json.loads(line) for line in (tmp_path / "baseline/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert all(len(r["references"]) == 3 for r in rows)  # the tiny test split has three references
    # Recompute ROUGE-1 directly: best reference per example, then the mean.
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    direct = sum(max(scorer.score(ref, r["prediction"])["rouge1"].fmeasure for ref in r["references"]) for r in rows) / 6
    saved = json.loads((tmp_path / "baseline/rouge.json").read_text())
    assert saved["rouge"]["rouge1"] == pytest.approx(direct)
    assert saved["config"]["model"]["name_or_path"] == "artifacts/tiny/t5-dialogsum"


def test_baseline_on_the_real_dialogsum_test_split(tiny_artifacts, repo_root, shared_dialogsum, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    summary = baseline.main(
        ["--config", "configs/tiny.yaml", "--data.path", str(shared_dialogsum), "--eval.max_examples", "3",
         "--eval.generation.max_new_tokens", "8", "--output_dir", str(tmp_path)]
    )
    assert summary["num_examples"] == 3 and summary["split"] == "test"
    first = json.loads((tmp_path / "baseline/predictions.jsonl").read_text().splitlines()[0])
    assert first["id"] == "test_0" and len(first["references"]) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
        (["--config", "configs/tiny.yaml", "--model.name_or_path", "no/such/dir/anywhere"], "no/such/dir/anywhere"),
        (["--config", "configs/tiny.yaml", "--data.path", "missing_data_dir"], "missing_data_dir"),
        (["--config", "configs/tiny.yaml", "--eval.batch_size", "4"], "valid keys in eval"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(tiny_artifacts, repo_root, extra, message):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.baseline", *extra], cwd=repo_root, capture_output=True, text=True, timeout=120,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
