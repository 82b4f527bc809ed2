"""The SLURM templates end to end: real `sbatch` jobs on the CI cluster (two nodes on one machine) (the templates' parts without a
cluster are tested in test_templates.py, test_launch_helpers.py, test_run_stage.py and test_task.py).

The cluster comes from `.ci/slurm_cluster.sh` (idempotent: the fixture runs it unless both nodes already answer).
Jobs run the tiny models on the CPU (DETOX_CPU=1, --gpus-per-node=0), each with a --time limit; a job that runs
too long is cancelled at once, and every job a test submitted is cancelled at the end if it is still queued or
running.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import EXTENDED, REPO_ROOT

TEMPLATES = {stage: REPO_ROOT / f"slurm/{stage}.sbatch" for stage in ("sft", "ppo", "eval")}
PY = sys.executable

# Tiny PPO (a fraction of a second a step here); the same settings for the uninterrupted and preempted runs.
PPO_STEPS = 30  # the stop signal lands after step 2: plenty of steps left even on a fast machine
PPO_ARGS = [
    "--config", "configs/tiny.yaml", "--ppo.steps", str(PPO_STEPS), "--ppo.save_every_steps", "5",
    "--ppo.batch_size", "4", "--ppo.mini_batch_size", "2", "--rollout.batch_size", "4",
    "--rollout.max_new_tokens", "8", "--data.max_examples", "200",
]
JOB_TIMEOUT_S = 240  # running time; a job may wait up to PENDING_TIMEOUT_S more for the nodes first
PENDING_TIMEOUT_S = 300
NODES = ("detox-ci-1", "detox-ci-2")


def _sh(*cmd: str, timeout: float = 60) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def _job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


@pytest.fixture(scope="module")
def cluster():
    """The CI cluster (two nodes on this machine), started by .ci/slurm_cluster.sh unless both nodes answer
    already (an older one-node cluster is restarted as two); cancels the jobs the tests submitted."""
    if set(_responding_nodes()) != set(NODES):
        started = subprocess.run(["bash", str(REPO_ROOT / ".ci/slurm_cluster.sh")], capture_output=True, text=True,
                                 timeout=600)
        assert started.returncode == 0, f".ci/slurm_cluster.sh failed:\n{started.stderr[-3000:]}"
    submitted: list[str] = []
    yield submitted
    for job_id in submitted:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def _responding_nodes() -> list[str]:
    """The cluster's nodes that accept jobs (idle, mixed or allocated), or [] without a cluster."""
    try:
        out = subprocess.run(["sinfo", "--noheader", "--Node", "--responding", "--format=%N %t"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split()[0] for line in out.stdout.splitlines()
            if out.returncode == 0 and len(line.split()) == 2 and line.split()[1] in ("idle", "mix", "alloc")]


def _sbatch(cluster: list[str], template: str, log_dir: Path, args: list[str], *sbatch_opts: str, **env_vars: str) -> str:
    env = {**os.environ, "DETOX_CPU": "1", "PYTHON": PY, **env_vars}
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--time=10", "--signal=B:USR1@30",
           f"--output={log_dir}/%x-%j.out", *sbatch_opts, str(TEMPLATES[template]), *args]
    job_id = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
                            check=True).stdout.strip()
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


