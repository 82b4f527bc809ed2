"""The PPO engine's invariant: on the same global batch, N processes compute the 1-process update.

tests/ppo_update_worker.py runs three PPO steps on a fixed global rollout (one mini-batch; several mini-batches
and epochs with whitened rewards and standardised scores; a ratio guard that skips half of the mini-batches).
Here it runs once in this process (the one-process run) and under `accelerate launch` with 2 and 4 processes (gloo) for
DDP, DeepSpeed ZeRO-2 and ZeRO-3, plus gradient accumulation with clipping under DDP and ZeRO-2, and the critic-free
estimators (RLOO under DDP, GRPO-style group advantages under ZeRO-3: 4 prompts x 2 samples, no value head). Trainable
weights after every step and every logged stat must equal the one-process run to 1e-5.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import EXTENDED, REPO_ROOT, launcher

WORKER = REPO_ROOT / "tests" / "ppo_update_worker.py"
TOLERANCE = 1e-5


def _one_process_run(tiny, out: Path, accumulation: int = 1, max_grad_norm=None, estimator: str = "gae") -> Path:
    import ppo_update_worker

    out.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ppo_update_worker.run(str(tiny.t5), out, None, accumulation, max_grad_norm, estimator)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def one_process_runs(tiny_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo-one-process")
    return {
        (1, None): _one_process_run(tiny_artifacts, root / "plain"),
        (2, 1.0): _one_process_run(tiny_artifacts, root / "accumulated-clipped", 2, 1.0),
        **{estimator: _one_process_run(tiny_artifacts, root / estimator, estimator=estimator)
           for estimator in ("rloo", "group")},
    }


def _launch(tiny, out: Path, backend: str, processes: int, accumulation: int, max_grad_norm,
            estimator: str = "gae") -> None:
    command = [*launcher(backend, processes), str(WORKER), "--t5", str(tiny.t5), "--out", str(out), "--accumulation",
               str(accumulation), "--estimator", estimator]
    if max_grad_norm is not None:
        command += ["--max-grad-norm", str(max_grad_norm)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _results(directory: Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    stats = json.loads((directory / "stats.json").read_text())
    weights = [load_file(str(directory / f"weights-{i}.safetensors")) for i in range(len(stats["steps"]) + 1)]
    return stats, weights


def assert_same_update(got_dir: Path, expected_dir: Path) -> None:
    got, got_weights = _results(got_dir)
    expected, expected_weights = _results(expected_dir)
    assert len(got["steps"]) == len(expected["steps"]) and got["world_size"] > expected["world_size"] == 1
    for step, (a, b) in enumerate(zip(got["steps"], expected["steps"]), 1):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE, abs=TOLERANCE), f"step {step}: {key}"
    for step, (a, b) in enumerate(zip(got_weights, expected_weights)):
        assert a.keys() == b.keys()
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=TOLERANCE, msg=lambda m: f"step {step} {name}: {m}")


def test_the_one_process_run_trains_and_exercises_what_must_be_global(one_process_runs):
    stats, weights = _results(one_process_runs[(1, None)])
    for before, after in zip(weights, weights[1:]):  # every step moved the LoRA matrices and the value head
        moved = [n for n in before if not torch.equal(before[n], after[n])]
        assert any("lora_B" in n for n in moved) and any("value_head" in n for n in moved)
    steps = stats["steps"]
    assert steps[0]["ppo/policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # one mini-batch: ratio exactly 1
    assert all(s["ppo/policy/first_ratio"] == pytest.approx(1.0, abs=1e-6) for s in steps)
    assert [s["ppo/policy/skipped"] for s in steps] == [0.0, 0.0, 0.5]  # a global skip decision is tested
    assert steps[0]["ppo/mean_scores"] == pytest.approx(0.0, abs=1e-6)  # standardised over the global batch
    assert abs(steps[0]["objective/kl"]) > 1e-2  # the adapter makes policy and reference differ


def test_clipping_changes_the_update_so_the_clipped_runs_test_it(one_process_runs, tiny_artifacts, tmp_path):
    # With max_grad_norm 1.0 the weights differ from the unclipped run: the gradient norm is above 1, so a backend
    # that clipped when told not to (DeepSpeed's "auto" = 1.0) would fail the unclipped comparisons below.
    clipped = _one_process_run(tiny_artifacts, tmp_path / "clipped", 1, 1.0)
    unclipped = _results(one_process_runs[(1, None)])[1][-1]
    assert any(not torch.allclose(t, unclipped[n], atol=1e-4) for n, t in _results(clipped)[1][-1].items())


# 4 processes under DeepSpeed: the same sharding as DDP's 4 and DeepSpeed's 2 (in `make test-extended` only).
CASES = [
    ("ddp", 2, 1, None), ("ddp", 4, 1, None),
    ("zero2", 2, 1, None), pytest.param("zero2", 4, 1, None, marks=EXTENDED),
    ("zero3", 2, 1, None), pytest.param("zero3", 4, 1, None, marks=EXTENDED),
    ("ddp", 2, 2, 1.0), ("zero2", 2, 2, 1.0),  # gradient accumulation over mini-batches, clipped
]


def _case_id(case) -> str:
    backend, processes, accumulation, _ = getattr(case, "values", case)
    return f"{backend}-{processes}proc" + ("-accumulate-clip" if accumulation > 1 else "")


@pytest.mark.parametrize("backend,processes,accumulation,max_grad_norm", CASES, ids=[_case_id(c) for c in CASES])
def test_n_processes_compute_the_one_process_update(one_process_runs, tiny_artifacts, tmp_path, backend, processes,
                                                    accumulation, max_grad_norm):
    _launch(tiny_artifacts, tmp_path, backend, processes, accumulation, max_grad_norm)
    assert_same_update(tmp_path, one_process_runs[(accumulation, max_grad_norm)])


@pytest.mark.parametrize("estimator", ["rloo", "group"])
def test_the_critic_free_one_process_runs_train_the_adapter_alone(one_process_runs, estimator):
    stats, weights = _results(one_process_runs[estimator])
    assert not any("value_head" in name for name in weights[0])  # no value head built
    for before, after in zip(weights, weights[1:]):
        assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    steps = stats["steps"]
    assert steps[0]["ppo/policy/skipped"] == steps[1]["ppo/policy/skipped"] == 0.0
    assert 0.0 < steps[2]["ppo/policy/skipped"] < 1.0  # a global skip decision is tested
    assert all(math.isfinite(s["ppo/policy/advantages_mean"]) and "ppo/val/error" not in s for s in steps)
    assert ("ppo/loss/kl" in steps[0]) == (estimator == "group")


@pytest.mark.parametrize("backend,estimator", [("ddp", "rloo"), ("zero3", "group")])
def test_n_processes_compute_the_one_process_critic_free_update(one_process_runs, tiny_artifacts, tmp_path, backend,
                                                                estimator):
    _launch(tiny_artifacts, tmp_path, backend, 2, 1, None, estimator)
    assert_same_update(tmp_path, one_process_runs[estimator])
