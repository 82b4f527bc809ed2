"""Stage benchmarks in one command: rollout generation, reward scoring, PPO update and evaluation, 1 vs 2 processes.

    python bench/run_all.py [--append bench/RESULTS.md]                        # tiny default on the CPU, 1 and 2 processes
    python bench/run_all.py --device cuda --model-size base --dtype bfloat16 \\
        --processes 1 --append bench/RESULTS.md                                 # flan-t5-base-sized random weights, 1 GPU

For each process count the stages run in a fresh worker (`accelerate launch --multi_gpu --num_processes N` for
N > 1, with `Accelerator(cpu=True)` on the CPU) that splits the same global work over its processes:
  * rollout generation: `ppo.batch_size` prompts, sampled with `min_new_tokens = max_new_tokens` so every row
    makes exactly the same number of tokens (random-weight models would otherwise stop anywhere); tokens/s;
  * reward scoring: texts from the tiny toxicity set through `rewards.scorer.RewardScorer`; texts/s;
  * PPO update: the no-grad forward passes and one `train.ppo.ppo_step` on a synthetic rollout of the configured
    batch (timed in those two parts), after one warm-up step; seconds per step;
  * evaluation: greedy generation (`eval.generation` settings) + reward scoring + ROUGE of test examples
    (tiny model, real tokenizer); with `--model-size base` (random weights, no matching tokenizer) only the
    greedy generation of token-id prompts; examples/s.
Throughputs are global (all processes' work / the slowest process's time); the 2-process column is divided by
the 1-process one. On the CPU each process runs one torch thread by default (`--torch-threads`), so the ratio
measures adding a process (and a core), not OpenMP threading.
The one-process PPO step of flan-t5-base size is the figure to hold against a target of <= 2 s per step on one H100.
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

import torch
from bench_policy import load_bench_policy  # bench/bench_policy.py
from machine import machine_line, versions_line  # bench/machine.py

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

RESULTS_HEADER = "# Benchmark results\n\nBenchmark results. Every figure names the command that produced it, the machine and the date.\n"
STAGES = [
    ("generation", "rollout generation", "tokens/s"),
    ("reward", "reward scoring", "texts/s"),
    ("ppo", "PPO update (one ppo_step)", "s/step"),
    ("eval", "evaluation", "examples/s"),
]


# ----------------------------------------------------------------------------------------------------
# Worker: runs in each process


def _timed(fn, accelerator) -> float:
    """Seconds `fn` takes on the slowest process (all processes start together)."""
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(elapsed, reduction="max"))


def worker(args) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rewards.scorer import RewardScorer
    from train.config import load_config
    from train.data import build_eval_dataset
    from train.generation import generate_texts
    from train.distributed import Collectives
    from train.ppo import estimator_for, make_optimizer, ppo_step
    from train.ppo_core import ScoreShaper, make_kl_controller
    from train.rollout import forward_trajectory, gather_trajectory
    from train.rouge import compute_rouge

    overrides = ["--model.dtype", args.dtype] if args.dtype else []
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", overrides)
    cfg.model.name_or_path = str(REPO_ROOT / cfg.model.name_or_path)
    cfg.data.path = str(REPO_ROOT / cfg.data.path)
    cfg.reward.model_name_or_path = str(REPO_ROOT / cfg.reward.model_name_or_path)
    accelerator = Accelerator(cpu=args.device == "cpu", gradient_accumulation_steps=cfg.ppo.gradient_accumulation_steps)
    n, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if args.device == "cpu":
        # One thread per process by default: with torch's default (all cores) a single process on this shared
        # 2-core VM loses up to 10-30x to OpenMP oversubscription, which would swamp the 1 -> 2 process scaling.
        torch.set_num_threads(args.torch_threads or max(1, (os.cpu_count() or 1) // n))
    set_seed(args.seed + rank)
    policy, tokenizer = load_bench_policy(cfg, args.model_size, device)
    if args.model_size != "tiny":
        tokenizer = None  # random weights: evaluation times generation only (see the module docstring)
    vocab = policy.config.vocab_size
    rows = cfg.ppo.batch_size // n
    q_len, new_tokens = args.prompt_len, args.max_new_tokens
    results: dict[str, float] = {}

    # Rollout generation: this process's rows, rollout.batch_size per generate() call.
    queries = torch.randint(2, vocab, (rows, q_len), device=device)

    def generate(max_new: int = new_tokens) -> None:
        with torch.inference_mode():
            for start in range(0, rows, cfg.rollout.batch_size):
                ids = queries[start : start + cfg.rollout.batch_size]
                policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                max_new_tokens=max_new, min_new_tokens=max_new)

    generate(2)  # warm-up
    results["generation"] = cfg.ppo.batch_size * new_tokens / _timed(generate, accelerator)

    # Reward scoring: the tiny classifier on this process's share of the texts.
    cfg.reward.device = str(device)
    scorer = RewardScorer.from_config(cfg.reward)
    sentences = [json.loads(l)["text"] for l in (REPO_ROOT / "artifacts/tiny/toxicity/test.jsonl").read_text().splitlines() if l.strip()]
    texts = [" ".join(sentences[(i + k) % len(sentences)] for k in range(1 + i % 4)) for i in range(args.reward_texts)]
    mine = texts[rank::n]
    scorer.score(mine[:8])
    results["reward"] = len(texts) / _timed(lambda: scorer.score(mine), accelerator)

    # PPO update: a synthetic rollout of this process's rows.
    optimizer = make_optimizer(policy, cfg.ppo.learning_rate)
    prepared, optimizer = accelerator.prepare(policy, optimizer)
    response = torch.randint(2, vocab, (rows, new_tokens + 1), device=device)
    response[:, 0] = policy.config.decoder_start_token_id
    p = cfg.ppo
    kl_ctl = make_kl_controller(p.init_kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
    generator = torch.Generator().manual_seed(args.seed)
    collectives = Collectives.of(accelerator)
    timing: dict[str, float] = {}

    def step() -> None:  # what train.ppo does after generation and scoring: forward passes, gather, update
        started = time.perf_counter()
        local = forward_trajectory(prepared, queries, torch.ones_like(queries), response, torch.ones_like(response),
                                   torch.randn(rows, device=device), chunk_size=p.forward_batch_size or p.mini_batch_size // n,
                                   accelerator=accelerator)
        trajectory = gather_trajectory(local, collectives, 0)
        timing["forward"] = time.perf_counter() - started
        started = time.perf_counter()
        ppo_step(prepared, optimizer, trajectory, kl_ctl, ScoreShaper(), p, estimator_for(p, cfg.rollout.samples_per_prompt),
                 accelerator=accelerator, generator=generator)
        timing["update"] = time.perf_counter() - started

    step()  # warm-up
    results["ppo"] = _timed(step, accelerator)
    results["ppo_forward"], results["ppo_update"] = timing["forward"], timing["update"]

    # Evaluation: examples/s.
    gen = cfg.eval.generation
    if tokenizer is not None:
        examples = build_eval_dataset(cfg.data, "test", max_examples=args.eval_examples)
        shard = examples.select(range(rank, len(examples), n))

        def evaluate() -> None:
            summaries = generate_texts(policy, tokenizer, shard["prompt"], gen, cfg.data.max_prompt_tokens, device, progress=False)
            scorer.score(summaries)
            compute_rouge(summaries, shard["human_summaries"])

        results["eval"] = len(examples) / _timed(evaluate, accelerator)
    else:
        eval_rows = args.eval_examples // n
        eval_ids = torch.randint(2, vocab, (eval_rows, q_len), device=device)

        def evaluate() -> None:
            with torch.inference_mode():
                for start in range(0, eval_rows, gen.batch_size):
                    ids = eval_ids[start : start + gen.batch_size]
                    policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.max_new_tokens)

        results["eval"] = eval_rows * n / _timed(evaluate, accelerator)

    if accelerator.is_main_process:
        results["threads"] = torch.get_num_threads()
        Path(args.json_out).write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ----------------------------------------------------------------------------------------------------
# Orchestrator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(args, processes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker_args = [str(Path(__file__).resolve()), "--worker", "--json-out", str(out), "--device", args.device,
                       "--model-size", args.model_size, "--prompt-len", str(args.prompt_len),
                       "--max-new-tokens", str(args.max_new_tokens), "--eval-examples", str(args.eval_examples),
                       "--reward-texts", str(args.reward_texts), "--seed", str(args.seed),
                       "--torch-threads", str(args.torch_threads)]
        if args.dtype:
            worker_args += ["--dtype", args.dtype]
        if processes == 1:
            command = [sys.executable, *worker_args]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", str(_free_port()), *worker_args]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0 or not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise SystemExit(f"benchmark worker with {processes} process(es) failed (status {done.returncode}):\n{tail}")
        return json.loads(out.read_text())


def format_section(args, results: dict[int, dict[str, float]], command: str, machine: str) -> str:
    counts = sorted(results)
    model = "tiny T5 (artifacts/tiny)" if args.model_size == "tiny" else "flan-t5-base-sized random weights"
    lines = [
        f"## Stage benchmarks ({model}, {args.dtype or 'float32'}, {args.device})", "",
        f"- Command: `{command}`",
        f"- Machine: {machine}",
        f"- Versions: {versions_line()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Work per measurement (global, split over the processes): PPO batch 16 (configs/tiny.yaml), prompts of "
        f"{args.prompt_len} random tokens, {args.max_new_tokens} new tokens; {args.reward_texts} reward texts; "
        f"{args.eval_examples} evaluation examples. torch threads per process: "
        + ", ".join(f"{n}p {int(results[n]['threads'])}" for n in counts),
        "",
        "| stage | unit | " + " | ".join(f"{n} process{'es' if n > 1 else ''}" for n in counts)
        + (" | ratio 2p/1p |" if {1, 2} <= set(counts) else " |"),
        "|---|---|" + "---:|" * len(counts) + ("---:|" if {1, 2} <= set(counts) else ""),
    ]
    for key, name, unit in STAGES:
        cells = [f"{results[n][key]:,.0f}" if unit != "s/step" and results[n][key] >= 100 else f"{results[n][key]:,.2f}"
                 for n in counts]
        row = f"| {name} | {unit} | " + " | ".join(cells) + " |"
        if {1, 2} <= set(counts):
            row += f" {results[2][key] / results[1][key]:.2f} |"
        lines.append(row)
    for n in counts:
        r = results[n]
        lines.append("")
        lines.append(f"PPO step per stage, {n} process{'es' if n > 1 else ''} (main process): no-grad forward passes "
                     f"and gather {r['ppo_forward']:.2f} s, rewards + advantages + optimisation {r['ppo_update']:.2f} s "
                     f"(total {r['ppo']:.2f} s).")
    lines.append("")
    lines.append("For s/step lower is better: a ratio above 1 there means 2 processes were slower.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model-size", choices=["tiny", "base"], default="tiny",
                   help="tiny: the offline tiny T5; base: flan-t5-base architecture with random weights")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32, as configs/tiny.yaml)")
    p.add_argument("--processes", default=None, help="comma-separated process counts (default 1,2 on cpu, 1 on cuda)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 128 tiny, 512 base)")
    p.add_argument("--max-new-tokens", type=int, help="generated tokens per rollout row (default 32 tiny, 400 base)")
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--reward-texts", type=int, default=512)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads per process on the CPU (default 1; 0 = cores / processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds per worker run")
    p.add_argument("--append", help="append the Markdown section to this results file (e.g. bench/RESULTS.md)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prompt_len is None:
        args.prompt_len = 128 if args.model_size == "tiny" else 512
    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if args.model_size == "tiny" else 400
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible here; run on a GPU machine or use --device cpu")
    processes = [int(x) for x in (args.processes or ("1,2" if args.device == "cpu" else "1")).split(",")]
    machine = machine_line()  # taken before the runs: the load average is the one at the start
    results = {}
    for n in processes:
        started = time.perf_counter()
        results[n] = run_workers(args, n)
        print(f"{n} process(es): {json.dumps(results[n])} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    command = "python " + shlex.join([os.path.relpath(__file__, REPO_ROOT), *(argv if argv is not None else sys.argv[1:])])
    section = format_section(args, results, command, machine)
    print(section)
    if args.append:
        path = Path(args.append)
        text = path.read_text() if path.is_file() else RESULTS_HEADER
        path.write_text(text.rstrip("\n") + "\n\n" + section)


if __name__ == "__main__":
    main()
