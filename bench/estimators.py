"""Time and memory of one RL step with PPO (gae), RLOO and GRPO (group) at the same number of summaries per step.

    python bench/estimators.py [--config configs/tiny.yaml] [--steps 5] [--samples-per-prompt 4] [--append FILE]
    python bench/estimators.py --model-size small --steps 2 --append bench/RESULTS.md
    python bench/estimators.py --device cuda --model-size base --dtype bfloat16
    python bench/estimators.py --ppo.kl_penalty reward      # any --section.key value config override

Three variants of one step of ours (`train.rollout.make_experience` + `train.ppo.ppo_step`, as bench/ppo_vs_trl.py
times it), each making ppo.batch_size summaries per step:

* gae: PPO with a value head, 1 summary for each of ppo.batch_size prompts;
* rloo: RLOO, K summaries (--samples-per-prompt) for each of ppo.batch_size / K prompts, no value head;
* group: group-relative (GRPO) advantages, the same K and prompts per step, no value head.

Everything else is the config's (plus overrides), for every variant: the KL placement follows ppo.kl_penalty (auto:
in the reward for gae and rloo, in the loss for group). Each variant runs in its own process (this script again,
with --worker), so that its memory figures are its own: the seeded policy (tiny: `load_policy`; small/base: that
FLAN-T5 architecture with random weights and the notebook's q,v LoRA), the tokenizer, the PPO prompts and the reward
model are loaded, then one warm-up step and `--steps` timed steps run; phases are medians over the timed steps.

Memory. On cpu: the worker's peak RSS (VmHWM: models, data and reward model included; not `ru_maxrss`, which
Linux carries over from the parent process) and the step memory growth: the peak RSS during the steps (warm-up
included) minus the RSS once everything was loaded. The step's peak is exact where the kernel lets VmHWM be reset
after the load (/proc/self/clear_refs); elsewhere RSS is sampled every 5 ms by a background thread, which can miss a
shorter spike. RSS also counts memory the allocator keeps cached after a tensor is freed, and pages touched once
(lazy imports, the first step's kernels): compare the growth column across estimators (what they change: the value
head, its activations and gradients, the number of prompts encoded), not absolute RSS.
On cuda: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` once loaded, and its growth over
the memory allocated then (tensors only: the caching allocator's reserve is not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

# ppo_vs_trl puts the repository root on sys.path and imports datasets, transformers and the training code.
from ppo_vs_trl import (  # noqa: E402
    build_configs, check_step_benchmark_args, load_policy_for, step_benchmark_parser, time_ours,
)
from machine import machine_line, versions_line  # noqa: E402

import datasets  # noqa: E402
import transformers  # noqa: E402

from rewards.reward_fn import make_reward_fn  # noqa: E402
from train.config import validate  # noqa: E402
from train.data import build_ppo_datasets  # noqa: E402
from train.errors import ConfigError  # noqa: E402
from train.ppo import estimator_for  # noqa: E402

VARIANTS = {"gae": "PPO", "rloo": "RLOO", "group": "GRPO"}  # ppo.advantage_estimator: its usual name
MIB = 2**20
RSS_INTERVAL_S = 0.005


def variant_configs(args, overrides: list[str]) -> dict:
    """{estimator: config}: the config (with --model-size's LoRA, --dtype and the overrides) with that estimator,
    and samples_per_prompt 1 for gae, --samples-per-prompt for the others; ppo.batch_size summaries for each."""
    base = build_configs(argparse.Namespace(config=args.config, model_size=args.model_size, dtype=args.dtype,
                                            notebook_lengths=False), overrides)[0][1]
    configs = {}
    for estimator in VARIANTS:
        k = 1 if estimator == "gae" else args.samples_per_prompt
        cfg = dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, advantage_estimator=estimator),
                                  rollout=dataclasses.replace(base.rollout, samples_per_prompt=k))
        validate(cfg)  # e.g. ppo.batch_size must be a multiple of k
        configs[estimator] = cfg
    return configs


def _status_bytes(field: str) -> int:
    """A memory figure of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def rss_bytes() -> int:
    """This process's resident set size now."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM). Not `ru_maxrss`: Linux carries that over from the parent
    across fork + exec, so a worker would report at least its parent's RSS."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Set VmHWM back to the RSS now (Linux >= 4.0); False where /proc/self/clear_refs may not be written."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """The highest RSS while the `with` block runs (`peak`) and the process's whole-life peak RSS (`process_peak`).

    Exact where VmHWM can be reset at the start (`exact`). Elsewhere a background thread samples the RSS every
    `interval_s` (torch's operators release the GIL, so it samples during them too, but can miss a shorter spike),
    and VmHWM counts where it rose inside the block. No thread runs where the reset works: none disturbs the timing."""

    def __init__(self, interval_s: float = RSS_INTERVAL_S):
        self.interval_s, self.peak, self.exact = interval_s, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRss":
        self._before = peak_rss_bytes()
        self.exact = reset_peak_rss()
        self.peak = rss_bytes()
        if not self.exact:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.exact:
            self._stop.set()
            self._thread.join()
        after = peak_rss_bytes()
        if self.exact or after > self._before:
            self.peak = max(self.peak, after)
        self.process_peak = max(self._before, after)


def run_variant(cfg, model_size: str, device: str, steps: int) -> dict:
    """One variant in this process: time_ours's medians, the step's memory figures (MiB) and trainable parameters."""
    reward_fn = make_reward_fn(dataclasses.replace(cfg.reward, device=device))
    try:
        policy, tokenizer = load_policy_for(cfg, model_size, device)
        prompts = build_ppo_datasets(cfg.data, tokenizer)["train"]
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            loaded_cuda = torch.cuda.memory_allocated()
        loaded_rss = rss_bytes()
        with PeakRss() as peak:
            result = time_ours(policy, tokenizer, prompts, reward_fn, cfg, steps, device)
    finally:
        reward_fn.close()
    result.update(
        estimator=cfg.ppo.advantage_estimator, k=cfg.rollout.samples_per_prompt,
        prompts=cfg.ppo.batch_size // cfg.rollout.samples_per_prompt, trainable_params=trainable,
        kl_in_loss=estimator_for(cfg.ppo, cfg.rollout.samples_per_prompt).kl_in_loss,
        peak_rss_mib=peak.process_peak / MIB, loaded_rss_mib=loaded_rss / MIB,
        rss_growth_mib=(peak.peak - loaded_rss) / MIB, rss_peak_exact=peak.exact,
    )
    if device == "cuda":
        result.update(peak_cuda_mib=torch.cuda.max_memory_allocated() / MIB,
                      cuda_growth_mib=(torch.cuda.max_memory_allocated() - loaded_cuda) / MIB)
    return result


def run_worker(estimator: str, argv: list[str]) -> dict:
    """`run_variant` for `estimator` in a fresh process of this script (same arguments); its last stdout line."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", estimator]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # its stderr (warnings, errors) passes through
    if proc.returncode != 0:
        raise SystemExit(f"the {estimator} worker failed ({proc.returncode}): {' '.join(command)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict], device: str) -> list[str]:
    """Markdown: one row per estimator."""
    memory = ("peak CUDA allocated MiB | step CUDA memory growth MiB" if device == "cuda"
              else "peak RSS MiB | step memory growth MiB")
    lines = [
        "| estimator | k | prompts/step | summaries/step | response tokens/step | generation s | scoring s "
        f"| update s (of which no-grad forward) | total s/step | speed vs PPO | {memory} | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ppo = results["gae"]["total"]
    for estimator, name in VARIANTS.items():
        r = results[estimator]
        peak, growth = ((r["peak_cuda_mib"], r["cuda_growth_mib"]) if device == "cuda"
                        else (r["peak_rss_mib"], r["rss_growth_mib"]))
        lines.append(
            f"| {estimator} ({name}) | {r['k']} | {r['prompts']} | {r['summaries']:.0f} | {r['response_tokens']:.0f} "
            f"| {r['generation']:.3f} | {r['scoring']:.3f} | {r['update']:.3f} ({r['forward']:.3f}) "
            f"| {r['total']:.3f} | {ppo / r['total']:.2f}x | {peak:,.0f} | {growth:,.1f} | {r['trainable_params']:,} |")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    """Runs the benchmark, prints the table (and appends it to --append); returns the table's lines."""
    parser = step_benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--samples-per-prompt", type=int, default=4,
                        help="K: rloo and group sample K summaries for each of ppo.batch_size / K prompts (gae: 1 for "
                        "each of ppo.batch_size prompts)")
    parser.add_argument("--append", type=Path, help="append a results section to this Markdown file")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: one variant, JSON out
    argv = sys.argv[1:] if argv is None else list(argv)
    args, overrides = parser.parse_known_args(argv)
    check_step_benchmark_args(parser, args)
    try:
        configs = variant_configs(args, overrides)
    except ConfigError as e:  # e.g. a mistyped option, taken for a config override, or a batch not divisible by K
        parser.error(str(e))

    if args.worker:
        torch.set_num_threads(args.threads)
        # peft's note on the tiny recipe's adapter over a tied lm_head: about merging and export, not what is timed.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*", category=UserWarning)
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights" bars, one per model per worker
        print(json.dumps(run_variant(configs[args.worker], args.model_size, args.device, args.steps)), flush=True)
        return []

    results = {}
    for estimator, name in VARIANTS.items():
        results[estimator] = r = run_worker(estimator, argv)
        print(f"{estimator} ({name}, k {r['k']}): {r['total']:.3f} s/step, {r['summaries']:.0f} summaries/step",
              flush=True)
    lines = table(results, args.device)
    print("\n".join(lines))

    if args.append:
        cfg, k = configs["gae"], args.samples_per_prompt
        command = "python bench/estimators.py " + " ".join(argv)
        model = "tiny model" if args.model_size == "tiny" else f"flan-t5-{args.model_size}-sized random weights"
        kl = "; ".join(f"{e} in the {'loss' if results[e]['kl_in_loss'] else 'reward'}" for e in VARIANTS)
        if args.device == "cuda":
            memory = ("peak CUDA allocated: `torch.cuda.max_memory_allocated()` after the load; step memory growth: "
                      "that minus the memory allocated once loaded (tensors only)")
        else:
            method = ("exact (VmHWM reset after the load)" if all(r["rss_peak_exact"] for r in results.values())
                      else "sampled every 5 ms")
            memory = ("peak RSS: the worker process's VmHWM (models, data and reward model included); step memory "
                      "growth: the peak RSS during the steps (warm-up included) minus the RSS once everything was "
                      f"loaded, {method}. RSS includes memory the allocator keeps cached: compare the growth column, "
                      "not absolute RSS")
        header = [
            "",
            f"## One RL step: PPO vs RLOO vs GRPO at the same summaries per step ({model}, {cfg.model.dtype}, "
            f"on {args.device})",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine_line(f'torch threads {args.threads}')}",
            f"- Versions: {versions_line(('torch', 'transformers', 'peft'))}",
            f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Config {args.config}: ppo.batch_size {cfg.ppo.batch_size} summaries per step (PPO: "
            f"{cfg.ppo.batch_size} prompts x 1; RLOO, GRPO: {cfg.ppo.batch_size // k} prompts x {k}), mini_batch_size "
            f"{cfg.ppo.mini_batch_size}, ppo_epochs {cfg.ppo.ppo_epochs}, rollout.batch_size {cfg.rollout.batch_size}, "
            f"forward_batch_size {cfg.ppo.forward_batch_size}, max_new_tokens {cfg.rollout.max_new_tokens}, "
            f"ppo.kl_penalty {cfg.ppo.kl_penalty} (KL: {kl}), "
            f"LoRA r {cfg.lora.r} on {', '.join(cfg.lora.target_modules)}"
            f"{'; overrides ' + ' '.join(overrides) if overrides else ''}; median of {args.steps} steps after one "
            "warm-up, each estimator in its own process",
            "",
            "Seconds per step: generation (generate + decoding), scoring (reward model), update (no-grad forward "
            "passes: policy, with values for PPO, and reference; then `ppo_step`), total. Speed vs PPO: PPO's "
            f"total / the row's. Memory, in MiB: {memory}. Trainable params: LoRA, plus the value head for PPO only.",
            "",
        ]
        with open(args.append, "a") as f:
            f.write("\n".join(header + lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
