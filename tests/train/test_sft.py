"""LoRA SFT (train/sft.py) end to end on the tiny model: learning, 2-process sharding, trackers, kill/resume and
errors. The SFT run most tests share is the `trained` fixture of tests/conftest.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from train import sft
from train.checkpoint import latest_checkpoint, list_checkpoints
from train.cli import run_cli
from train.config import load_config
from train.preemption import PREEMPTED_EXIT_CODE
from helpers import (
    backend_params, copy_checkpoint, expected_scalars, free_port, launcher, logged_numbers, sft_args,
    tensorboard_scalars, wandb_history,
)

ADAPTER_FILE = "adapter/adapter_model.safetensors"
# A loss drop this large cannot be noise: validation loss is computed in eval mode (no dropout) on fixed data,
# and a randomly initialised model starts near ln(vocab) ~ 7.5 nats.
MIN_LOSS_DROP = 0.5


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sft" / ADAPTER_FILE))


def test_sft_lowers_validation_loss_and_writes_its_outputs(trained):
    metrics = json.loads((trained / "sft/metrics.json").read_text())
    assert metrics["steps"] == 40 and [e["step"] for e in metrics["history"]] == [0, 20, 40]
    assert metrics["final_eval"]["eval/loss"] < metrics["initial_eval"]["eval/loss"] - MIN_LOSS_DROP
    assert all(f"eval/{k}" in metrics["final_eval"] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    train_losses = [r["train/loss"] for r in read_jsonl(trained / "sft/log.jsonl") if "train/loss" in r]
    assert len(train_losses) == 8 and train_losses[-1] < train_losses[0]
    # The adapter is a peft adapter (safetensors) whose LoRA B matrices have left their zero initialisation.
    tensors = adapter_tensors(trained)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert all(v.abs().max() > 0 for k, v in tensors.items() if ".lora_B." in k)
    assert json.loads((trained / "sft/adapter/adapter_config.json").read_text())["r"] == 8
    assert load_config(trained / "sft/config.yaml").sft.max_steps == 40  # the resolved config round-trips
    assert [step for step, _ in list_checkpoints(trained / "sft/checkpoints")] == [20, 40]


def test_two_process_run_shards_the_data_and_saves_the_same_adapter_shapes(tiny_artifacts, repo_root, tmp_path, trained):
    # 32 examples, global batches of 8 (4 per process), 2 processes: one epoch is exactly 4 steps.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(repo_root / "accelerate_configs/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
        "-m", "train.sft", *sft_args(repo_root, tiny_artifacts, tmp_path, "--data.max_examples", "32",
                                     "--sft.batch_size", "8", "--sft.eval_rouge_examples", "3",
                                     "--debug_dir", str(tmp_path / "debug")),
    ]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((tmp_path / "sft/metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4
    records = [read_jsonl(tmp_path / "debug" / f"rank{rank}.jsonl") for rank in range(2)]
    assert [len(r) for r in records] == [4, 4]
    assert all(a["params_sha256"] == b["params_sha256"] for a, b in zip(*records))  # the same weights after each step
    per_rank = [[row for step in records[rank] for row in step["example_ids"]] for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 16
    assert not set(per_rank[0]) & set(per_rank[1])  # each process trained on different examples
    assert sorted(per_rank[0] + per_rank[1]) == list(range(32))  # and together they covered the data once
    one_process = {k: v.shape for k, v in adapter_tensors(trained).items()}
    assert {k: v.shape for k, v in adapter_tensors(tmp_path).items()} == one_process


def test_gradient_accumulation_takes_one_optimizer_step_per_step(tiny_artifacts, repo_root, tmp_path):
    # 32 examples in batches of 8, 2 batches per step: each epoch's last step is fetched up to the end of the
    # data loader, where syncing every batch would add an optimizer step per epoch.
    sft.main(sft_args(repo_root, tiny_artifacts, tmp_path, "--data.max_examples", "32", "--sft.batch_size", "8",
                      "--sft.gradient_accumulation_steps", "2", "--sft.max_steps", "4", "--sft.save_every_steps", "4",
                      "--sft.eval_every_steps", "100", "--sft.eval_rouge_examples", "0"))
    checkpoint = tmp_path / "sft/checkpoints/checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 4)  # the end of the second epoch of two steps
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {4}


def test_tensorboard_gets_the_numbers_of_log_jsonl_and_the_config(trained):
    expected = expected_scalars(read_jsonl(trained / "sft/log.jsonl"))
    assert {"train/loss", "train/lr", "eval/loss", "eval/rouge1"} <= expected.keys()
    # Every number, at its step, once (eval/samples is text: log.jsonl only).
    assert tensorboard_scalars(trained / "sft/tensorboard") == expected
    (hparams,) = (trained / "sft/tensorboard").glob("*/hparams.yml")  # the flattened config, as hyperparameters
    assert yaml.safe_load(hparams.read_text())["sft.max_steps"] == 40
    assert not (trained / "sft/wandb").exists()


def test_resumed_run_replaces_the_tensorboard_steps_after_its_checkpoint(tiny_artifacts, repo_root, tmp_path,
                                                                         one_torch_thread):
    # The first run logged steps 3 and 4 after its step-2 checkpoint; resumed from there, the run logs them again
    # and TensorBoard shows them once, as log.jsonl does.
    args = sft_args(repo_root, tiny_artifacts, tmp_path, "--data.max_examples", "32", "--sft.max_steps", "4",
                    "--sft.save_every_steps", "2", "--sft.log_every_steps", "1", "--sft.eval_every_steps", "100",
                    "--sft.eval_rouge_examples", "0")
    sft.main(args)
    shutil.rmtree(tmp_path / "sft/checkpoints/checkpoint-4")
    sft.main([*args, "--resume"])
    expected = expected_scalars(read_jsonl(tmp_path / "sft/log.jsonl"))
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4]
    assert tensorboard_scalars(tmp_path / "sft/tensorboard") == expected


@pytest.mark.parametrize("trackers", ["wandb", "none"])
def test_wandb_tracker_logs_offline_and_none_logs_nowhere(tiny_artifacts, repo_root, tmp_path, trackers,
                                                          one_torch_thread):
    args = sft_args(repo_root, tiny_artifacts, tmp_path, "--data.max_examples", "32", "--sft.max_steps", "2",
                    "--sft.log_every_steps", "1", "--sft.eval_every_steps", "2", "--sft.eval_rouge_examples", "0",
                    "--trackers", trackers)
    if trackers == "none":
        sft.main(args)
    else:  # a process of its own: wandb keeps process-wide state and service processes. Offline: no network.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
        env.update(WANDB_MODE="offline", WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_CONFIG_DIR=str(tmp_path / "cfg"),
                   WANDB_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([sys.executable, "-m", "train.sft", *args], cwd=repo_root, env=env, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_jsonl(tmp_path / "sft/log.jsonl")
    assert [(r["step"], "train/loss" in r) for r in log] == [(0, False), (1, True), (2, True), (2, False)]
    assert not (tmp_path / "sft/tensorboard").exists()
    if trackers == "none":
        assert not (tmp_path / "sft/wandb").exists()
        return
    rows = {row["_step"]: row for row in wandb_history(tmp_path / "sft/wandb")}  # <stage dir>/wandb/offline-run-*
    assert sorted(rows) == [0, 1, 2]
    for record in log:
        assert {k: rows[record["step"]][k] for k in logged_numbers(record)} == pytest.approx(logged_numbers(record))


def _start(args: list[str], repo_root: Path, stderr: Path) -> subprocess.Popen:
    # stderr to a file, not a pipe: nobody reads a pipe while the run's progress bar fills it.
    with open(stderr, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "train.sft", *args], cwd=repo_root,
                                stdout=subprocess.DEVNULL, stderr=f)


def _wait_for_checkpoint_after(proc: subprocess.Popen, checkpoints: Path, step: int, stderr: Path) -> int:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = [s for s, _ in list_checkpoints(checkpoints) if s > step]
        if found:
            return found[-1]
        assert proc.poll() is None, f"run ended before checkpointing: {stderr.read_text()[-2000:]}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint after step {step} within 180 s")


def test_killed_and_preempted_runs_resume_to_the_same_adapter(tiny_artifacts, repo_root, tmp_path):
    run = sft_args(repo_root, tiny_artifacts, tmp_path / "interrupted", "--sft.max_steps", "60",
                   "--sft.save_every_steps", "5", "--sft.eval_every_steps", "30")
    checkpoints = tmp_path / "interrupted/sft/checkpoints"

    # 1. SIGKILL right after the first checkpoint: nothing else is saved.
    log = tmp_path / "stderr.txt"
    proc = _start(run, repo_root, log)
    first = _wait_for_checkpoint_after(proc, checkpoints, 0, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "interrupted/sft/metrics.json").exists()

    # 2. Without --resume the earlier run's checkpoints are protected.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sft.main, run)
    assert exit_info.value.code == 2

    # 3. Resume, then preempt with SIGTERM: checkpoint at the current step and exit with status 3.
    proc = _start([*run, "--resume"], repo_root, log)
    _wait_for_checkpoint_after(proc, checkpoints, first, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, log.read_text()[-2000:]
    preempted_at = int(latest_checkpoint(checkpoints).name.split("-")[1])
    assert first < preempted_at < 60

    # 4. Resume again: it finishes with the planned number of steps, the same adapter as an uninterrupted run.
    proc = _start([*run, "--resume"], repo_root, log)
    assert proc.wait(timeout=240) == 0, log.read_text()[-2000:]
    assert f"resumed from {checkpoints / f'checkpoint-{preempted_at}'}" in log.read_text()
    metrics = json.loads((tmp_path / "interrupted/sft/metrics.json").read_text())
    assert metrics["steps"] == 60 and [e["step"] for e in metrics["history"]] == [0, 30, 60]
    logged_steps = [r["step"] for r in read_jsonl(tmp_path / "interrupted/sft/log.jsonl") if "train/loss" in r]
    assert logged_steps == list(range(5, 61, 5))  # no step logged twice after the restarts

    sft.main(sft_args(repo_root, tiny_artifacts, tmp_path / "straight", "--sft.max_steps", "60",
                      "--sft.save_every_steps", "60", "--sft.eval_every_steps", "30"))
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "interrupted")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name  # exact: same data order, dropout, optimizer


def test_rerunning_over_checkpoints_without_resume_is_one_clear_error(tiny_artifacts, repo_root, trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sft.main, sft_args(repo_root, tiny_artifacts, trained, "--sft.max_steps", "40"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "has checkpoints from an earlier run: pass --resume" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.adapter", "no/such/adapter_dir"], "adapter 'no/such/adapter_dir' not found"),
        (["--lora.target_modules", "q,nonexistent"], "'nonexistent' not found in the model"),
    ],
)
def test_bad_adapter_or_target_module_is_one_clear_error(tiny_artifacts, repo_root, tmp_path, capsys, override, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sft.main, sft_args(repo_root, tiny_artifacts, tmp_path, "--sft.max_steps", "2", *override))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0]
    assert not list_checkpoints(tmp_path / "sft/checkpoints")


@pytest.mark.parametrize("backend", backend_params("zero2"))  # ZeRO-2 runs in bf16 by default
def test_two_process_runs_checkpoint_and_resume_exactly(tiny_artifacts, repo_root, tmp_path, backend):
    """DDP and DeepSpeed (ZeRO-2 in fp32 and bf16, ZeRO-3) on CPU: a run killed after its step-2 checkpoint and
    resumed ends with the same adapter, bit for bit, as the uninterrupted run."""
    assert importlib.util.find_spec("deepspeed"), "deepspeed is not installed: pip install -e '.[dev]'"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--data.max_examples", "32", "--sft.batch_size", "8", "--sft.max_steps", "4", "--sft.save_every_steps", "2",
            "--sft.eval_every_steps", "100", "--sft.eval_rouge_examples", "2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for out, extra in ((straight, []), (resumed, ["--resume"])):
        if extra:
            copy_checkpoint(straight, "sft", 2, resumed)
        proc = subprocess.run([*launcher(backend), "-m", "train.sft", *sft_args(repo_root, tiny_artifacts, out, *args),
                               *extra], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((out / "sft/metrics.json").read_text())
        assert metrics["steps"] == 4 and metrics["num_processes"] == 2
    assert "resumed from" in proc.stderr
    assert (straight / "sft/checkpoints/checkpoint-2/deepspeed").is_dir() == backend.startswith("zero")
    logged_steps = [r["step"] for r in read_jsonl(resumed / "sft/log.jsonl") if "train/loss" in r]
    assert len(logged_steps) == len(set(logged_steps))  # resume did not repeat steps
    expected, got = adapter_tensors(straight), adapter_tensors(resumed)
    assert any(t.abs().sum() > 0 for name, t in expected.items() if "lora_B" in name)  # trained
    expected_dtype = torch.bfloat16 if backend.endswith("bf16") else torch.float32  # bf16 really engaged
    assert {t.dtype for t in expected.values()} == {expected_dtype}
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
