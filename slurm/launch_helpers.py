"""Helpers the SLURM templates call, so that the bash stays short and the logic is tested in Python.

    python slurm/launch_helpers.py plan --stage ppo --machines 2 --procs-per-machine 4 -- --config configs/x.yaml ...
    python slurm/launch_helpers.py gpus --role train --reserve-reward 1       # CUDA_VISIBLE_DEVICES for a role
    python slurm/launch_helpers.py reward-ports --base 19500 --master-port 29500   # REWARD_PORTS=node:port,...
    python slurm/launch_helpers.py reward-port                                     # this node's port
    python slurm/launch_helpers.py wait-health http://127.0.0.1:8500/health --timeout 600 --pid 1234

`plan` reads the experiment config exactly as the training script will (train.config.load_config: recipe, then
overrides), checks what can be checked before any model is loaded (e.g. the global batch sizes against the
number of processes) and prints shell assignments (`KEY='value'`) for the template to `eval`. User errors print
one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

# Run as a file (`python slurm/launch_helpers.py`), so the repository root is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.config import SERVED_REWARD_KEYS  # noqa: E402
from train.config import ExperimentConfig, load_config  # noqa: E402
from train.errors import ConfigError, DetoxSumError  # noqa: E402

STAGES = ("sft", "ppo", "eval")
# Stage flags that are not config overrides (load_config would reject them).
STAGE_FLAGS = ("--resume", "--resume-with-changes")


class LaunchError(DetoxSumError):
    """A launch setting that cannot work (e.g. processes that do not divide the batch)."""


# ----------------------------------------------------------------------------------------------------
# plan: settings from the config, checked before the job starts its training step


def split_stage_args(stage_args: Sequence[str]) -> tuple[str, list[str]]:
    """(config path, overrides) from the arguments the template passes to the training script."""
    args = [a for a in stage_args if a not in STAGE_FLAGS]
    config, overrides, i = None, [], 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file, e.g. --config configs/flan_t5_base.yaml")
            config, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            config, i = args[i].split("=", 1)[1], i + 1
        else:
            overrides.append(args[i])
            i += 1
    if config is None:
        raise ConfigError(
            "no --config given: pass the recipe after the template, e.g. "
            "sbatch slurm/ppo.sbatch --config configs/flan_t5_base.yaml"
        )
    return config, overrides


def check_processes(cfg: ExperimentConfig, stage: str, num_processes: int) -> None:
    """SFT's and PPO's batch sizes are global and split evenly across processes; fail now rather than after model
    loading."""
    if num_processes < 1:
        raise LaunchError(f"no training processes: got {num_processes} (are there GPUs left after the reward GPU?)")
    if stage == "sft" and cfg.sft.batch_size % num_processes:
        suggestion = num_processes * max(1, cfg.sft.batch_size // num_processes)
        raise LaunchError(f"sft.batch_size ({cfg.sft.batch_size}) is global and must be a multiple of the {num_processes} "
                          f"training processes: change the GPUs per node or pass e.g. --sft.batch_size {suggestion}")
    if stage != "ppo":
        return
    from train.ppo_core import check_batch_sizes  # imports torch: only the `plan` command needs it

    p, k, n = cfg.ppo, cfg.rollout.samples_per_prompt, num_processes
    try:
        check_batch_sizes(p.batch_size, p.mini_batch_size, p.gradient_accumulation_steps, n, samples_per_prompt=k)
    except ConfigError as exc:
        gpus = "change the GPUs per node (one is kept for the reward model when RESERVE_REWARD_GPU=1) or "
        if k > 1 and p.batch_size % (k * n):
            fix = f"{gpus}pass e.g. --ppo.batch_size {k * n * max(1, p.batch_size // (k * n))}"
        elif p.batch_size % n or p.mini_batch_size % n:
            fix = (f"{gpus}pass e.g. --ppo.mini_batch_size {n} "
                   f"--ppo.batch_size {n * max(1, p.batch_size // p.mini_batch_size)}")
        else:  # mini-batches x accumulation do not divide the batch: the number of processes is not the problem
            step = p.mini_batch_size * p.gradient_accumulation_steps
            fix = f"pass e.g. --ppo.batch_size {step * max(1, p.batch_size // step)}"
        raise LaunchError(f"{exc}: {fix}") from None


def reward_server_args(cfg: ExperimentConfig, device: str) -> list[str]:
    """Overrides for `python -m rewards.server` that serve the classifier the resolved config names, as its
    reward_server section says, on `device`. host and port are left to the template (it appends them)."""
    def value(v: object) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    reward = {**{k: getattr(cfg.reward, k) for k in SERVED_REWARD_KEYS}, "device": device}
    server = {f.name: getattr(cfg.reward_server, f.name) for f in dataclasses.fields(cfg.reward_server)
              if f.name not in ("host", "port")}
    return [token for section, keys in (("reward", reward), ("reward_server", server))
            for key, v in keys.items() for token in (f"--{section}.{key}", value(v))]


def plan(stage: str, machines: int, procs_per_machine: int, stage_args: Sequence[str], reward_device: str) -> dict[str, str]:
    config, overrides = split_stage_args(stage_args)
    cfg = load_config(config, overrides)
    check_processes(cfg, stage, machines * procs_per_machine)
    return {
        "OUTPUT_DIR": cfg.output_dir,
        "NUM_PROCESSES": str(machines * procs_per_machine),
        "REWARD_SERVER_ARGS": shlex.join(reward_server_args(cfg, reward_device)),
        "REWARD_URL_SET": "1" if cfg.reward.url else "0",
    }


# ----------------------------------------------------------------------------------------------------
# gpus: which GPUs train and which one scores


def visible_gpus(env: Optional[dict[str, str]] = None) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES as SLURM set it, else every GPU nvidia-smi lists."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def split_gpus(gpus: Sequence[str], reserve_reward: bool) -> tuple[list[str], list[str]]:
    """(training GPUs, reward GPUs): the last GPU scores when reserved, the others train."""
    if not reserve_reward:
        return list(gpus), []
    if len(gpus) < 2:
        raise LaunchError(
            f"RESERVE_REWARD_GPU=1 needs at least 2 GPUs per node (one for the reward model), found {len(gpus)}: "
            f"request more with --gpus-per-node or set RESERVE_REWARD_GPU=0"
        )
    return list(gpus[:-1]), [gpus[-1]]


# ----------------------------------------------------------------------------------------------------
# reward-ports / reward-port: where each node's reward server listens


def reward_ports(nodes: Sequence[tuple[str, str, str]], base: int, master_port: int) -> dict[str, int]:
    """Port of each node's reward server, from (node name, host name, address) triples in allocation order.

    A node alone on its machine (a real cluster) listens on `base`; nodes that share a machine (the same host name
    or address: several slurmd on one machine, as on the CI cluster) take base, base + 1, ... in allocation order,
    so they do not collide. Ports stay clear of the rendezvous port and within 1024..65535."""
    if not nodes:
        raise LaunchError("no nodes in the allocation (SLURM_JOB_NODELIST is empty)")
    # Machines: the connected groups of nodes linked by a shared host name or address (union-find on those keys).
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(key: tuple[str, str]) -> tuple[str, str]:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for _, host, addr in nodes:
        parent[root(("host", host))] = root(("addr", addr))
    on_machine: dict[tuple[str, str], int] = {}  # nodes numbered so far on each machine
    ports: dict[str, int] = {}
    for name, host, _ in nodes:
        machine = root(("host", host))
        ports[name] = base + on_machine.get(machine, 0)
        on_machine[machine] = on_machine.get(machine, 0) + 1
    low, high = min(ports.values()), max(ports.values())
    if low < 1024 or high > 65535:
        raise LaunchError(f"reward server ports {low}..{high} fall outside 1024..65535: set REWARD_PORT to e.g. 19500")
    if low <= master_port <= high:
        raise LaunchError(f"the reward server ports {low}..{high} include the rendezvous port MASTER_PORT={master_port}: "
                          f"set REWARD_PORT or MASTER_PORT so that they do not overlap")
    return ports


def allocation_nodes(nodelist: str) -> list[tuple[str, str, str]]:
    """(node name, host name, address) of each node of a SLURM node list, in allocation order (scontrol).

    One node needs no more than its name. When `scontrol show node` is not allowed (some sites hide nodes), every
    node counts as sharing one machine: distinct ports are always safe."""
    def scontrol(*args: str) -> str:
        try:
            return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            raise LaunchError(f"scontrol {' '.join(args)} failed ({str(detail).strip()}): run inside a SLURM job") from None

    names = scontrol("show", "hostnames", nodelist).split()
    if len(names) <= 1:
        return [(name, name, name) for name in names]
    try:
        info = scontrol("-o", "show", "node", ",".join(names))
    except LaunchError as exc:
        print(f"warning: {exc}; giving each node its own reward port", file=sys.stderr)
        return [(name, "?", "?") for name in names]
    nodes = {}
    for line in info.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" in fields:
            name = fields["NodeName"]
            nodes[name] = (name, fields.get("NodeHostName", name), fields.get("NodeAddr", name))
    return [nodes.get(name, (name, name, name)) for name in names]


def format_reward_ports(ports: dict[str, int]) -> str:
    return ",".join(f"{name}:{port}" for name, port in ports.items())


def node_reward_port(reward_ports_value: str, node: str) -> int:
    """This node's port from REWARD_PORTS ("node:port,node:port", written by `reward-ports` on the batch host)."""
    for item in reward_ports_value.split(","):
        name, _, port = item.rpartition(":")
        if name == node:
            if not port.isdigit():
                raise LaunchError(f"REWARD_PORTS={reward_ports_value!r} gives node {node!r} the port {port!r}, not a number")
            return int(port)
    raise LaunchError(f"node {node!r} has no reward server port in REWARD_PORTS={reward_ports_value!r}: run the step "
                      f"inside the job the template started (it sets REWARD_PORTS for the job's nodes)")


