"""Time one PPO step of `train.ppo` against an original-notebook-style step on the same model, in one run.

    python bench/ppo_step_vs_notebook.py [--config configs/tiny.yaml] [--steps 3] [--append bench/RESULTS.md]
    python bench/ppo_step_vs_notebook.py --device cuda --model-size base --dtype bfloat16 --append bench/RESULTS.md

By default: the tiny model on the CPU with the recipe's (configs/tiny.yaml) settings. `--model-size base`: a
flan-t5-base-sized model with random weights (the shipped architecture) and the original notebook's LoRA,
rollout and PPO settings (configs/flan_t5_base.yaml, LengthSampler(100, 400) lengths), still with the tiny
prompts, tokenizer and reward model (prompt ids are valid flan-t5 ids; generated ids beyond the tiny vocabulary
decode to nothing, which only changes what the reward model reads). On `--device cuda` our reward model sits on
the GPU (placed deliberately), the notebook-style one on the CPU, as in the notebook.

Both steps use the same policy, prompts, reward model, sampling settings and PPO update (`train.ppo.ppo_step`,
the same math as TRL's `PPOTrainer.step` that the notebook called); they differ in experience making, which
includes the no-grad forward passes (the notebook-style step does them in mini-batch-sized chunks as TRL did,
ours uses `ppo.forward_batch_size` from the config):

* ours (`train.rollout.make_experience`): `rollout.batch_size` prompts per `generate()` call with attention masks,
  all summaries scored in one reward call;
* notebook-style: a python loop generating ONE summary per `generate()` call (the notebook's
  `for prompt_tensor in prompt_tensors: ppo_trainer.generate(prompt_tensor, ...)`, max_new_tokens drawn per
  sample by the LengthSampler when configured), then the reward model on the CPU in batches of 16 (the notebook's
  `sentiment_pipe(..., batch_size=16)`).

Each variant runs one warm-up step, then `--steps` timed steps (median reported), each split into experience
making (generation + rewards + no-grad forward passes) and the update. Rows are measured for the recipe's rollout lengths and, with
`--notebook-lengths`, for the notebook's LengthSampler(100, 400) too. The last column is the ceiling that any
experience making can reach against this notebook-style step: notebook-style step time / our update time, i.e.
the speed-up if our rollouts and rewards took no time at all. The ms per decoding step (experience making time /
model calls made by generate()) compares one batched decoding step with one single-row step.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import datasets  # noqa: E402
import transformers  # noqa: E402

from rewards.reward_fn import make_reward_fn  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import build_ppo_datasets  # noqa: E402
from train.generation import generation_kwargs  # noqa: E402
from train.ppo import estimator_for, make_optimizer, ppo_step  # noqa: E402
from train.ppo_core import ScoreShaper, Trajectory, make_kl_controller, response_mask_from_ids  # noqa: E402
from train.rollout import PromptStream, forward_trajectory, make_experience, pad_right  # noqa: E402
from bench_policy import load_bench_policy  # bench/bench_policy.py
from machine import machine_line, versions_line  # bench/machine.py

NOTEBOOK_REWARD_BATCH = 16


def notebook_rollout(policy, tokenizer, prompts, reward_fn, cfg, device) -> tuple[Trajectory, int]:
    """Experience making as the original notebook wrote it: one generate() per prompt, then TRL's forward passes
    (one mini-batch at a time). Also returns the number of decoding steps (model calls) the generate() calls made."""
    responses = []
    with torch.no_grad():
        policy.eval()
        for ids in prompts["input_ids"]:
            query = torch.tensor([ids], device=device)
            out = policy.generate(input_ids=query, attention_mask=torch.ones_like(query), **generation_kwargs(cfg.rollout))
            responses.append(out[0])
    decode_steps = sum(len(r) - 1 for r in responses)  # each row's own length: generate() stops at its eos
    mask_rows = [response_mask_from_ids(r.unsqueeze(0), tokenizer.eos_token_id)[0] for r in responses]
    responses = [r[: int(m.sum())].cpu() for r, m in zip(responses, mask_rows)]
    summaries = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    queries = list(prompts["query"])
    rewards = []
    for start in range(0, len(summaries), NOTEBOOK_REWARD_BATCH):
        part = reward_fn(queries[start : start + NOTEBOOK_REWARD_BATCH], summaries[start : start + NOTEBOOK_REWARD_BATCH])
        rewards.append(part.rewards)
    query_ids, query_mask = pad_right([torch.tensor(q) for q in prompts["input_ids"]], tokenizer.pad_token_id)
    response_ids, response_mask = pad_right(responses, tokenizer.pad_token_id)
    tensors = [t.to(device) for t in (query_ids, query_mask, response_ids, response_mask, torch.cat(rewards).float())]
    trajectory = forward_trajectory(policy, *tensors, chunk_size=cfg.ppo.mini_batch_size)
    return trajectory, decode_steps


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA work is asynchronous: time what has finished
    return time.perf_counter()


def time_steps(
    variant: str, cfg, steps: int, model_size: str = "tiny", device: str = "cpu"
) -> list[tuple[float, float, int]]:
    """(experience making s, update s, decoding steps) per PPO step of `variant`, after one warm-up step."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    policy, tokenizer = load_bench_policy(cfg, model_size, device)
    prompts = build_ppo_datasets(cfg.data, tokenizer)["train"]
    stream = PromptStream(len(prompts), cfg.ppo.batch_size, cfg.seed)
    optimizer = make_optimizer(policy, cfg.ppo.learning_rate)
    p = cfg.ppo
    kl_ctl, shaper = make_kl_controller(p.init_kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon), ScoreShaper()
    generator = torch.Generator().manual_seed(cfg.seed)
    # Ours places the reward model on the training device; the notebook scored on the CPU.
    reward_device = device if variant == "ours" else "cpu"
    reward_fn = make_reward_fn(dataclasses.replace(cfg.reward, device=reward_device))
    seconds = []
    for i in range(steps + 1):
        batch = prompts.select(stream.next_rows())
        started = _now(device)
        if variant == "ours":
            trajectory, _ = make_experience(policy, tokenizer, batch, reward_fn, cfg, None, random)
            # One generate() call per rollout.batch_size rows, each as long as its longest row.
            calls = -(-len(trajectory) // cfg.rollout.batch_size)
            decode_steps = calls * (trajectory.response_ids.shape[1] - 1)
        else:
            trajectory, decode_steps = notebook_rollout(policy, tokenizer, batch, reward_fn, cfg, device)
        made = _now(device)
        ppo_step(policy, optimizer, trajectory, kl_ctl, shaper, cfg.ppo, estimator_for(cfg.ppo), generator=generator)
        if i > 0:  # the first step warms up allocators and kernels
            seconds.append((made - started, _now(device) - made, decode_steps))
    reward_fn.close()
    return seconds


class Timing:
    """Medians over timed steps of experience making, update and their sum."""

    def __init__(self, steps: list[tuple[float, float, int]]):
        self.experience = statistics.median(e for e, _, _ in steps)
        self.update = statistics.median(u for _, u, _ in steps)
        self.total = statistics.median(e + u for e, u, _ in steps)
        # Experience making per model call of generate() (rewards included, they are small).
        self.ms_per_decode_step = statistics.median(1000 * e / n for e, _, n in steps)

    def __str__(self) -> str:
        return f"{self.experience:.2f} + {self.update:.2f} = {self.total:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--torch-threads", type=int, default=1, help="1 is stable on a shared 2-core VM")
    parser.add_argument("--notebook-lengths", action="store_true",
                        help="also measure with the notebook's LengthSampler(100, 400) for max_new_tokens")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model-size", choices=["tiny", "base"], default="tiny",
                        help="base: flan-t5-base-sized random weights with the original notebook's settings")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: the config's)")
    parser.add_argument("--append", type=Path, help="append a results section to this markdown file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible here; run on a GPU machine or use --device cpu")
    torch.set_num_threads(args.torch_threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    base = load_config(args.config)
    if args.model_size == "base":  # the original notebook's LoRA, sampling and PPO settings
        notebook = load_config(REPO_ROOT / "configs" / "flan_t5_base.yaml")
        base = dataclasses.replace(base, lora=notebook.lora, rollout=notebook.rollout, ppo=notebook.ppo)
    if args.dtype:
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, dtype=args.dtype))
    if base.ppo.advantage_estimator != "gae" or base.rollout.samples_per_prompt != 1:
        raise SystemExit("this compares PPO steps (ppo.advantage_estimator gae, one summary per prompt) with the "
                         "notebook's loop; bench/estimators.py times RLOO and GRPO")
    label = "recipe" if args.model_size == "tiny" else "original notebook's workflow"
    settings = [(label, base)]
    if args.notebook_lengths and args.model_size == "tiny":
        rollout = dataclasses.replace(base.rollout, max_new_tokens_min=100, max_new_tokens=400)
        settings.append(("notebook LengthSampler(100, 400)", dataclasses.replace(base, rollout=rollout)))

    rows = []
    for label, cfg in settings:
        ours = Timing(time_steps("ours", cfg, args.steps, args.model_size, args.device))
        notebook = Timing(time_steps("notebook", cfg, args.steps, args.model_size, args.device))
        lengths = (f"{cfg.rollout.max_new_tokens_min}-{cfg.rollout.max_new_tokens}"
                   if cfg.rollout.max_new_tokens_min else str(cfg.rollout.max_new_tokens))
        rows.append((label, lengths, ours, notebook))
        print(f"{label}: max_new_tokens {lengths}: ours {ours} s/step, notebook-style {notebook} s/step, "
              f"speed-up {notebook.total / ours.total:.1f}x, ceiling {notebook.total / ours.update:.1f}x, "
              f"ms per decoding step {ours.ms_per_decode_step:.2f} / {notebook.ms_per_decode_step:.2f}", flush=True)

    if args.append:
        command = "python bench/ppo_step_vs_notebook.py " + " ".join(sys.argv[1:])
        model = ("tiny model" if args.model_size == "tiny"
                 else f"flan-t5-base-sized random weights, {base.model.dtype}")
        lines = [
            "",
            f"## One PPO step: batched rollouts vs the original notebook's loop ({model} on {args.device})",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine_line(f'torch threads {args.torch_threads}')}",
            f"- Versions: {versions_line(('torch', 'transformers', 'peft'))}",
            f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Config {args.config}: ppo.batch_size {base.ppo.batch_size}, mini_batch_size {base.ppo.mini_batch_size}, "
            f"rollout.batch_size {base.rollout.batch_size}; median of {args.steps} steps after one warm-up",
            "",
            "s/step columns: experience making (generation + rewards) + update = total.",
            "",
            "| rollout lengths | max_new_tokens | ours s/step | notebook-style s/step | speed-up | experience making "
            "speed-up | ceiling: notebook step / our update | experience ms per decoding step: ours "
            f"({base.rollout.batch_size} rows) / notebook-style (1 row) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {label} | {lengths} | {ours} | {nb} | {nb.total / ours.total:.1f}x | "
            f"{nb.experience / ours.experience:.1f}x | {nb.total / ours.update:.1f}x | "
            f"{ours.ms_per_decode_step:.2f} / {nb.ms_per_decode_step:.2f} |"
            for label, lengths, ours, nb in rows
        ]
        with open(args.append, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
