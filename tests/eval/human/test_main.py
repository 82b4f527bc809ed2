"""eval/human/__main__.py, the command line `python -m eval.human {export,serve,report}`: one-line errors, the human
section of a recipe with overrides, and bad settings refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.human.items import load_study
from helpers import write_eval_examples


def test_cli_errors_are_one_line(tmp_path: Path, repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eval.human", "export", "--human.eval_dir", str(tmp_path / "none"),
         "--human.study_dir", str(tmp_path / "h")],
        cwd=repo_root, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: evaluation examples not found")
    assert "Traceback" not in result.stderr
    former = subprocess.run([sys.executable, "-m", "eval.human", "export", "--out", str(tmp_path / "h")],
                            cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert former.returncode == 2 and former.stderr.strip() == "error: --out was replaced: use --human.study_dir"


def test_cli_reads_the_human_section_from_a_recipe_and_overrides(tmp_path: Path) -> None:
    """The recipe of a run finds its evaluation: human.eval_dir/study_dir default to eval.out_dir and <output_dir>/human."""
    from eval.human.__main__ import main

    run = tmp_path / "run"
    write_eval_examples(run / "eval", 8, ["base_model", "sft_model", "ppo_model"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {run}\nppo:\n  steps: 3\nhuman:\n  n: 3\n  seed: 2\n")
    main(["export", "--config", str(recipe), "--human.systems", "base_model,ppo_model"])
    study = load_study(run / "human")
    assert len(study.items) == 3 and len(study.items[0].summaries) == 2
    assert json.loads((run / "human/key.json").read_text())["seed"] == 2
    main(["export", "--force", "--config", str(recipe), "--human.n=5", "--human.study_dir", str(tmp_path / "other")])
    assert len(load_study(tmp_path / "other").items) == 5  # the command line wins over the recipe
    write_eval_examples(run / "eval-sft", 4, ["base_model", "sft_model"])  # an evaluation kept apart by eval.out_dir
    main(["export", "--config", str(recipe), "--eval.out_dir", "{output_dir}/eval-sft", "--human.study_dir",
          str(tmp_path / "third")])
    assert [len(item.summaries) for item in load_study(tmp_path / "third").items] == [2, 2, 2]  # human.eval_dir follows it


def test_cli_exports_by_disagreement(tmp_path: Path, repo_root: Path) -> None:
    """--human.select disagreement reaches export: the dialogues with the largest reward-model/judge gap; an
    evaluation without judges stops with one line saying how to get them."""
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    gaps = [0.0, 0.5, 0.25, 1.0]  # |toxicity - judge| of system b per example; a agrees with the judge
    with open(eval_dir / "examples.jsonl", "w") as f:
        for i, gap in enumerate(gaps):
            systems = {"a": {"summary": f"a {i}", "toxicity": 0.0, "judges": {"toxigen": 0.0}},
                       "b": {"summary": f"b {i}", "toxicity": gap, "judges": {"toxigen": 0.0}}}
            f.write(json.dumps({"id": f"e{i}", "dialogue": f"d {i}", "systems": systems}) + "\n")
    command = [sys.executable, "-m", "eval.human", "export", "--human.eval_dir", str(eval_dir), "--human.n", "2"]
    result = subprocess.run([*command, "--human.study_dir", str(tmp_path / "h"), "--human.select", "disagreement"],
                            cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    key = json.loads((tmp_path / "h/key.json").read_text())
    assert key["select"] == "disagreement"
    assert sorted(e["example_id"] for e in key["items"].values()) == ["e1", "e3"]

    old = write_eval_examples(tmp_path / "old", 3, ["a", "b"])  # no "judges"
    command[command.index(str(eval_dir))] = str(old)
    result = subprocess.run([*command, "--human.study_dir", str(tmp_path / "h2"), "--human.select", "disagreement"],
                            cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: human.select disagreement needs held-out judge")
    assert "--eval.judges '[{name: toxigen, model_name_or_path: tomh/toxigen_roberta" in result.stderr
    assert not (tmp_path / "h2").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "--out", "x"], "--out was replaced: use --human.report_dir"),
    (["serve", "--port", "8601"], "--port was replaced: use --human.port"),
    (["serve", "--items", "x"], "--items was replaced: use --human.study_dir"),
    (["export", "--n", "5"], "--n was replaced: use --human.n"),
    (["serve", "--human.port", "0"], "human.port must be between 1 and 65535, got 0"),
    (["export", "--human.n", "0"], "human.n must be at least 1, got 0"),
    (["export", "--human.sead", "5"], "did you mean '--human.seed'"),
    (["export", "--human.select", "best"], "'human.select' must be one of 'random', 'disagreement'; got 'best'"),
])
def test_cli_bad_settings_stop_before_any_work(capsys, argv: list[str], message: str) -> None:
    from eval.human.__main__ import main
    from train.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_serve_help_says_what_an_organiser_needs_to_know(capsys) -> None:
    """Behind a reverse proxy forms are refused unless it passes the Host through; old names get personal codes."""
    from eval.human.__main__ import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "compared with the scheme and Host header of the request" in text
    assert "reverse proxy" in text and "X-Forwarded-Proto" in text
    assert "personal-codes.txt" in text and DETOX_TOKEN in text


DETOX_TOKEN = "DETOX_HUMAN_TOKEN"
