"""Evaluation throughput (examples/s) of `eval.evaluate` with 1 and 2 processes on the CPU.

    python bench/eval_throughput.py [--examples 100] [--repeats 3] [--append bench/RESULTS.md]

Each run evaluates the same examples with three systems (base, and two LoRA adapters with random weights
created here, standing in for SFT and PPO) on the tiny default (`configs/tiny.yaml`: a greedy summary per prompt,
scored by the reward model and the held-out judge), without and with k summaries sampled per prompt
(`eval.samples_per_prompt`, `--samples-per-prompt`, default 4). The figure is the `throughput.examples_per_second`
that eval.evaluate records in summary.json: generation, scoring by every judge, ROUGE and gathering, excluding
process start-up and model loading (shown separately as wall time).
The 2-process runs use `accelerate launch --multi_gpu --num_processes 2` (gloo). Every run's examples.jsonl is
compared with the first run's (the table says whether they were identical). Prints a Markdown table; --append also writes it, with the machine,
versions, date and command, into a results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from train.config import load_config  # noqa: E402
from train.models import apply_lora, load_base_model  # noqa: E402
from machine import machine_line, versions_line  # bench/machine.py

RESULTS_HEADER = "# Benchmark results\n\nBenchmark results. Every figure names the command that produced it, the machine and the date.\n"


def make_random_adapters(root: Path, config: Path) -> dict[str, Path]:
    """Two LoRA adapters with random (non-zero) weights, so the three systems generate different text."""
    cfg = load_config(config)
    paths = {}
    for seed, name in enumerate(("sft", "ppo")):
        torch.manual_seed(seed)
        model = apply_lora(load_base_model(cfg.model), cfg.lora)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.normal_(0.0, 0.3)
        paths[name] = root / name / "adapter"
        model.save_pretrained(str(paths[name]))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_eval(processes: int, args: list[str], out_dir: Path, threads: int) -> tuple[dict, float, bytes]:
    """(summary.json, wall seconds of the whole command, examples.jsonl bytes) of one evaluation run."""
    if processes == 1:
        cmd = [sys.executable, "-m", "eval.evaluate"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "eval.evaluate"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    proc = subprocess.run([*cmd, *args, "--eval.torch_threads", str(threads), "--output_dir", str(out_dir)],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"evaluation failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out_dir / "eval" / "summary.json").read_text())
    return summary, wall, (out_dir / "eval" / "examples.jsonl").read_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--examples", type=int, default=100, help="test examples per run (tiny test split: 100)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="k of the sampled runs")
    args = parser.parse_args(argv)

    k = args.samples_per_prompt
    # (processes, torch threads per process, samples per prompt); None = the greedy summary only
    settings = [(1, 1, None), (1, 1, k), (2, 1, k), (1, 2, k)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_random_adapters(Path(tmp) / "adapters", args.config)
        eval_args = ["--config", str(args.config), "--eval.max_examples", str(args.examples),
                     "--eval.systems", f"base,sft={adapters['sft']},ppo={adapters['ppo']}", "--eval.ppo_log", "null"]
        first_output: dict = {}
        for processes, threads, samples in settings:
            rates, per_summary, walls, same = [], [], [], True
            for repeat in range(args.repeats):
                summary, wall, output = run_eval(
                    processes, [*eval_args, "--eval.samples_per_prompt", str(samples) if samples else "null"],
                    Path(tmp) / f"run-{processes}-{threads}-{samples}-{repeat}", threads)
                first_output.setdefault(samples, output)  # the same k must give the same file on any setting
                same = same and output == first_output[samples]
                rates.append(summary["throughput"]["examples_per_second"])
                per_summary.append(summary["throughput"]["summaries_per_second"])
                walls.append(wall)
                print(f"k={samples}, {processes} process(es) x {threads} thread(s), run {repeat + 1}: "
                      f"{rates[-1]:.2f} examples/s, {wall:.1f} s wall", flush=True)
            rows.append(f"| {samples or 'none'} | {processes} | {threads} | {median(rates):.2f} | {median(per_summary):.2f} | "
                        f"{min(rates):.2f}–{max(rates):.2f} | {median(walls):.1f} | {'yes' if same else 'NO'} |")

    table = "\n".join([
        "| samples per prompt | processes | torch threads per process | examples/s (median) | summaries/s (3 systems, "
        "greedy + samples) | examples/s range | wall s per command (start-up included) | examples.jsonl identical to "
        "the first run with the same k |",
        "|---:|---:|---:|---:|---:|---:|---:|---|", *rows,
    ])
    print("\n" + table)
    if args.append:
        path = args.append if args.append.is_absolute() else Path.cwd() / args.append
        command = "python bench/eval_throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        section = "\n".join([
            "", "## Evaluation throughput (eval.evaluate, tiny T5, 3 systems, cpu)", "",
            f"- Command: `{command.strip()}`",
            f"- Machine: {machine_line('threads per process as in the table')}",
            f"- Versions: {versions_line()}",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- {args.examples} test examples x 3 systems (base + 2 random LoRA adapters), a greedy summary and k "
            f"sampled ones per prompt (rollout settings), scored by the reward model and the held-out judge, "
            f"max_new_tokens from {args.config.name}, median of {args.repeats} runs",
            "", table, "",
        ])
        if not path.exists():
            path.write_text(RESULTS_HEADER)
        with open(path, "a") as f:
            f.write(section)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
