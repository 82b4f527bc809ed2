"""LoRA SFT on N processes computes the 1-process update on the same global batches (token-weighted loss).

The tiny T5 is copied with dropout 0 (and LoRA dropout 0), so training is deterministic; the same 32 examples in
global batches of 8 go through 1 process, DDP on 2 and 4, and DeepSpeed ZeRO-2 on 2 and 4 (one case with
gradient accumulation). The adapters after the same steps must agree to 1e-5, and they must have moved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import EXTENDED, REPO_ROOT, launcher

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def dropout_free_t5(tiny_artifacts, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("t5-no-dropout") / "t5"
    shutil.copytree(tiny_artifacts.t5, target)
    config = json.loads((target / "config.json").read_text())
    config["dropout_rate"] = 0.0
    (target / "config.json").write_text(json.dumps(config))
    return target


def _args(tiny, t5: Path, out: Path, accumulation: int) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "configs/tiny.yaml"), "--output_dir", str(out), "--data.path", str(tiny.dialogsum),
        "--model.name_or_path", str(t5), "--data.max_examples", "32", "--sft.batch_size", "8",
        "--sft.gradient_accumulation_steps", str(accumulation), "--sft.max_steps", "4", "--sft.learning_rate", "2e-3",
        "--sft.eval_rouge_examples", "0", "--sft.eval_every_steps", "100", "--sft.save_every_steps", "100",
        "--lora.target_modules", "q,v", "--lora.r", "8", "--lora.alpha", "8", "--lora.dropout", "0",
    ]


def _run(tiny, t5: Path, out: Path, backend: str, processes: int, accumulation: int) -> subprocess.CompletedProcess:
    command = [sys.executable] if processes == 1 else launcher(backend, processes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*command, "-m", "train.sft", *_args(tiny, t5, out, accumulation)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "sft" / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process_runs(tiny_artifacts, dropout_free_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-one-process")
    found = {}
    for accumulation in (1, 2):
        _run(tiny_artifacts, dropout_free_t5, root / f"acc{accumulation}", "plain", 1, accumulation)
        found[accumulation] = root / f"acc{accumulation}"
    return found


# ZeRO-2 on 4 processes: the same sharding as DDP's 4 and ZeRO-2's 2 (in `make test-extended` only).
CASES = [("ddp", 2, 1), ("ddp", 4, 1), ("zero2", 2, 1), pytest.param("zero2", 4, 1, marks=EXTENDED), ("ddp", 2, 2)]


def _case_id(case) -> str:
    backend, processes, accumulation = getattr(case, "values", case)
    return f"{backend}-{processes}proc" + ("-accumulate" if accumulation > 1 else "")


@pytest.mark.parametrize("backend,processes,accumulation", CASES, ids=[_case_id(c) for c in CASES])
def test_n_processes_compute_the_one_process_update(one_process_runs, tiny_artifacts, dropout_free_t5, tmp_path, backend,
                                                    processes, accumulation):
    _run(tiny_artifacts, dropout_free_t5, tmp_path, backend, processes, accumulation)
    expected, got = _adapter(one_process_runs[accumulation]), _adapter(tmp_path)
    assert expected.keys() == got.keys()
    assert any(t.abs().max() > 1e-3 for n, t in expected.items() if "lora_B" in n)  # trained (B starts at 0)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=TOLERANCE, msg=lambda m: f"{name}: {m}")
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    one_process_metrics = json.loads((one_process_runs[accumulation] / "sft" / "metrics.json").read_text())
    assert metrics["num_processes"] == processes and metrics["steps"] == one_process_metrics["steps"] == 4
    assert metrics["final_eval"]["eval/loss"] == pytest.approx(one_process_metrics["final_eval"]["eval/loss"], rel=1e-5)
    train_loss = [r["train/loss"] for r in map(json.loads, (tmp_path / "sft/log.jsonl").read_text().splitlines())
                  if "train/loss" in r]
    one_process_loss = [r["train/loss"] for r in
                      map(json.loads, (one_process_runs[accumulation] / "sft/log.jsonl").read_text().splitlines())
                      if "train/loss" in r]
    assert train_loss == pytest.approx(one_process_loss, rel=1e-5) and train_loss
