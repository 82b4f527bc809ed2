"""train/resume.py and the resume path of SFT and PPO under faults: a damaged newest checkpoint and a torn log line
(resume from the newest intact state, with a warning), and changed settings (refused with the list of differences,
or accepted with --resume-with-changes, applied and recorded)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.cli import run_cli
from train.config import load_config
from train.resume import setting_changes, settings_of
from helpers import PPO_TIMEOUT_S, REPO_ROOT, ppo_args, ppo_env, read_ppo_log, run_ppo, sft_args

SHORT = ["--ppo.batch_size", "8", "--ppo.mini_batch_size", "4", "--ppo.save_every_steps", "2",
         "--ppo.learning_rate", "1e-3", "--rollout.max_new_tokens", "12"]


def test_operational_keys_and_other_stages_sections_are_not_changes():
    cfg = load_config(REPO_ROOT / "configs/tiny.yaml")
    saved = settings_of(cfg)
    changed = load_config(REPO_ROOT / "configs/tiny.yaml", [
        "--ppo.steps", "99", "--ppo.save_every_steps", "3", "--reward.device", "cpu", "--trackers", "none",
        "--eval.max_examples", "5", "--sft.learning_rate", "0.5", "--ppo.learning_rate", "0.01", "--ppo.cliprange", "0.3"])
    assert setting_changes(saved, changed, "ppo") == {"ppo.learning_rate": (1.41e-5, 0.01), "ppo.cliprange": (0.2, 0.3)}
    assert setting_changes(saved, changed, "sft") == {"sft.learning_rate": (saved["sft"]["learning_rate"], 0.5)}


def _resume_error(args: list[str], capsys) -> str:
    from train import ppo

    with pytest.raises(SystemExit) as exit_info:
        run_cli(ppo.main, args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_ppo_resume_with_changed_settings_is_refused_unless_accepted_then_applied_and_recorded(
        tmp_path, tiny_artifacts, capsys, monkeypatch):
    run_ppo(ppo_args(tiny_artifacts, tmp_path, *SHORT, "--ppo.steps", "2"))
    config_before = (tmp_path / "ppo/config.yaml").read_text()

    # Refused before any model loads, with the list of differences; config.yaml still tells the truth.
    import train.models

    monkeypatch.setattr(train.models, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    line = _resume_error(ppo_args(tiny_artifacts, tmp_path, *SHORT, "--ppo.steps", "3", "--ppo.learning_rate", "1e-2",
                                  "--ppo.batch_size", "4", "--resume"), capsys)
    assert "settings differ from the checkpoint's" in line
    assert "ppo.learning_rate 0.001 -> 0.01" in line and "ppo.batch_size 8 -> 4" in line
    assert "--resume-with-changes" in line and "ppo.steps" not in line  # the step count may always grow
    assert (tmp_path / "ppo/config.yaml").read_text() == config_before
    # What defines the run cannot change even when asked.
    line = _resume_error(ppo_args(tiny_artifacts, tmp_path, *SHORT, "--seed", "7", "--resume-with-changes"), capsys)
    assert "seed cannot change within a run" in line and "seed 42 -> 7" in line
    monkeypatch.undo()

    # Accepted: the new rate is the one the optimizer uses from the resumed step on, and the resume is recorded.
    run_ppo(ppo_args(tiny_artifacts, tmp_path, *SHORT, "--ppo.steps", "3", "--ppo.learning_rate", "1e-2",
                     "--resume-with-changes"))
    log = read_ppo_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [r["ppo/learning_rate"] for r in log] == [1e-3, 1e-3, 1e-2]
    assert yaml.safe_load((tmp_path / "ppo/config.yaml").read_text())["ppo"]["learning_rate"] == 1e-2
    resumes = [json.loads(line) for line in (tmp_path / "ppo/resumes.jsonl").read_text().splitlines()]
    assert resumes == [{"step": 2, "checkpoint": str(tmp_path / "ppo/checkpoints/checkpoint-2"),
                        "changes": {"ppo.learning_rate": {"checkpoint": 1e-3, "now": 1e-2}}}]


def test_ppo_resumes_from_the_newest_intact_state_past_a_damaged_checkpoint_and_a_torn_log_line(
        tmp_path, tiny_artifacts):
    run_ppo(ppo_args(tiny_artifacts, tmp_path, *SHORT, "--ppo.steps", "4", "--ppo.keep_checkpoints", "2"))
    straight = read_ppo_log(tmp_path)
    checkpoints = tmp_path / "ppo/checkpoints"
    # A crash left the newest checkpoint's adapter with other bytes, and the log with half a record (cut inside a
    # multi-byte character) after step 4's.
    adapter = checkpoints / "checkpoint-4/policy/adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    with open(tmp_path / "ppo/log.jsonl", "ab") as f:
        f.write('{"step": 5, "env/reward_mean": "\u00e9'.encode()[:-1])

    proc = run_ppo(ppo_args(tiny_artifacts, tmp_path, *SHORT, "--ppo.steps", "4", "--resume"))
    assert "checkpoint-4 is damaged (policy/adapter_model.safetensors differs from what was written" in proc.stderr
    assert "resuming from checkpoint-2, the newest intact checkpoint" in proc.stderr
    assert "is not a whole log record (a write cut short?): dropped" in proc.stderr
    assert "Traceback" not in proc.stderr
    log = read_ppo_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # the torn line gone, steps 3 and 4 logged once, again
    assert [r["env/reward_mean"] for r in log[:2]] == [r["env/reward_mean"] for r in straight[:2]]


def test_sft_resume_with_a_changed_learning_rate_needs_the_flag_and_then_uses_it(
        tiny_artifacts, repo_root, tmp_path, one_torch_thread, capsys):
    from train import sft

    def args(*extra):
        return sft_args(repo_root, tiny_artifacts, tmp_path, "--data.max_examples", "32", "--sft.max_steps", "4",
                        "--sft.save_every_steps", "2", "--sft.log_every_steps", "1", "--sft.eval_every_steps", "100",
                        "--sft.eval_rouge_examples", "0", "--sft.lr_scheduler", "constant", *extra)

    sft.main(args())
    shutil.rmtree(tmp_path / "sft/checkpoints/checkpoint-4")  # as if killed after step 2's checkpoint
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sft.main, args("--sft.learning_rate", "0.5", "--sft.weight_decay", "0.1", "--resume"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "sft.learning_rate" in err and "sft.weight_decay 0.0 -> 0.1" in err and "Traceback" not in err

    sft.main(args("--sft.learning_rate", "0.5", "--sft.weight_decay", "0.1", "--resume-with-changes"))
    rates = [(r["step"], r["train/lr"]) for r in map(json.loads, (tmp_path / "sft/log.jsonl").read_text().splitlines())
             if "train/lr" in r]
    assert rates[-2:] == [(3, 0.5), (4, 0.5)]
    assert rates[0][1] != 0.5
    resumes = [json.loads(line) for line in (tmp_path / "sft/resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["step"] == 2 and set(resumes[-1]["changes"]) == {"sft.learning_rate", "sft.weight_decay"}


def test_resume_with_changes_without_a_checkpoint_is_one_clear_error(tmp_path, tiny_artifacts):
    proc = subprocess.run([sys.executable, "-m", "train.ppo", *ppo_args(tiny_artifacts, tmp_path, "--resume-with-changes")],
                          cwd=REPO_ROOT, env=ppo_env(), capture_output=True, text=True, timeout=PPO_TIMEOUT_S)
    assert proc.returncode == 2 and "there is no checkpoint to resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (Path(tmp_path) / "ppo/config.yaml").exists()
