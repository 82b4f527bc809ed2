"""The standing GPU check, run by bench/gpu_check.sh on a lent GPU (one H200: a few minutes).

Each step is a subprocess with its own time limit, so a failure costs only its own time and is reported:
1. a flan-t5-base-sized model with random weights (the shipped architecture), saved in bf16 with the tiny tokenizer
   (its ids are valid flan-t5 ids; generated ids beyond it decode to nothing, which only changes what the reward
   model reads);
2. `train.ppo` with the original notebook's recipe (configs/flan_t5_base.yaml: bf16, LoRA r=32 on q,v, value head, batch 16 /
   mini-batch 4, LengthSampler(100, 400)) on that model with the tiny prompts and reward model (on the same GPU),
   4 steps each: one process without DeepSpeed, the same with rollout.compile (static KV cache and compiled decoder
   step; its first step holds the compile), DeepSpeed ZeRO-2 on one process, and a 4-bit base
   (bitsandbytes). From each log.jsonl: the median s/step of steps 2-4, the first mini-batch's ratio (1 up to
   bf16 rounding) and torch.cuda.max_memory_allocated against the planner's estimate for the same settings;
3. `bench/ppo_step_vs_notebook.py --device cuda --model-size base --dtype bfloat16 --steps 1`: s/step against the
   original notebook's one-sample-at-a-time loop;
4. `bench/ppo_vs_trl.py --device cuda --model-size base --dtype bfloat16 --steps 2`: s/step against TRL 0.11.4
   itself (its notebook loop and its batched generate), split into generation, scoring and update.

Writes OUT/gpu_check.md. `--dry-run` runs steps 2-3 on the CPU with the tiny model, to check this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
TINY = REPO_ROOT / "artifacts" / "tiny"


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run(name: str, command: list[str], out: Path, budget: Budget, limit_s: float, env: dict | None = None) -> tuple[bool, str]:
    """Run `command` with at most `limit_s` (and what the budget has left); its output goes to OUT/<name>.log."""
    timeout = min(limit_s, budget.left() - 10)
    if timeout < 20:
        return False, "skipped: out of time"
    started = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        tail = (out / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
        return False, f"exit {proc.returncode}: {tail[0][:160]}"
    return True, f"ok in {time.monotonic() - started:.0f} s"


def random_base_model(target: Path) -> None:
    """flan-t5-base's architecture with random weights in bf16, and the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from train.models import build_from_architecture

    model = build_from_architecture("google/flan-t5-base", device="cpu").to(torch.bfloat16)
    model.save_pretrained(str(target), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(TINY / "t5-dialogsum")).save_pretrained(str(target))


def max_prompt_tokens(model_dir: Path) -> int:
    from train.config import load_config
    from train.data import build_ppo_datasets
    from train.models import load_tokenizer

    cfg = load_config(REPO_ROOT / "configs/flan_t5_base.yaml", ["--data.path", str(TINY / "dialogsum"),
                                                                "--model.name_or_path", str(model_dir)])
    prompts = build_ppo_datasets(cfg.data, load_tokenizer(cfg.model))["train"]
    return max(len(ids) for ids in prompts["input_ids"])


def planner_peak_gib(zero: int, quant: str | None, prompt_len: int, gpu_mem: float) -> float:
    from train import plan

    argv = ["--config", "configs/flan_t5_base.yaml", "--model.name_or_path", "google/flan-t5-base", "--plan.gpus", "1",
            "--plan.zero", str(zero), "--data.max_prompt_tokens", str(prompt_len), "--plan.reward_device", "shared",
            "--plan.gpu_mem_gib", str(gpu_mem)]
    result = plan.main(argv + (["--model.quantization", quant] if quant else []))
    return result.peak / 2**30