def _wait_ended(job_id: str, log: Path) -> str:
    """The job's final state; the running time counts from its start (not its submission), and a job that runs too
    long is cancelled at once so that it does not hold the nodes for the next tests."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    _wait_for(lambda: _job_field(job_id, "JobState") != "PENDING", f"job {job_id} to start", PENDING_TIMEOUT_S)
    try:
        return _wait_for(lambda: (s := _job_field(job_id, "JobState")) in ended and s, f"job {job_id}")
    except AssertionError as exc:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        raise AssertionError(f"{exc}; cancelled it. Log:\n{log.read_text()[-4000:] if log.exists() else ''}") from None


def _wait_done(job_id: str, log: Path) -> str:
    state = _wait_ended(job_id, log)
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log.read_text()[-4000:] if log.exists() else ''}"
    return state


def _log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def ppo_run(cluster, tiny_artifacts, tmp_path_factory):
    """An uninterrupted PPO job with its reward server step: the uninterrupted run the preemption test compares with."""
    work = tmp_path_factory.mktemp("slurm_ppo")
    job_id = _sbatch(cluster, "ppo", work, [*PPO_ARGS, "--output_dir", str(work / "run")], "--cpus-per-task=2")
    log = work / f"detox-ppo-{job_id}.out"
    _wait_done(job_id, log)
    return work, job_id, log


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory):
    """The same PPO job on two nodes (`sbatch --nodes=2`, one training process each), with the debug hook on."""
    work = tmp_path_factory.mktemp("slurm_ppo_two_nodes")
    args = [*PPO_ARGS, "--output_dir", str(work / "run"), "--debug_dir", str(work / "debug")]
    job_id = _sbatch(cluster, "ppo", work, args, "--nodes=2", "--cpus-per-task=1")
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


def test_eval_through_sbatch_on_two_nodes_equals_one_process(cluster, ppo_run, tmp_path):
    """Two nodes, one evaluation process each: accelerate's rendezvous comes from SLURM's variables, the launch
    settings from the CPU accelerate config; every summary, score and metric equals a one-process evaluation's."""
    work, _, _ = ppo_run
    out_dir = tmp_path / "eval_run"
    common = ["--config", "configs/tiny.yaml", "--eval.systems", f"base,ppo={work / 'run/ppo/adapter'}",
              "--eval.max_examples", "7", "--eval.bootstrap_samples", "50", "--eval.torch_threads", "1",
              "--eval.generation.max_new_tokens", "8", "--eval.generation.batch_size", "2"]
    # 7 examples in batches of 2: batches 0 and 2 (4 examples) on the first node, 1 and 3 (3 examples) on the second
    job_id = _sbatch(cluster, "eval", tmp_path, [*common, "--output_dir", str(out_dir)], "--nodes=2",
                     "--cpus-per-task=1", ACCELERATE_CONFIG="accelerate_configs/cpu_2proc.yaml")
    log = tmp_path / f"detox-eval-{job_id}.out"
    _wait_done(job_id, log)
    text = log.read_text()
    rendezvous = re.findall(r"task (\d)/2 on (\S+): 1 process\(es\), rendezvous (\S+),", text)
    assert sorted(r[:2] for r in rendezvous) == [("0", "detox-ci-1"), ("1", "detox-ci-2")], rendezvous
    assert len({r[2] for r in rendezvous}) == 1
    assert "accelerate config accelerate_configs/cpu_2proc.yaml" in text
    shares = dict(re.findall(r"process (\d)/2: (\d+) of the examples", text))  # each node evaluated its own share
    assert shares == {"0": "4", "1": "3"}, shares
    summary = json.loads((out_dir / "eval/summary.json").read_text())
    assert summary["throughput"]["num_processes"] == 2 and summary["num_examples"] == 7
    examples = _log_lines(out_dir / "eval/examples.jsonl")
    assert len(examples) == 7 and len({e["id"] for e in examples}) == 7
    assert all(set(e["systems"]) == {"base", "ppo"} for e in examples)
    assert (out_dir / "eval/report.md").is_file()
    # The same evaluation in one process, here.
    single_dir = tmp_path / "eval_single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([PY, "-m", "eval.evaluate", *common, "--output_dir", str(single_dir)], cwd=REPO_ROOT, env=env,
                   capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=True)
    assert _log_lines(single_dir / "eval/examples.jsonl") == examples
    single = json.loads((single_dir / "eval/summary.json").read_text())
    assert single["throughput"]["num_processes"] == 1 and single["metrics"] == summary["metrics"]


@pytest.mark.parametrize("nodes", [pytest.param(1, marks=EXTENDED), 2])  # one node: the same path, in test-extended
def test_preempted_ppo_job_is_requeued_and_resumes(cluster, request, tmp_path, nodes):
    """SIGUSR1 mid-run (as --signal=B:USR1 sends it before the time limit): checkpoint, requeue, --resume, and
    the same steps and statistics as the uninterrupted run; on one node and across two."""
    uninterrupted_dir, _, _ = request.getfixturevalue("ppo_run" if nodes == 1 else "two_node_run")
    run = tmp_path / "run"
    placement = ["--cpus-per-task=2"] if nodes == 1 else ["--nodes=2", "--cpus-per-task=1"]
    job_id = _sbatch(cluster, "ppo", tmp_path, [*PPO_ARGS, "--output_dir", str(run)], *placement)
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
    steps, uninterrupted = _log_lines(run / "ppo/log.jsonl"), _log_lines(uninterrupted_dir / "run/ppo/log.jsonl")
    assert [s["step"] for s in steps] == [s["step"] for s in uninterrupted] == list(range(1, PPO_STEPS + 1))
    for got, want in zip(steps, uninterrupted):
        for key, value in want.items():
            if not key.startswith("time/") and isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], key)
    assert (run / "ppo/adapter/adapter_model.safetensors").is_file()


