"""Time one PPO step of `train.ppo` against a reference-notebook-style step on the same tiny model, in one run.

    python bench/ppo_step_vs_notebook.py [--config configs/tiny.yaml] [--steps 3] [--append bench/RESULTS.md]

Both steps use the same policy, prompts, reward model, sampling settings and PPO update (`ppo_core.ppo_step`, the
same math as TRL's `PPOTrainer.step` that the notebook called); they differ in experience making:

* ours (`train.rollout.make_rollout`): `rollout.batch_size` prompts per `generate()` call with attention masks,
  all summaries scored in one reward call;
* notebook-style: a python loop generating ONE summary per `generate()` call (the notebook's
  `for prompt_tensor in prompt_tensors: ppo_trainer.generate(prompt_tensor, ...)`, max_new_tokens drawn per
  sample by the LengthSampler when configured), then the reward model on the CPU in batches of 16 (the notebook's
  `sentiment_pipe(..., batch_size=16)`).

Each variant runs one warm-up step, then `--steps` timed steps (median reported). Rows are measured for the
recipe's rollout lengths and, with `--reference-lengths`, for the notebook's LengthSampler(100, 400) too.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import transformers  # noqa: E402

from rewards.reward_fn import make_reward_fn  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import build_ppo_datasets  # noqa: E402
from train.generation import generation_kwargs  # noqa: E402
from train.models import load_policy  # noqa: E402
from train.ppo_core import Rollout, make_kl_controller, ppo_step, response_mask_from_ids  # noqa: E402
from train.rollout import PromptStream, ScoreShaper, make_rollout, pad_right  # noqa: E402
from machine import machine_line, versions_line  # bench/machine.py

NOTEBOOK_REWARD_BATCH = 16


def notebook_rollout(policy, tokenizer, prompts, reward_fn, cfg) -> Rollout:
    """Experience making as the reference notebook wrote it: one generate() per prompt."""
    responses = []
    with torch.no_grad():
        policy.eval()
        for ids in prompts["input_ids"]:
            query = torch.tensor([ids])
            out = policy.generate(input_ids=query, attention_mask=torch.ones_like(query), **generation_kwargs(cfg.rollout))
            responses.append(out[0])
    mask_rows = [response_mask_from_ids(r.unsqueeze(0), tokenizer.eos_token_id)[0] for r in responses]
    responses = [r[: int(m.sum())] for r, m in zip(responses, mask_rows)]
    summaries = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    queries = list(prompts["query"])
    rewards = []
    for start in range(0, len(summaries), NOTEBOOK_REWARD_BATCH):
        part = reward_fn(queries[start : start + NOTEBOOK_REWARD_BATCH], summaries[start : start + NOTEBOOK_REWARD_BATCH])
        rewards.append(part.rewards)
    query_ids, query_mask = pad_right([torch.tensor(q) for q in prompts["input_ids"]], tokenizer.pad_token_id)
    response_ids, response_mask = pad_right(responses, tokenizer.pad_token_id)
    return Rollout(query_ids, query_mask, response_ids, response_mask, torch.cat(rewards).float())


def time_steps(variant: str, cfg, steps: int) -> list[float]:
    """Seconds per full PPO step (experience making + update) of `variant`, after one warm-up step."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    policy, tokenizer = load_policy(cfg)
    prompts = build_ppo_datasets(cfg.data, tokenizer)["train"]
    stream = PromptStream(len(prompts), cfg.ppo.batch_size, cfg.seed)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.ppo.learning_rate)
    kl_ctl, shaper = make_kl_controller(cfg.ppo), ScoreShaper(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    reward_fn = make_reward_fn(cfg.reward)
    seconds = []
    for i in range(steps + 1):
        batch = prompts.select(stream.next_rows())
        started = time.perf_counter()
        if variant == "ours":
            rollout, _ = make_rollout(policy, tokenizer, batch, reward_fn, shaper, cfg, None, random)
        else:
            rollout = notebook_rollout(policy, tokenizer, batch, reward_fn, cfg)
        ppo_step(policy, optimizer, rollout, kl_ctl, cfg.ppo, generator=generator)
        if i > 0:  # the first step warms up allocators and kernels
            seconds.append(time.perf_counter() - started)
    reward_fn.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--torch-threads", type=int, default=1, help="1 is stable on a shared 2-core VM")
    parser.add_argument("--reference-lengths", action="store_true",
                        help="also measure with the notebook's LengthSampler(100, 400) for max_new_tokens")
    parser.add_argument("--append", type=Path, help="append a results section to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    base = load_config(args.config)
    settings = [("recipe", base)]
    if args.reference_lengths:
        rollout = dataclasses.replace(base.rollout, max_new_tokens_min=100, max_new_tokens=400)
        settings.append(("notebook LengthSampler(100, 400)", dataclasses.replace(base, rollout=rollout)))

    rows = []
    for label, cfg in settings:
        ours = statistics.median(time_steps("ours", cfg, args.steps))
        notebook = statistics.median(time_steps("notebook", cfg, args.steps))
        lengths = (f"{cfg.rollout.max_new_tokens_min}-{cfg.rollout.max_new_tokens}"
                   if cfg.rollout.max_new_tokens_min else str(cfg.rollout.max_new_tokens))
        rows.append((label, lengths, ours, notebook))
        print(f"{label}: max_new_tokens {lengths}: ours {ours:.2f} s/step, notebook-style {notebook:.2f} s/step, "
              f"speed-up {notebook / ours:.1f}x", flush=True)

    if args.append:
        command = "python bench/ppo_step_vs_notebook.py " + " ".join(sys.argv[1:])
        lines = [
            "",
            "## One PPO step: batched rollouts vs the reference notebook's loop (tiny model on cpu)",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine_line(f'torch threads {args.torch_threads}')}",
            f"- Versions: {versions_line(('torch', 'transformers', 'peft'))}",
            f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Config {args.config}: ppo.batch_size {base.ppo.batch_size}, mini_batch_size {base.ppo.mini_batch_size}, "
            f"rollout.batch_size {base.rollout.batch_size}; median of {args.steps} steps after one warm-up",
            "",
            "| rollout lengths | max_new_tokens | ours s/step | notebook-style s/step | speed-up |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {label} | {lengths} | {ours:.2f} | {nb:.2f} | {nb / ours:.1f}x |" for label, lengths, ours, nb in rows]
        with open(args.append, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