def log_figures(log_file: Path) -> dict[str, float]:
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    timed = [r["time/step"] for r in records[1:]] or [records[0]["time/step"]]  # step 1 warms up
    return {
        "steps": len(records),
        "s_per_step": statistics.median(timed),
        "first_step_s": records[0]["time/step"],  # with rollout.compile: the compile
        "first_ratio": records[0]["ppo/policy/first_ratio"],
        "max_allocated_gib": max(r.get("memory/max_allocated_gib", float("nan")) for r in records),
        "reward_mean": records[-1]["env/reward_mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "gpu_check")
    parser.add_argument("--budget-s", type=float, default=470.0, help="stop starting steps after this long")
    parser.add_argument("--dry-run", action="store_true", help="CPU and the tiny model: checks this script")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    lines = []
    if args.dry_run:
        device = "CPU (dry run of the script, tiny model)"
        model_dir = TINY / "t5-dialogsum"
        gpu_mem = 24.0
    else:
        import torch

        assert torch.cuda.is_available(), "no CUDA device: run with --dry-run on a CPU machine"
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
        gpu_mem = props.total_memory / 2**30
        model_dir = out / "flan-t5-base-random"
        started = time.monotonic()
        random_base_model(model_dir)
        lines.append(f"Random flan-t5-base (bf16) written in {time.monotonic() - started:.0f} s.")
    prompt_len = max_prompt_tokens(model_dir)

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "1",
              "--dynamo_backend", "no", "--mixed_precision", "no" if args.dry_run else "bf16"]
    common = ["--config", "configs/flan_t5_base.yaml", "--model.name_or_path", str(model_dir),
              "--data.path", str(TINY / "dialogsum"), "--reward.model_name_or_path", str(TINY / "roberta-hate"),
              "--reward.text", "summary", "--ppo.steps", "4", "--ppo.save_every_steps", "100"]
    if args.dry_run:
        common += ["--model.dtype", "float32", "--ppo.steps", "2", "--rollout.max_new_tokens", "24",
                   "--rollout.max_new_tokens_min", "8"]
    # (name, label, launcher flags, ZeRO stage, quantization, config overrides)
    runs = [("ppo-1proc", "1 process, no DeepSpeed (bf16)", [], 0, None, []),
            ("ppo-compile", "1 process, rollout.compile: static cache + compiled decoding (bf16)", [], 0, None,
             ["--rollout.compile", "true"]),
            ("ppo-zero2", "DeepSpeed ZeRO-2, 1 process (bf16)", ["--use_deepspeed", "--zero_stage", "2"], 2, None, []),
            ("ppo-4bit", "4-bit base (bitsandbytes), 1 process", [], 0, "4bit", [])]
    rows = []
    for name, label, flags, zero, quant, overrides in runs:
        if quant and args.dry_run:
            continue  # bitsandbytes needs CUDA
        extra = (["--model.quantization", quant] if quant else []) + overrides
        ok, status = run(name, [*launch, *flags, "-m", "train.ppo", *common, *extra, "--output_dir", str(out / name)],
                         out, budget, 240, env={"DS_ACCELERATOR": "cpu"} if args.dry_run else None)
        figures = log_figures(out / name / "ppo" / "log.jsonl") if ok else {}
        try:
            planned = planner_peak_gib(zero, quant, prompt_len, gpu_mem)
        except Exception as e:  # noqa: BLE001 - a planner failure is a finding to report, not a reason to stop
            planned, status = float("nan"), f"{status}; planner: {e}"
        rows.append((label.replace(" (bf16)", " (fp32, dry run)") if args.dry_run else label, figures, planned, status))

    lines += ["", f"Device: {device}. The original notebook's recipe on the random model, tiny prompts (longest {prompt_len} "
              "tokens) and tiny reward model on the same GPU; s/step is the median of steps 2-4.", "",
              "| run | s/step | first step s | first mini-batch ratio | max allocated (GiB) | planner peak (GiB) | status |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for label, f, planned, status in rows:
        cells = ([f"{f['s_per_step']:.2f}", f"{f['first_step_s']:.1f}", f"{f['first_ratio']:.6f}",
                  f"{f['max_allocated_gib']:.2f}"] if f else ["-"] * 4)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {planned:.2f} | {status} |")

    notebook = ["--device", "cpu"] if args.dry_run else ["--device", "cuda", "--model-size", "base", "--dtype", "bfloat16"]
    ok, status = run("notebook", [sys.executable, "bench/ppo_step_vs_notebook.py", *notebook, "--steps", "1"],
                     out, budget, 300)
    lines += ["", f"`bench/ppo_step_vs_notebook.py {' '.join(notebook)} --steps 1`: {status}"]
    if ok:
        results = [line for line in (out / "notebook.log").read_text().splitlines() if "s/step" in line]
        lines += ["", "```", *results, "```"]
    trl = ["--device", "cpu", "--steps", "1"] if args.dry_run else [
        "--device", "cuda", "--model-size", "base", "--dtype", "bfloat16", "--steps", "2"]
    ok, status = run("trl", [sys.executable, "bench/ppo_vs_trl.py", *trl], out, budget, 240)
    lines += ["", f"`bench/ppo_vs_trl.py {' '.join(trl)}`: {status}"]
    if ok:
        results = [line for line in (out / "trl.log").read_text().splitlines() if line.startswith("|") or "faster" in line]
        lines += ["", *results]
    report = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