def test_ppo_on_two_nodes_shards_the_batch_and_each_node_scores_on_its_own_reward_server(two_node_run):
    """`sbatch --nodes=2`: one training process per node, rendezvous on the first node, the global batch sharded over
    both, identical weights after every step, and each node's trainer scoring on its own node's reward server."""
    work, job_id, log = two_node_run
    debug = work / "debug"
    text = log.read_text()
    tasks = re.findall(r"task (\d)/2 on (\S+): 1 process\(es\), rendezvous (\S+),", text)
    assert sorted(tasks) == [("0", "detox-ci-1", "detox-ci-1:" + tasks[0][2].split(":")[1]),
                             ("1", "detox-ci-2", "detox-ci-1:" + tasks[0][2].split(":")[1])], tasks
    # Both nodes trained: each rank its own half of every global batch, the same weights after every step.
    ranks = [_log_lines(debug / f"rank{r}.jsonl") for r in range(2)]
    assert [len(r) for r in ranks] == [PPO_STEPS, PPO_STEPS]
    for a, b in zip(*ranks):
        assert len(a["example_ids"]) == len(b["example_ids"]) == 2 and not set(a["example_ids"]) & set(b["example_ids"])
        assert a["params_sha256"] == b["params_sha256"]
    # One reward server per node, each on its own port (the two nodes share this host: REWARD_PORT and REWARD_PORT
    # + 1; one port for both would have failed to bind), each node's trainer on its own node's, and both scored.
    listed = re.search(r"reward server step, ports (detox-ci-1:\d+,detox-ci-2:\d+)", text)
    assert listed, text[-3000:]
    ports = dict(item.split(":") for item in listed.group(1).split(","))
    assert int(ports["detox-ci-2"]) == int(ports["detox-ci-1"]) + 1, ports
    trainer_urls = dict(re.findall(r"task \d/2 on (\S+): .* reward server http://127\.0\.0\.1:(\d+)", text))
    assert trainer_urls == ports, (trainer_urls, ports)
    scored = set(re.findall(r"POST http://127\.0\.0\.1:(\d+)/score \"HTTP/1\.1 200 OK\"", text))
    assert scored == set(ports.values()), scored
    server_logs = sorted(work.glob(f"detox-ppo-{job_id}.reward-*.out"))
    assert len(server_logs) == 2
    for server_log in server_logs:
        served = server_log.read_text()
        assert "rewards.server:" in served and "address already in use" not in served, server_log.name


def _free_port_with_next_taken() -> tuple[int, socket.socket]:
    """A free port P whose next port P + 1 is held by a listening socket (returned: close it when done)."""
    for base in range(15000, 16000, 2):
        probe, blocker = socket.socket(), socket.socket()
        try:
            probe.bind(("127.0.0.1", base))
            blocker.bind(("127.0.0.1", base + 1))
            blocker.listen()
            probe.close()
            return base, blocker
        except OSError:
            probe.close()
            blocker.close()
    raise AssertionError("no free port pair in 15000..15999")


def test_a_reward_server_that_fails_on_the_second_node_fails_the_job_at_once(cluster, tmp_path):
    """The second node's server cannot bind its port: the job fails at once with one clear line, before any training
    step starts, instead of that node waiting HEALTH_TIMEOUT while the first waits for it in the rendezvous."""
    base, blocker = _free_port_with_next_taken()
    try:
        job_id = _sbatch(cluster, "ppo", tmp_path, [*PPO_ARGS, "--output_dir", str(tmp_path / "run")], "--nodes=2",
                         "--cpus-per-task=1", REWARD_PORT=str(base), HEALTH_TIMEOUT="600")
        log = tmp_path / f"detox-ppo-{job_id}.out"
        state = _wait_ended(job_id, log)  # within JOB_TIMEOUT_S (240 s), far below HEALTH_TIMEOUT
    finally:
        blocker.close()
    text = log.read_text()
    assert state == "FAILED", text[-3000:]
    assert f"ports detox-ci-1:{base},detox-ci-2:{base + 1}" in text
    assert re.search(r"the reward server step ended \(status \d+\) before every node.s server answered", text)
    assert not re.search(r"task \d/2 on", text), "no training step may start"
    [second] = tmp_path.glob(f"detox-ppo-{job_id}.reward-*-1.out")  # node index 1
    assert "address already in use" in second.read_text()


def test_a_stop_signal_while_waiting_for_the_reward_server_stops_before_training(cluster, tmp_path):
    """SIGUSR1 (the time-limit warning) while the reward server is still loading: the job stops there with status 3,
    not requeued (a new run would stop the same way), rather than losing the signal and starting a training step it
    cannot finish."""
    slow = tmp_path / "python"  # an interpreter whose reward server takes 5 minutes to start
    slow.write_text(f'#!/usr/bin/env bash\nif [[ "$1 $2" == "-m rewards.server" ]]; then sleep 300; fi\nexec {PY} "$@"\n')
    slow.chmod(0o755)
    job_id = _sbatch(cluster, "ppo", tmp_path, [*PPO_ARGS, "--output_dir", str(tmp_path / "run")], "--cpus-per-task=1",
                     PYTHON=str(slow), HEALTH_TIMEOUT="600")
    log = tmp_path / f"detox-ppo-{job_id}.out"
    _wait_for(lambda: log.exists() and "starting the reward server step" in log.read_text(), "the reward server step")
    time.sleep(2)
    _sh("scancel", "--batch", "--signal=USR1", job_id)
    state = _wait_ended(job_id, log)
    text = log.read_text()
    assert state == "FAILED" and _job_field(job_id, "ExitCode") == "3:0", (state, text[-3000:])
    assert "received SIGUSR1" in text and "ppo got SIGUSR1 before training started (nothing to checkpoint" in text
    assert _job_field(job_id, "Restarts") == "0"
    assert not re.search(r"task \d/1 on", text), "no training step may start"


