"""The one-command workflow (eval.pipeline): its stages, the commands it runs, and its errors."""

import os
import subprocess
import sys

import pytest

from eval import pipeline


def test_stages_are_sft_ppo_eval_and_ppo_starts_from_the_sft_adapter():
    commands = pipeline.stage_commands("configs/tiny.yaml", ["--seed", "3"], "runs/x", resume=True)
    assert list(commands) == list(pipeline.STAGES) == ["sft", "ppo", "eval"]
    assert commands["sft"][:2] == ["-m", "train.sft"] and "--resume" in commands["sft"]
    assert commands["ppo"][-2:] == ["--model.adapter", "runs/x/sft/adapter"]
    assert commands["eval"][:2] == ["-m", "eval.evaluate"] and "--resume" not in commands["eval"]
    assert all(cmd[2:6] == ["--config", "configs/tiny.yaml", "--seed", "3"] for cmd in commands.values())


@pytest.mark.parametrize(
    "stages, message",
    [
        ("baseline,sft", "the eval stage scores the zero-shot base model"),
        ("sft,train", "unknown stage(s) ['train']"),
    ],
)
def test_unknown_stage_is_one_clear_error_before_anything_runs(repo_root, tmp_path, stages, message):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.pipeline", "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path),
         "--stages", stages], cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())  # no stage started


def test_bad_config_fails_before_any_stage(repo_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.pipeline", "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path),
         "--ppo.mini_batch_size", "3"], cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "ppo.batch_size" in proc.stderr and "===" not in proc.stdout, proc.stderr


@pytest.mark.parametrize("judges, message", [
    ("[{model_name_or_path: artifacts/tiny/judge, toxic_label: toxic}]", "eval.judges[0].toxic_label"),
    ("[{model_name_or_path: someone/uncached-judge, toxic_label: toxic}]",
     "classifier of eval.judges[0] 'someone/uncached-judge' is neither a local directory nor in the Hugging Face cache"),
])
def test_a_judge_that_cannot_load_stops_the_pipeline_before_training(repo_root, tmp_path, judges, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run(
        [sys.executable, "-m", "eval.pipeline", "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path / "run"),
         "--eval.judges", judges], cwd=repo_root, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "===" not in proc.stdout and "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