# ----------------------------------------------------------------------------------------------------
# wait-health: bounded wait for the reward server


def wait_health(url: str, timeout_s: float, pid: Optional[int] = None, interval_s: float = 1.0) -> None:
    """Poll `url` until it answers 200; raise LaunchError at the deadline or when process `pid` has died."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=min(10.0, max(timeout_s, 0.1))) as resp:
                if resp.status == 200:
                    return None
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if pid is not None and not _alive(pid):
            raise LaunchError(f"the reward server (pid {pid}) exited before {url} answered: see its log")
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"the reward server did not answer {url} within {timeout_s:.0f}s (last: {last}): see its log, "
                f"or raise HEALTH_TIMEOUT for a large reward model"
            )
        time.sleep(interval_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------
# command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="slurm/launch_helpers.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="read and check the config; print shell assignments")
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--machines", type=int, default=1)
    p.add_argument("--procs-per-machine", type=int, default=1)
    p.add_argument("--reward-device", default="cpu")
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- then the training script's arguments")
    g = sub.add_parser("gpus", help="print the CUDA_VISIBLE_DEVICES of a role")
    g.add_argument("--role", choices=("train", "reward"), required=True)
    g.add_argument("--reserve-reward", type=int, choices=(0, 1), default=1)
    r = sub.add_parser("reward-ports", help="print REWARD_PORTS=node:port,... for the job's nodes")
    r.add_argument("--base", type=int, required=True, help="REWARD_PORT")
    r.add_argument("--master-port", type=int, required=True)
    r.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST", ""))
    n = sub.add_parser("reward-port", help="print this node's reward server port (from REWARD_PORTS)")
    n.add_argument("--node", default=os.environ.get("SLURMD_NODENAME", ""))
    h = sub.add_parser("wait-health", help="wait (bounded) until a URL answers 200")
    h.add_argument("url")
    h.add_argument("--timeout", type=float, default=600.0)
    h.add_argument("--pid", type=int, default=None, help="give up early when this process has exited")
    args = parser.parse_args(argv)

    try:
        if args.command == "plan":
            stage_args = args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args
            for key, value in plan(args.stage, args.machines, args.procs_per_machine, stage_args,
                                   args.reward_device).items():
                print(f"{key}={shlex.quote(value)}")
        elif args.command == "gpus":
            train, reward = split_gpus(visible_gpus(), bool(args.reserve_reward))
            print(",".join(train if args.role == "train" else reward))
        elif args.command == "reward-ports":
            nodes = allocation_nodes(args.nodelist) if args.nodelist else [("", "", "")]
            print(f"REWARD_PORTS={shlex.quote(format_reward_ports(reward_ports(nodes, args.base, args.master_port)))}")
        elif args.command == "reward-port":
            print(node_reward_port(os.environ.get("REWARD_PORTS", ""), args.node))
        else:
            wait_health(args.url, args.timeout, args.pid)
            print(f"reward server healthy: {args.url}", file=sys.stderr)
    except DetoxSumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