def test_sft_on_two_nodes_shards_the_batch_and_keeps_the_weights_identical(cluster, tmp_path):
    """Submitted as sites that want a clean job environment do (`--export` of two variables only, which the job's
    srun steps inherit unless told otherwise): the template's own settings still reach every step."""
    debug, out = tmp_path / "debug", tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", "--output_dir", str(out), "--debug_dir", str(debug), "--sft.max_steps", "4",
            "--sft.batch_size", "4", "--sft.eval_every_steps", "100", "--sft.save_every_steps", "100",
            "--sft.eval_rouge_examples", "0", "--data.max_examples", "200"]
    job_id = _sbatch(cluster, "sft", tmp_path, args, "--nodes=2", "--cpus-per-task=1", f"--export=DETOX_CPU=1,PYTHON={PY}")
    log = tmp_path / f"detox-sft-{job_id}.out"
    _wait_done(job_id, log)
    tasks = re.findall(r"task (\d)/2 on (\S+): 1 process\(es\)", log.read_text())
    assert sorted(tasks) == [("0", "detox-ci-1"), ("1", "detox-ci-2")], tasks
    ranks = [_log_lines(debug / f"rank{r}.jsonl") for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]  # both nodes trained every step
    for a, b in zip(*ranks):
        assert len(a["example_ids"]) == len(b["example_ids"]) == 2 and not set(a["example_ids"]) & set(b["example_ids"])
        assert a["params_sha256"] == b["params_sha256"]
    assert len({r["params_sha256"] for r in ranks[0]}) == 4
    assert (out / "sft/adapter/adapter_model.safetensors").is_file()


def test_the_ppo_update_on_two_nodes_equals_one_process(cluster, tiny_artifacts, tmp_path):
    """The PPO engine's invariant across nodes: tests/ppo_update_worker.py (fixed global batch, three RLOO updates)
    launched by the templates' per-node launcher (slurm/task.sh, one process per node, rendezvous on the first node)
    gives the weights and statistics of one process, to 1e-5."""
    import ppo_update_worker
    from safetensors.torch import load_file

    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    ppo_update_worker.run(str(tiny_artifacts.t5), single, None, 1, None, "rloo")
    script = tmp_path / "update.sbatch"
    script.write_text(
        "#!/usr/bin/env bash\nset -euo pipefail\n"
        f"export REPO={REPO_ROOT} PYTHON={PY} DETOX_CPU=1 PROCS_PER_MACHINE=1 ACCELERATE_CONFIG= ACCELERATE_ARGS= \\\n"
        "    REWARD_SERVER=0 RESERVE_REWARD_GPU=0 REWARD_PORT=0 HEALTH_TIMEOUT=5 OMP_NUM_THREADS=1 \\\n"
        f"    PYTHONPATH={REPO_ROOT / 'tests'}\n"
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"\n'
        "export MASTER_PORT=$((29500 + SLURM_JOB_ID % 10000))\n"
        f"srun --kill-on-bad-exit=1 bash slurm/task.sh ppo_update_worker --t5 {tiny_artifacts.t5} --out {double} "
        "--estimator rloo\n")
    job_id = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                             "--time=10", f"--output={tmp_path}/update-%j.out", str(script)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    cluster.append(job_id)
    log = tmp_path / f"update-{job_id}.out"
    _wait_done(job_id, log)
    tasks = re.findall(r"task (\d)/2 on (\S+): 1 process\(es\)", log.read_text())
    assert sorted(tasks) == [("0", "detox-ci-1"), ("1", "detox-ci-2")], tasks
    got, want = (json.loads((d / "stats.json").read_text()) for d in (double, single))
    assert (got["world_size"], want["world_size"]) == (2, 1)
    for a, b in zip(got["steps"], want["steps"], strict=True):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    for step in range(len(want["steps"]) + 1):
        a, b = (load_file(str(d / f"weights-{step}.safetensors")) for d in (double, single))
        assert a.keys() == b.keys()
        for name in b:
            assert (a[name] - b[name]).abs().max() <= 1e-5, (step, name)
