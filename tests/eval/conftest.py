"""Fixtures of the evaluation tests: a single-process and a 2-process run of eval.evaluate on the same examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval import evaluate as ev
from train.config import load_config
from train.models import Seq2SeqPolicy, ValueHead, apply_lora, load_base_model, save_policy
from helpers import EVAL_ENV, EVAL_RUN_ARGS, free_port


def make_adapters(root: Path) -> dict[str, Path]:
    """An SFT adapter (peft save_pretrained) and a PPO adapter (save_policy, with value head), random LoRA weights."""
    cfg = load_config("configs/tiny.yaml")
    paths = {}
    for seed, name in enumerate(("sft", "ppo")):
        torch.manual_seed(seed)
        model = apply_lora(load_base_model(cfg.model), cfg.lora)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:  # fresh LoRA B is zero, i.e. no change: perturb both factors
                    param.normal_(0.0, 0.3)
        paths[name] = root / name / "adapter"
        if name == "ppo":
            save_policy(Seq2SeqPolicy(model, ValueHead(model.config.d_model)), paths[name])
        else:
            model.save_pretrained(str(paths[name]))
    return paths


@pytest.fixture(scope="session")
def runs(tiny_artifacts, repo_root, tmp_path_factory):
    """(adapters, 1-process output dir, 2-process output dir, in-process summary) for the same 7 examples, shared by
    test_evaluate.py and test_report.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo_root)  # configs/tiny.yaml names the tiny artifacts relative to the repository
        results = _run_both(tmp_path_factory.mktemp("eval"), repo_root)
    return results


def _run_both(root: Path, repo_root: Path):
    adapters = make_adapters(root / "train")
    systems = f"base,sft={adapters['sft']},ppo={adapters['ppo']}"
    ppo_log = root / "log.jsonl"
    ppo_log.write_text("".join(json.dumps({"step": i, "env/reward_mean": 0.1 * i, "objective/kl": 0.02 * i * i}) + "\n"
                               for i in range(1, 11)))
    one, two = root / "one", root / "two"
    threads = torch.get_num_threads()
    summary = ev.main([*EVAL_RUN_ARGS, "--eval.systems", systems, "--output_dir", str(one), "--eval.ppo_log", str(ppo_log)])
    assert torch.get_num_threads() == threads  # eval.torch_threads does not leak into the caller
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "eval.evaluate", *EVAL_RUN_ARGS, "--eval.systems", systems, "--output_dir", str(two),
    ]
    proc = subprocess.run(launch, cwd=repo_root, capture_output=True, text=True, timeout=300, env=EVAL_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return adapters, one, two, summary
