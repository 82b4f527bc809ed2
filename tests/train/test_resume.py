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
from train.errors import ConfigError
from train.resume import apply_optimizer_settings, check_resume_settings, setting_changes, settings_of
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


def test_paths_written_another_way_and_lora_targets_in_another_order_are_not_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    saved = settings_of(load_config(REPO_ROOT / "configs/tiny.yaml", ["--data.path", "data",
                                                                       "--lora.target_modules", "q,v"]))
    same = load_config(REPO_ROOT / "configs/tiny.yaml", ["--data.path", str(tmp_path / "data" / "."),
                                                         "--lora.target_modules", "v,q"])
    assert setting_changes(saved, same, "ppo") == {}
    other = load_config(REPO_ROOT / "configs/tiny.yaml", ["--lora.target_modules", "q,k,v"])
    assert set(setting_changes(saved, other, "ppo")) == {"data.path", "lora.target_modules"}


def test_the_starting_adapter_counts_only_where_a_resumed_run_reads_it():
    saved = settings_of(load_config(REPO_ROOT / "configs/tiny.yaml", ["--model.adapter", "runs/a/sft/adapter",
                                                                       "--ppo.reference", "base"]))
    moved = ["--model.adapter", "runs/b/sft/adapter", "--ppo.reference", "base"]
    # SFT and PPO with the base as KL reference take the adapter from the checkpoint on resume...
    assert setting_changes(saved, load_config(REPO_ROOT / "configs/tiny.yaml", moved), "sft") == {}
    assert setting_changes(saved, load_config(REPO_ROOT / "configs/tiny.yaml", moved), "ppo") == {}
    # ...but with the initial adapter as KL reference it is the anchor, fixed for the run.
    anchored = settings_of(load_config(REPO_ROOT / "configs/tiny.yaml", ["--model.adapter", "runs/a/sft/adapter",
                                                                          "--ppo.reference", "initial_adapter"]))
    cfg = load_config(REPO_ROOT / "configs/tiny.yaml", ["--model.adapter", "runs/b/sft/adapter",
                                                        "--ppo.reference", "initial_adapter"])
    assert set(setting_changes(anchored, cfg, "ppo")) == {"model.adapter"}
    with pytest.raises(ConfigError, match="model.adapter cannot change within a run"):
        _check_against(anchored, cfg, "ppo")


def _check_against(saved: dict, cfg, stage: str) -> dict:
    from unittest import mock

    with mock.patch("train.resume.read_trainer_state", return_value={"settings": saved}):
        return check_resume_settings(Path("checkpoint-1"), cfg, stage, accept_changes=True)


def test_changed_learning_rate_and_weight_decay_are_set_on_the_restored_optimizer_and_schedule():
    import torch
    from transformers import get_scheduler

    def optimizer_and_schedule(lr: float, weight_decay: float):
        params = [torch.nn.Parameter(torch.ones(2))]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return optimizer, get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)

    old, old_schedule = optimizer_and_schedule(1e-3, 0.0)
    for _ in range(4):
        old.step()
        old_schedule.step()
    new, schedule = optimizer_and_schedule(0.5, 0.1)
    new.load_state_dict(old.state_dict())  # what resuming restores: the checkpoint's rate and decay
    schedule.load_state_dict(old_schedule.state_dict())
    assert new.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.6)
    apply_optimizer_settings(new, 0.5, 0.1, schedule)
    assert new.param_groups[0]["lr"] == pytest.approx(0.5 * 0.6) == schedule.get_last_lr()[0]
    assert new.param_groups[0]["weight_decay"] == 0.1
    new.step()
    schedule.step()
    assert new.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5)  # the schedule goes on from the new base rate
    # Unchanged settings leave the restored optimizer bit for bit as it was.
    again, again_schedule = optimizer_and_schedule(1e-3, 0.0)
    again.load_state_dict(old.state_dict())
    again_schedule.load_state_dict(old_schedule.state_dict())
    apply_optimizer_settings(again, 1e-3, 0.0, again_schedule)
    assert again.param_groups[0]["lr"] == old.param_groups[0]["lr"]


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
    import train.ppo

    monkeypatch.setattr(train.ppo, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(train.ppo, "make_reward_fn", lambda *a, **k: pytest.fail("the reward model was loaded"))
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


def test_the_advantage_estimator_cannot_change_within_a_run(tmp_path):
    # gae's checkpoint holds a value head and its optimizer state, rloo's none: no flag makes one into the other.
    from train.checkpoint import SETTINGS_KEY, TRAINER_STATE_FILE
    from train.errors import ConfigError
    from train.resume import check_resume_settings, settings_of

    saved = load_config(REPO_ROOT / "configs/tiny.yaml")
    (tmp_path / TRAINER_STATE_FILE).write_text(json.dumps({"num_processes": 1, SETTINGS_KEY: settings_of(saved)}))
    critic_free = load_config(REPO_ROOT / "configs/tiny.yaml", ["--ppo.advantage_estimator", "rloo",
                                                               "--rollout.samples_per_prompt", "2"])
    for accept in (False, True):
        with pytest.raises(ConfigError, match="ppo.advantage_estimator cannot change within a run"):
            check_resume_settings(tmp_path, critic_free, "ppo", accept)
    more_samples = load_config(REPO_ROOT / "configs/tiny.yaml", ["--rollout.samples_per_prompt", "2"])
    assert check_resume_settings(tmp_path, more_samples, "ppo", True) == {"rollout.samples_per_prompt": (1, 2)}


def test_a_checkpoint_from_before_the_estimator_existed_counts_as_gae(tmp_path):
    from train.checkpoint import SETTINGS_KEY, TRAINER_STATE_FILE

    saved = settings_of(load_config(REPO_ROOT / "configs/tiny.yaml"))
    del saved["ppo"]["advantage_estimator"], saved["ppo"]["kl_penalty"], saved["rollout"]["samples_per_prompt"]
    (tmp_path / TRAINER_STATE_FILE).write_text(json.dumps({"num_processes": 1, SETTINGS_KEY: saved}))
    group = load_config(REPO_ROOT / "configs/tiny.yaml", ["--ppo.advantage_estimator", "group",
                                                         "--rollout.samples_per_prompt", "4"])
    with pytest.raises(ConfigError, match="ppo.advantage_estimator cannot change within a run"):
        check_resume_settings(tmp_path, group, "ppo", True)
    assert check_resume_settings(tmp_path, load_config(REPO_ROOT / "configs/tiny.yaml"), "ppo", False) == {}
