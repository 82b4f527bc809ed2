"""slurm/task.sh, run once per machine: accelerate's rendezvous from SLURM's variables, the split of the GPUs between
training and the reward model, and the CPU mode. A stub interpreter records the launch instead of running it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT

PY = sys.executable


def _fake_python(tmp_path: Path) -> Path:
    """An interpreter that records `-m accelerate.commands.launch ...` instead of launching; runs anything else."""
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1" == -m && "$2" == accelerate.commands.launch ]]; then\n'
        f'  shift 2; {PY} -c \'import json, os, signal, sys; print(json.dumps({{"argv": sys.argv[1:], '
        '"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "ignored": [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR1, signal.SIGTERM)]}))\' "$@"\n'
        f'else exec {PY} "$@"; fi\n'
    )
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return stub


def _run_task(tmp_path: Path, **env: str) -> dict:
    base = {"REPO": str(REPO_ROOT), "PYTHON": str(_fake_python(tmp_path)), "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "29555", "DETOX_CPU": "0", "PROCS_PER_MACHINE": "1",
            "RESERVE_REWARD_GPU": "1", "REWARD_SERVER": "0", "REWARD_PORT": "1", "HEALTH_TIMEOUT": "5",
            "ACCELERATE_CONFIG": "accelerate_configs/multi_node_zero3.yaml", "ACCELERATE_ARGS": ""}
    full_env = {**os.environ, **base, **env}
    out = subprocess.run(["bash", "slurm/task.sh", "train.ppo", "--config", "configs/tiny.yaml"], cwd=REPO_ROOT,
                         env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_task_rendezvous_and_gpu_split_with_reward_server(tmp_path: Path, health_server):
    """Machine 1 of 2 with 5 GPUs: 4 train (CUDA_VISIBLE_DEVICES), the 5th serves rewards on this node."""
    got = _run_task(tmp_path, CUDA_VISIBLE_DEVICES="0,1,2,3,4", REWARD_SERVER="1", REWARD_PORT=str(health_server))
    argv = got["argv"]
    assert got["cvd"] == "0,1,2,3"
    assert _flag(argv, "--config_file") == "accelerate_configs/multi_node_zero3.yaml"
    assert (_flag(argv, "--num_machines"), _flag(argv, "--machine_rank"), _flag(argv, "--num_processes")) == ("2", "1", "8")
    assert (_flag(argv, "--main_process_ip"), _flag(argv, "--main_process_port")) == ("node-a", "29555")
    assert argv[argv.index("slurm/run_stage.py") + 1] == "train.ppo"
    assert _flag(argv, "--reward.url") == f"http://127.0.0.1:{health_server}"
    assert got["ignored"] == [True, True], "the launcher must ignore SIGUSR1/SIGTERM (the workers checkpoint on them)"


def test_task_in_process_reward_model_on_the_reserved_gpu(tmp_path: Path):
    got = _run_task(tmp_path, CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_PROCID="0", SLURM_NTASKS="1")
    argv = got["argv"]
    assert got["cvd"] == "0,1,2,3"  # the trainers see the reward GPU, and leave it to the reward model
    assert _flag(argv, "--num_processes") == "3" and _flag(argv, "--reward.device") == "cuda:3"
    assert "--reward.url" not in argv


def test_task_cpu_mode_uses_the_cpu_flags(tmp_path: Path):
    got = _run_task(tmp_path, DETOX_CPU="1", PROCS_PER_MACHINE="2", ACCELERATE_CONFIG="", SLURM_PROCID="0")
    argv = got["argv"]
    assert "--config_file" not in argv and "--multi_gpu" in argv
    assert (_flag(argv, "--mixed_precision"), _flag(argv, "--dynamo_backend"), _flag(argv, "--num_processes")) == (
        "no", "no", "4")
