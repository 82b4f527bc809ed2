"""slurm/launch_helpers.py, the Python side of the templates: the GPU split, the launch plan read from the config,
and the bounded wait for the reward server's health."""

from __future__ import annotations

import dataclasses
import os
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
    # Mini-batches x accumulation that do not divide the batch: the suggestion is about the batch, not the GPUs.
    accumulate = ["--config", "configs/tiny.yaml", "--ppo.batch_size", "8", "--ppo.mini_batch_size", "4",
                  "--ppo.gradient_accumulation_steps", "3"]
    with pytest.raises(launch_helpers.LaunchError, match=r"x ppo.gradient_accumulation_steps \(3\): pass e.g. "
                                                         r"--ppo.batch_size 12$"):
        launch_helpers.plan("ppo", 1, 1, accumulate, "cpu")
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


def test_reward_ports_offset_only_nodes_that_share_a_host():
    # A real cluster: every node its own machine, every server on REWARD_PORT.
    nodes = [("gpu-01", "gpu-01", "10.0.0.1"), ("gpu-02", "gpu-02", "10.0.0.2"), ("gpu-03", "gpu-03", "10.0.0.3")]
    assert launch_helpers.reward_ports(nodes, 19500, 29500) == {"gpu-01": 19500, "gpu-02": 19500, "gpu-03": 19500}
    # Several slurmd on one machine (the CI cluster: one host name), mixed with a node alone on its machine.
    nodes = [("ci-1", "vm", "127.0.0.1"), ("ci-2", "vm", "127.0.0.1"), ("other", "box", "10.0.0.9"),
             ("ci-3", "vm", "127.0.0.1")]
    assert launch_helpers.reward_ports(nodes, 19500, 29500) == {"ci-1": 19500, "ci-2": 19501, "other": 19500,
                                                                  "ci-3": 19502}
    # No NodeHostname in slurm.conf (it defaults to the node name) but one address: still one machine.
    nodes = [("n1", "n1", "127.0.0.1"), ("n2", "n2", "127.0.0.1")]
    assert launch_helpers.reward_ports(nodes, 19500, 29500) == {"n1": 19500, "n2": 19501}
    # Links through either key make one machine, whatever the order they are seen in.
    nodes = [("a", "h1", "a1"), ("b", "h2", "a2"), ("c", "h1", "a2"), ("d", "h2", "a1")]
    assert sorted(launch_helpers.reward_ports(nodes, 19500, 29500).values()) == [19500, 19501, 19502, 19503]
    with pytest.raises(launch_helpers.LaunchError, match=r"65535..65536 fall outside .*set REWARD_PORT"):
        launch_helpers.reward_ports([("a", "h", "x"), ("b", "h", "x")], 65535, 29500)
    with pytest.raises(launch_helpers.LaunchError, match="include the rendezvous port MASTER_PORT=19501"):
        launch_helpers.reward_ports([("a", "h", "x"), ("b", "h", "x")], 19500, 19501)
    launch_helpers.reward_ports([("a", "h", "x"), ("b", "g", "y")], 19500, 19501)  # no overlap: both on 19500
    ports = launch_helpers.format_reward_ports({"ci-1": 19500, "ci-2": 19501})
    assert launch_helpers.node_reward_port(ports, "ci-2") == 19501
    with pytest.raises(launch_helpers.LaunchError, match="node 'ci-9' has no reward server port"):
        launch_helpers.node_reward_port(ports, "ci-9")
    with pytest.raises(launch_helpers.LaunchError, match="the port 'x', not a number"):
        launch_helpers.node_reward_port("ci-1:x", "ci-1")


def _stub_scontrol(tmp_path, show_node_fails: bool = False):
    """A scontrol that answers as SLURM 22.05 does for the allocation ci-[1-2],real-7 (or one node, solo-1)."""
    stub = tmp_path / "scontrol"
    show_node = ('  echo "slurm_load_node error: Access/permission denied" >&2; exit 1\n' if show_node_fails else
                 '  echo "NodeName=ci-1 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=vm Port=17001 OS=Linux 6.1 #1 SMP"\n'
                 '  echo "NodeName=ci-2 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=vm Port=17002"\n'
                 '  echo "NodeName=real-7 Arch=x86_64 NodeAddr=10.0.0.7 NodeHostName=real-7"; exit 0\n')
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1 $2 $3" == "show hostnames ci-[1-2],real-7" ]]; then printf "ci-1\\nci-2\\nreal-7\\n"; exit 0; fi\n'
        'if [[ "$1 $2 $3" == "show hostnames solo-1" ]]; then echo solo-1; exit 0; fi\n'
        'if [[ "$1 $2 $3 $4" == "-o show node ci-1,ci-2,real-7" ]]; then\n' + show_node + 'fi\n'
        'echo "unexpected: $*" >&2; exit 1\n')
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "ci-[1-2],real-7"}


def _reward_ports_cli(env) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "slurm/launch_helpers.py", "reward-ports", "--base", "19500", "--master-port", "29500"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_reward_ports_cli_reads_the_allocation_from_scontrol(tmp_path):
    """`reward-ports` on the batch host asks scontrol for the job's nodes and their machines; `reward-port` on a
    node prints its own."""
    env = _stub_scontrol(tmp_path)
    out = _reward_ports_cli(env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "REWARD_PORTS=ci-1:19500,ci-2:19501,real-7:19500"
    ports = out.stdout.strip().split("=", 1)[1]
    for node, want in (("ci-2", "19501"), ("real-7", "19500")):
        got = subprocess.run([PY, "slurm/launch_helpers.py", "reward-port"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=60, env={**env, "REWARD_PORTS": ports, "SLURMD_NODENAME": node})
        assert got.returncode == 0 and got.stdout.strip() == want, got.stderr
    # One node: its name is all it takes (no `scontrol show node`, which the stub would refuse).
    out = _reward_ports_cli({**env, "SLURM_JOB_NODELIST": "solo-1"})
    assert out.returncode == 0 and out.stdout.strip() == "REWARD_PORTS=solo-1:19500" and not out.stderr, out.stderr
    # A site that hides its nodes: a warning, and distinct ports (always safe).
    out = _reward_ports_cli(_stub_scontrol(tmp_path, show_node_fails=True))
    assert out.returncode == 0 and out.stdout.strip() == "REWARD_PORTS=ci-1:19500,ci-2:19501,real-7:19502"
    assert "warning: scontrol -o show node ci-1,ci-2,real-7 failed (slurm_load_node error" in out.stderr
    # Outside SLURM (no scontrol answer): one line, no traceback.
    broken = _reward_ports_cli({**env, "SLURM_JOB_NODELIST": "nope-[1-2]"})
    assert broken.returncode == 2 and broken.stderr.startswith("error: scontrol show hostnames nope-[1-2] failed")
    assert "Traceback" not in broken.stderr
