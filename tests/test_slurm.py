"""SLURM templates: their helpers and rendezvous logic, then real `sbatch` jobs on the one-node CI cluster.

The cluster comes from `.ci/slurm_cluster.sh` (idempotent: the fixture starts it when `scontrol ping` does not
answer). Jobs run the tiny models on the CPU (DETOX_CPU=1, --gpus-per-node=0), each with a --time limit, and
every job a test submits is cancelled at the end if it is still queued or running.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards.server import parse_args as reward_server_parse_args
from train.config import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slurm"))
import launch_helpers  # noqa: E402  (slurm/ is not a package: the templates run it as a file)

TEMPLATES = {"sft": REPO / "slurm/sft.sbatch", "ppo": REPO / "slurm/ppo.sbatch", "eval": REPO / "slurm/eval.sbatch"}
PY = sys.executable

# Tiny PPO (a fraction of a second a step here); the same settings for the uninterrupted and preempted runs.
PPO_STEPS = 30  # the stop signal lands after step 2: plenty of steps left even on a fast machine
PPO_ARGS = [
    "--config", "configs/tiny.yaml", "--ppo.steps", str(PPO_STEPS), "--ppo.save_every_steps", "5",
    "--ppo.batch_size", "4", "--ppo.mini_batch_size", "2", "--rollout.batch_size", "4",
    "--rollout.max_new_tokens", "8", "--data.max_examples", "200",
]
JOB_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------------------
# Templates and helpers, no cluster needed


@pytest.mark.parametrize("stage", sorted(TEMPLATES))
def test_template_help_documents_the_knobs(stage: str):
    path = TEMPLATES[stage]
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for knob in ("#SBATCH --nodes", "#SBATCH --gpus-per-node", "#SBATCH --time", "#SBATCH --signal",
                 "#SBATCH --requeue", "#SBATCH --output=%x-%j.out", "DETOX_CPU", "ACCELERATE_CONFIG", "MASTER_PORT"):
        assert knob in out.stdout, f"{path.name} --help does not mention {knob}"
    if stage != "sft":
        for knob in ("RESERVE_REWARD_GPU", "REWARD_SERVER", "HEALTH_TIMEOUT"):
            assert knob in out.stdout
    # The #SBATCH lines must precede the first command, or sbatch ignores them.
    lines = path.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    no_args = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30)
    assert no_args.returncode == 2 and "--config" in no_args.stderr


def test_shell_files_parse():
    for path in [*TEMPLATES.values(), REPO / "slurm/common.sh", REPO / "slurm/task.sh", REPO / ".ci/slurm_cluster.sh"]:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{path}: {result.stderr}"


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
    cfg = load_config(REPO / "configs/tiny.yaml", ["--reward.batch_size", "7"])
    server = reward_server_parse_args(shlex.split(plan["REWARD_SERVER_ARGS"]))
    assert server.reward == dataclasses.replace(cfg.reward, device="cuda:0", text="prompt_and_summary")
    assert server.reward_server == cfg.reward_server
    args = ["--config", "configs/tiny.yaml", "--reward_server.max_queue", "9", "--reward.max_length", "33"]
    server = reward_server_parse_args(shlex.split(launch_helpers.plan("ppo", 1, 1, args, "cpu")["REWARD_SERVER_ARGS"]))
    assert (server.reward_server.max_queue, server.reward.max_length, server.reward.device) == (9, 33, "cpu")
    # 3 processes cannot share PPO's global batch of 16 / mini-batch of 4: one clear error before any model loads.
    with pytest.raises(launch_helpers.LaunchError, match="multiples of the 3 training processes"):
        launch_helpers.plan("ppo", 3, 1, ["--config", "configs/tiny.yaml"], "cpu")
    with pytest.raises(launch_helpers.LaunchError, match=r"sft.batch_size \(8\) is global .* 3 training processes"):
        launch_helpers.plan("sft", 3, 1, ["--config", "configs/tiny.yaml"], "cpu")  # SFT batches are global too
    launch_helpers.plan("sft", 2, 2, ["--config", "configs/tiny.yaml"], "cpu")
    cli = subprocess.run([PY, "slurm/launch_helpers.py", "plan", "--stage", "ppo", "--", "--config", "nope.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.startswith("error: config file not found: nope.yaml")
    assert "Traceback" not in cli.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args):
        pass


@pytest.fixture()
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


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


@pytest.mark.parametrize("code, marked", [(3, True), (0, False), (1, False)])
def test_run_stage_marks_preemption_only(tmp_path: Path, code: int, marked: bool):
    (tmp_path / "fake_stage.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print(' '.join(sys.argv[1:]))\n"
        f"    raise SystemExit({code})\n"
    )
    marker = tmp_path / "out" / ".slurm" / "42.preempted"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DETOX_PREEMPTED_MARKER": str(marker)}
    out = subprocess.run([PY, "slurm/run_stage.py", "fake_stage", "--config", "x.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == code and out.stdout.strip() == "--config x.yaml"
    assert marker.exists() == marked


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
    base = {"REPO": str(REPO), "PYTHON": str(_fake_python(tmp_path)), "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "29555", "DETOX_CPU": "0", "PROCS_PER_MACHINE": "1",
            "RESERVE_REWARD_GPU": "1", "REWARD_SERVER": "0", "REWARD_PORT": "1", "HEALTH_TIMEOUT": "5",
            "ACCELERATE_CONFIG": "accelerate_configs/multi_node_zero3.yaml", "ACCELERATE_ARGS": ""}
    full_env = {**os.environ, **base, **env}
    out = subprocess.run(["bash", "slurm/task.sh", "train.ppo", "--config", "configs/tiny.yaml"], cwd=REPO,
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


# ----------------------------------------------------------------------------------------------------
# Real sbatch jobs on the one-node cluster


def _sh(*cmd: str, timeout: float = 60) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def _job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


@pytest.fixture(scope="module")
def cluster():
    """The one-node cluster, started by .ci/slurm_cluster.sh when it is not up yet; cancels leftover jobs."""
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30) if _have("scontrol") else None
    if ping is None or ping.returncode != 0:
        started = subprocess.run(["bash", str(REPO / ".ci/slurm_cluster.sh")], capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, f".ci/slurm_cluster.sh failed:\n{started.stderr[-3000:]}"
    submitted: list[str] = []
    yield submitted
    for job_id in submitted:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def _have(cmd: str) -> bool:
    return subprocess.run(["bash", "-c", f"command -v {cmd}"], capture_output=True).returncode == 0


def _sbatch(cluster: list[str], template: str, log_dir: Path, args: list[str], *sbatch_opts: str, **env_vars: str) -> str:
    env = {**os.environ, "DETOX_CPU": "1", "PYTHON": PY, **env_vars}
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--time=10", "--signal=B:USR1@30",
           f"--output={log_dir}/%x-%j.out", *sbatch_opts, str(TEMPLATES[template]), *args]
    job_id = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    cluster.append(job_id)
    return job_id


def _wait_for(predicate, what: str, timeout_s: float = JOB_TIMEOUT_S, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _wait_done(job_id: str, log: Path) -> str:
    state = _wait_for(lambda: (s := _job_field(job_id, "JobState")) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                      "NODE_FAIL", "OUT_OF_MEMORY") and s,
                      f"job {job_id}")
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log.read_text()[-4000:] if log.exists() else ''}"
    return state


def _log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def ppo_run(cluster, tiny_artifacts, tmp_path_factory):
    """An uninterrupted PPO job with its reward server step: the reference for the preemption test."""
    work = tmp_path_factory.mktemp("slurm_ppo")
    job_id = _sbatch(cluster, "ppo", work, [*PPO_ARGS, "--output_dir", str(work / "run")], "--cpus-per-task=2")
    log = work / f"detox-ppo-{job_id}.out"
    _wait_done(job_id, log)
    return work, job_id, log


def test_ppo_through_sbatch_with_reward_server_step(ppo_run):
    work, job_id, log = ppo_run
    text = log.read_text()
    steps = _log_lines(work / "run/ppo/log.jsonl")
    assert [s["step"] for s in steps] == list(range(1, PPO_STEPS + 1))
    for name in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors"):
        assert (work / "run/ppo/adapter" / name).is_file()
    # The server was its own step, healthy before training started, and the trainer scored through it.
    server_logs = list(work.glob(f"detox-ppo-{job_id}.reward-*.out"))
    assert len(server_logs) == 1 and "rewards.server:" in server_logs[0].read_text()
    assert text.index("reward server healthy") < text.index("task 0/1")
    assert re.search(r"POST http://127\.0\.0\.1:\d+/score \"HTTP/1\.1 200 OK\"", text)
    assert "ppo finished" in text and _job_field(job_id, "Restarts") == "0"


def test_eval_through_sbatch_on_two_machines(cluster, ppo_run, tmp_path):
    """Two tasks on this node act as two machines: accelerate's rendezvous comes from SLURM's variables, the
    launch settings from the CPU accelerate config (one process per machine)."""
    work, _, _ = ppo_run
    out_dir = tmp_path / "eval_run"
    args = ["--config", "configs/tiny.yaml", "--output_dir", str(out_dir),
            "--eval.systems", f"base,ppo={work / 'run/ppo/adapter'}", "--eval.max_examples", "8",
            "--eval.bootstrap_samples", "50", "--eval.torch_threads", "1", "--eval.generation.max_new_tokens", "8"]
    job_id = _sbatch(cluster, "eval", tmp_path, args, "--ntasks-per-node=2", "--cpus-per-task=1",
                     ACCELERATE_CONFIG="accelerate_configs/cpu_2proc.yaml")
    log = tmp_path / f"detox-eval-{job_id}.out"
    _wait_done(job_id, log)
    text = log.read_text()
    rendezvous = re.findall(r"task (\d)/2 on \S+: 1 process\(es\), rendezvous (\S+),", text)
    assert sorted(r[0] for r in rendezvous) == ["0", "1"] and len({r[1] for r in rendezvous}) == 1
    assert "accelerate config accelerate_configs/cpu_2proc.yaml" in text
    summary = json.loads((out_dir / "eval/summary.json").read_text())
    assert summary["throughput"]["num_processes"] == 2 and summary["num_examples"] == 8
    examples = _log_lines(out_dir / "eval/examples.jsonl")
    assert len(examples) == 8 and len({e["id"] for e in examples}) == 8
    assert all(set(e["systems"]) == {"base", "ppo"} for e in examples)
    assert (out_dir / "eval/report.md").is_file()


def test_preempted_ppo_job_is_requeued_and_resumes(cluster, ppo_run, tmp_path):
    """SIGUSR1 mid-run (as --signal=B:USR1 sends it before the time limit): checkpoint, requeue, --resume, and
    the same steps and statistics as the uninterrupted run."""
    reference_dir, _, _ = ppo_run
    run = tmp_path / "run"
    job_id = _sbatch(cluster, "ppo", tmp_path, [*PPO_ARGS, "--output_dir", str(run)], "--cpus-per-task=2")
    log = tmp_path / f"detox-ppo-{job_id}.out"
    _wait_for(lambda: len(_log_lines(run / "ppo/log.jsonl")) >= 2, "the first PPO steps", interval_s=0.2)
    _sh("scancel", "--batch", "--signal=USR1", job_id)
    # SLURM holds a requeued job for about two minutes (BeginTime); release it now to keep the test short, but only
    # once the first run's slurmstepd processes are gone: released while they were still tearing down, the new run
    # failed to launch (same job id) in about one run in five. SLURM's own hold is what prevents that on a cluster.
    _wait_for(lambda: _job_field(job_id, "Restarts") == "1" and _job_field(job_id, "JobState") == "PENDING",
              "the requeue", interval_s=0.5)
    old_steps = ["pgrep", "-f", rf"slurmstepd: \[{job_id}\."]
    _wait_for(lambda: subprocess.run(old_steps, capture_output=True).returncode == 1, "the first run to leave the node",
              interval_s=0.2)
    _sh("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    _wait_done(job_id, log)

    text = log.read_text()
    assert "received SIGUSR1" in text and "requeueing job" in text
    resumed = re.search(r"resumed from \S+checkpoint-(\d+) at step (\d+)", text)
    assert resumed, text[-4000:]
    assert 1 <= int(resumed.group(2)) < PPO_STEPS, "the signal must land mid-run"
    assert re.search(r"restart 1, .* --resume$", text, re.MULTILINE)
    assert not list((run / ".slurm").glob("*.preempted"))
    steps, reference = _log_lines(run / "ppo/log.jsonl"), _log_lines(reference_dir / "run/ppo/log.jsonl")
    assert [s["step"] for s in steps] == [s["step"] for s in reference] == list(range(1, PPO_STEPS + 1))
    for got, want in zip(steps, reference):
        for key, value in want.items():
            if not key.startswith("time/") and isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], key)
    assert (run / "ppo/adapter/adapter_model.safetensors").is_file()
