"""slurm/launch_helpers.py, the Python side of the templates: the GPU split, the launch plan read from the config,
and the bounded wait for the reward server's health."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import time

import pytest

from rewards.server import parse_args as reward_server_parse_args
from train.config import load_config
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "slurm"))
import launch_helpers  # noqa: E402  (slurm/ is not a package: the templates run it as a file)

PY = sys.executable


def test_gpu_split_reserves_the_last_gpu():
    gpus = launch_helpers.visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5,6,7"})
    assert gpus == ["3", "5", "6", "7"]
    assert launch_helpers.split_gpus(gpus, reserve_reward=True) == (["3", "5", "6"], ["7"])
    assert launch_helpers.split_gpus(gpus, reserve_reward=False) == (gpus, [])
    with pytest.raises(launch_helpers.LaunchError, match="at least 2 GPUs"):
        launch_helpers.split_gpus(["0"], reserve_reward=True)


def test_plan_reads_the_config_and_checks_ppo_batches():
    args = ["--config", "configs/tiny.yaml", "--output_dir", "runs/x", "--reward.batch_size", "7", "--resume"]
    plan = launch_helpers.plan("ppo", machines=2, procs_per_machine=2, stage_args=args, reward_device="cuda:0")
    assert plan["OUTPUT_DIR"] == "runs/x" and plan["NUM_PROCESSES"] == "4"
    # The server arguments are valid for rewards.server and carry the config's reward settings.
    cfg = load_config(REPO_ROOT / "configs/tiny.yaml", ["--reward.batch_size", "7"])
    server = reward_server_parse_args(shlex.split(plan["REWARD_SERVER_ARGS"]))
    assert server.reward == dataclasses.replace(cfg.reward, device="cuda:0", text="prompt_and_summary")
    assert server.reward_server == cfg.reward_server
    args = ["--config", "configs/tiny.yaml", "--reward_server.max_queue", "9", "--reward.max_length", "33"]
    server = reward_server_parse_args(shlex.split(launch_helpers.plan("ppo", 1, 1, args, "cpu")["REWARD_SERVER_ARGS"]))
    assert (server.reward_server.max_queue, server.reward.max_length, server.reward.device) == (9, 33, "cpu")
    # 3 processes cannot share PPO's global batch of 16 / mini-batch of 4: one clear error before any model loads.
    with pytest.raises(launch_helpers.LaunchError, match="multiples of the 3 training processes"):
        launch_helpers.plan("ppo", 3, 1, ["--config", "configs/tiny.yaml"], "cpu")
    # k = 4 samples per prompt on 8 processes: 16 summaries are 4 prompts, which 8 processes cannot share.
    group = ["--config", "configs/tiny.yaml", "--ppo.advantage_estimator", "group", "--rollout.samples_per_prompt", "4"]
    with pytest.raises(launch_helpers.LaunchError, match=r"16\) is 4 prompts x 4 samples .* multiple of 4 x the 8"):
        launch_helpers.plan("ppo", 4, 2, group, "cpu")
    launch_helpers.plan("ppo", 2, 2, group, "cpu")
    with pytest.raises(launch_helpers.LaunchError, match=r"sft.batch_size \(8\) is global .* 3 training processes"):
        launch_helpers.plan("sft", 3, 1, ["--config", "configs/tiny.yaml"], "cpu")  # SFT batches are global too
    launch_helpers.plan("sft", 2, 2, ["--config", "configs/tiny.yaml"], "cpu")
    cli = subprocess.run([PY, "slurm/launch_helpers.py", "plan", "--stage", "ppo", "--", "--config", "nope.yaml"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.startswith("error: config file not found: nope.yaml")
    assert "Traceback" not in cli.stderr


def test_wait_health_is_bounded(health_server):
    launch_helpers.wait_health(f"http://127.0.0.1:{health_server}/health", timeout_s=5)
    started = time.monotonic()
    with pytest.raises(launch_helpers.LaunchError, match="did not answer"):
        launch_helpers.wait_health(f"http://127.0.0.1:{health_server}/nothing", timeout_s=1.5, interval_s=0.2)
    assert time.monotonic() - started < 10
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    with pytest.raises(launch_helpers.LaunchError, match="exited before"):
        launch_helpers.wait_health("http://127.0.0.1:9/health", timeout_s=60, pid=dead.pid, interval_s=0.1)
