"""Time one PPO step of TRL 0.11.4's classic `PPOTrainer` against ours, on the same model, in one run.

    python bench/ppo_vs_trl.py [--config configs/tiny.yaml] [--steps 5] [--notebook-lengths] [--append bench/RESULTS.md]
    python bench/ppo_vs_trl.py --device cuda --model-size base --dtype bfloat16 --notebook-lengths
    python bench/ppo_vs_trl.py --ppo.merge_adapter_for_rollout never      # any --section.key value config override

Three variants of one PPO step, each on its own fresh copy of the same seeded policy (base + LoRA + value head,
identical initial weights), with the same prompts in the same order, the same reward model, sampling settings
(top_k 0, top_p 1.0, min_length 5, do_sample) and PPO settings (the config's: batch 16, mini-batch 4, 1 epoch,
lr 1.41e-5 in configs/tiny.yaml):

* TRL notebook loop: the original notebook's loop, `ppo_trainer.generate(prompt_tensor, **kwargs)` once per prompt
  (max_new_tokens drawn per prompt by TRL's LengthSampler when the lengths are sampled), then the reward model on
  the decoded summaries in batches of 16 (the notebook's pipeline batch_size), then `ppo_trainer.step`;
* TRL batched: TRL used as well as it allows, `ppo_trainer.generate(prompt_tensors, batch_size=rollout.batch_size,
  length_sampler=..., **kwargs)` (padded batches with attention masks; sampled lengths are drawn once per
  generate() call from the same seeded draws as ours, so both make the same lengths), then the same scoring and
  `ppo_trainer.step`;
* ours: `train.rollout.make_experience` (batched generation, one reward call, no-grad forward passes of
  `ppo.forward_batch_size` rows) then `train.ppo.ppo_step` (the same update math as TRL's `step`).

The TRL trainers wrap the policy's own PEFT model (`AutoModelForSeq2SeqLMWithValueHead`, value head weights copied
from ours, its KL reference the adapter switched off, as ours), with TRL's own Adam over the trainable parameters.
TRL is left as it runs: it samples with transformers' own sampling (none of our rollout levers) with the model in
training mode (LoRA dropout on, a cost per decoding step that ours, sampling in eval mode, does not pay), and does
its no-grad forward passes one mini-batch at a time. Config overrides (`--section.key value`) reach every variant;
the rollout levers among them change only ours.
All variants score with one `rewards` scorer (the config's classifier, e.g. artifacts/tiny/roberta-hate, reward =
the nothate logit) placed on `--device`, on summaries decoded with special tokens skipped.

Each variant runs one warm-up step, then `--steps` timed steps, the variants taking turns step by step (each on its
own random state, so its samples are those it would draw alone): a machine that slows down during the run slows
every variant alike, and the ratios hold. Each phase is the median over the timed steps:
generation (generate() calls + decoding the summaries), scoring (reward calls) and update (TRL: `ppo_trainer.step`,
its no-grad forward passes included, which its own time/ppo/forward_pass stat reports; ours: the no-grad forward
passes of make_experience + `ppo_step`). Total is the median of the per-step totals. Rows are measured for the
config's rollout lengths and, with `--notebook-lengths`, for the notebook's LengthSampler(100, 400) too.

`--model-size small|base`: the shipped flan-t5-small/-base architecture (configs/architectures/) with random
weights, the original notebook's LoRA (configs/flan_t5_base.yaml: r 32 on q, v), the config's tokenizer, prompts
and reward model (tiny prompt ids are valid flan-t5 ids; generated ids beyond the tiny vocabulary decode to nothing,
which only changes what the reward model reads).

Everything is seeded from the config's seed, so a run repeats the same samples (timings aside). `time_ours` (ours
alone), `ours_records`, `trl_records` and `interleave` are importable: time a policy prepared by the caller, e.g. with
a rollout lever set in `cfg`.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import datasets  # noqa: E402
import transformers  # noqa: E402

from rewards.reward_fn import make_reward_fn  # noqa: E402
from train.checkpoint import capture_rng_state, restore_rng_state  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import build_ppo_datasets  # noqa: E402
from train.errors import ConfigError  # noqa: E402
from train.ppo import estimator_for, make_optimizer, ppo_step  # noqa: E402
from train.ppo_core import ScoreShaper, make_kl_controller  # noqa: E402
from train.rollout import PromptStream, make_experience  # noqa: E402
from machine import machine_line, versions_line  # bench/machine.py

NOTEBOOK_REWARD_BATCH = 16  # the notebook's sentiment pipeline batch_size
NOTEBOOK_LENGTHS = (100, 400)  # LengthSampler(100, 400)
VARIANTS = {
    "trl_loop": "TRL 0.11.4, notebook loop (1 prompt per generate)",
    "trl_batched": "TRL 0.11.4, batched generate",
    "ours": "ours (make_experience + ppo_step)",
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # TRL's LengthSampler and mini-batch order draw from numpy
    torch.manual_seed(seed)  # also seeds every CUDA device


class RandomState:
    """The python, numpy and torch (CPU and CUDA) random states of one variant (as a checkpoint captures them), kept
    while the others take a step."""

    def __init__(self) -> None:
        self.capture()

    def capture(self) -> None:
        self.state = capture_rng_state()

    def restore(self) -> None:
        restore_rng_state(self.state)


def interleave(steppers: dict[str, Any], steps: int) -> dict[str, dict[str, float]]:
    """{variant: medians}: one warm-up step of each variant, then `steps` rounds in which every variant takes one
    step, the order rotating from round to round (no variant always follows the same one), after an untimed garbage
    collection (no step pays for the one before it). `steppers`: {variant: (step function returning that step's
    record, its RandomState)}; the warm-up's total is kept as "warmup" (allocators, kernels, lazy imports; with
    rollout.compile, the compile)."""
    records: dict[str, list[dict[str, float]]] = {variant: [] for variant in steppers}
    order = list(steppers)
    for round_ in range(steps + 1):
        for variant in order[round_ % len(order):] + order[: round_ % len(order)]:
            step, state = steppers[variant]
            gc.collect()
            state.restore()
            records[variant].append(step())
            state.capture()
    return {variant: {**_medians(done[1:]), "warmup": done[0]["total"]} for variant, done in records.items()}


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA work is asynchronous: time what has finished
    return time.perf_counter()


def load_policy_for(cfg, model_size: str, device: str):
    """(policy, tokenizer), seeded: `load_policy(cfg)` for "tiny"; for "small"/"base" that FLAN-T5 architecture
    with random weights in `cfg.model.dtype` and a fresh `cfg.lora` adapter. A value head only where the config's
    estimator uses one (gae; none for the critic-free rloo and group), as train.ppo builds it."""
    from train.models import (Seq2SeqPolicy, ValueHead, apply_lora, build_from_architecture, load_policy,
                              load_tokenizer, torch_dtype)

    seed_everything(cfg.seed)
    with_value_head = estimator_for(cfg.ppo, cfg.rollout.samples_per_prompt).uses_value_head
    if model_size == "tiny":
        policy, tokenizer = load_policy(cfg, with_value_head=with_value_head)
        return policy.to(device), tokenizer
    base = build_from_architecture(f"google/flan-t5-{model_size}", device=device).to(torch_dtype(cfg.model.dtype))
    value_head = (ValueHead(base.config.d_model, dropout=cfg.model.value_head_dropout).to(device)
                  if with_value_head else None)
    return Seq2SeqPolicy(apply_lora(base, cfg.lora), value_head), load_tokenizer(cfg.model)


def _medians(records: list[dict[str, float]]) -> dict[str, float]:
    # Per-phase medians; the total is the median of per-step totals, not the sum of the medians.
    return {key: statistics.median(r[key] for r in records) for key in records[0]}


def ours_steps(policy, tokenizer, prompts, reward_fn, cfg, device: str):
    """A function running one of our PPO steps on `policy` (trained in place) per call, seeded from the config:
    returns (trajectory, rollout info, and the `_now` times at its start, after make_experience, after ppo_step)."""
    seed_everything(cfg.seed)
    k = cfg.rollout.samples_per_prompt
    stream, estimator = PromptStream(len(prompts), cfg.ppo.batch_size // k, cfg.seed), estimator_for(cfg.ppo, k)
    optimizer = make_optimizer(policy, cfg.ppo.learning_rate)
    p = cfg.ppo
    kl_ctl, shaper = make_kl_controller(p.init_kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon), ScoreShaper()
    generator, rng = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed)

    def step():
        batch = prompts.select(stream.next_rows())
        started = _now(device)
        trajectory, info = make_experience(policy, tokenizer, batch, reward_fn, cfg, None, rng)
        made = _now(device)
        ppo_step(policy, optimizer, trajectory, kl_ctl, shaper, cfg.ppo, estimator, generator=generator)
        return trajectory, info, started, made, _now(device)

    return step


def ours_records(policy, tokenizer, prompts, reward_fn, cfg, device: str):
    """(a function running one of our PPO steps per call and returning its record, the variant's RandomState):
    generation, scoring, update (= forward + ppo_step), forward (the no-grad passes), ppo_step, total (seconds),
    summaries and response_tokens (eos included). `prompts`: rows of the PPO dataset."""
    step = ours_steps(policy, tokenizer, prompts, reward_fn, cfg, device)
    state = RandomState()

    def record() -> dict[str, float]:
        trajectory, info, started, made, done = step()
        # RolloutInfo's forward time is not synchronised with the device: take it as the rest of make_experience.
        forward = made - started - info.time_generate - info.time_score
        return {
            "generation": info.time_generate, "scoring": info.time_score, "update": forward + done - made,
            "forward": forward, "ppo_step": done - made, "total": done - started,
            "summaries": len(trajectory), "response_tokens": float(info.response_lengths.sum()),
        }

    return record, state


def time_ours(policy, tokenizer, prompts, reward_fn, cfg, steps: int, device: str) -> dict[str, float]:
    """Medians over `steps` timed PPO steps (after one warm-up) of ours alone on `policy` (trained in place): the
    records of `ours_records`, and "warmup", the warm-up step's seconds."""
    return interleave({"ours": ours_records(policy, tokenizer, prompts, reward_fn, cfg, device)}, steps)["ours"]


# The profiler ranges of one of our PPO steps (train/rollout.py, train/ppo.py), in the order they run.
PHASES = {
    "rollout/encode": "encoder on the prompts (once: generation and old log-probs share it)",
    "rollout/generate": "decoding steps (rollout.compile: our decode_compiled loop; else generate())",
    "rollout/score": "reward model",
    "rollout/policy_forward": "no-grad policy decoder pass (old log-probs, values)",
    "rollout/reference_forward": "no-grad reference pass (encoder + decoder, adapter off)",
    "ppo/forward": "PPO mini-batch forward passes + loss",
    "ppo/backward": "PPO mini-batch backward passes",
    "ppo/optimizer_step": "gradient clipping + Adam",
}


def profile_ours(cfg, model_size: str, device: str, top: int = 10) -> list[str]:
    """Markdown: where one of our PPO steps (after a warm-up step) spends its time, by phase (the profiler ranges in
    PHASES, inclusive times; "other" is the rest of the step's wall time: adapter merge, decoding summaries,
    advantages, stats) and by operator (self time, the `top` largest), under `torch.profiler`, which slows small
    operators down."""
    from torch.profiler import ProfilerActivity, profile

    reward_fn = make_reward_fn(dataclasses.replace(cfg.reward, device=device))
    try:
        policy, tokenizer = load_policy_for(cfg, model_size, device)
        step = ours_steps(policy, tokenizer, build_ppo_datasets(cfg.data, tokenizer)["train"], reward_fn, cfg, device)
        step()  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            _, _, started, _, done = step()
        wall = done - started
    finally:
        reward_fn.close()
    events = prof.key_averages()
    on_device = device == "cuda"
    phase_ms = {e.key: (e.device_time_total if on_device else e.cpu_time_total) / 1e3
                for e in events if e.key in PHASES}
    unit = "CUDA" if on_device else "CPU"
    lines = [f"One step of ours under torch.profiler ({lengths_label(cfg.rollout)} new tokens): {wall:.3f} s wall.",
             "", f"| phase | what runs | {unit} ms | share of the step |", "|---|---|---:|---:|"]
    for key, what in PHASES.items():
        ms = phase_ms.get(key, 0.0)
        lines.append(f"| {key} | {what} | {ms:.1f} | {ms / (wall * 1e3):.0%} |")
    other = wall * 1e3 - sum(phase_ms.values())
    lines += [f"| other | adapter merge and restore, decoding summaries, advantages, statistics | {other:.1f} "
              f"| {other / (wall * 1e3):.0%} |", "",
              f"| operator (self time) | {unit} ms | calls | share of the step |", "|---|---:|---:|---:|"]
    self_ms = lambda e: (e.self_device_time_total if on_device else e.self_cpu_time_total) / 1e3  # noqa: E731
    ops = sorted((e for e in events if e.key not in PHASES and not e.key.startswith("ProfilerStep")), key=self_ms,
                 reverse=True)
    for e in ops[:top]:
        lines.append(f"| `{e.key}` | {self_ms(e):.1f} | {e.count} | {self_ms(e) / (wall * 1e3):.0%} |")
    return lines


def trl_trainer(policy, tokenizer, cfg, device: str):
    """TRL's classic PPOTrainer on `policy`'s own PEFT model (trained in place), value head copied from ours."""
    from trl import AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer

    p = cfg.ppo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classic trainer's deprecation notices and "no dataset" notes
        config = PPOConfig(
            learning_rate=p.learning_rate, batch_size=p.batch_size, mini_batch_size=p.mini_batch_size,
            ppo_epochs=p.ppo_epochs, gradient_accumulation_steps=p.gradient_accumulation_steps,
            init_kl_coef=p.init_kl_coef, adap_kl_ctrl=p.adaptive_kl, target=p.kl_target, horizon=p.kl_horizon,
            gamma=p.gamma, lam=p.lam, cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
            whiten_rewards=p.whiten_rewards, ratio_threshold=p.ratio_threshold, max_grad_norm=p.max_grad_norm,
            use_score_scaling=p.score_normalization != "none", use_score_norm=p.score_normalization == "standardize",
            score_clip=p.score_clip, seed=cfg.seed,
            # Its Accelerator would otherwise pick a visible GPU whatever --device says.
            accelerator_kwargs={"cpu": device == "cpu"},
        )
        # TRL's users load with transformers' own attention; ours shares the position-bias mask across layers.
        policy.peft_model.get_base_model().set_attn_implementation("sdpa")
        model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(
            policy.peft_model, summary_dropout_prob=cfg.model.value_head_dropout)
        model.v_head.summary.load_state_dict(policy.value_head.summary.state_dict())
        return PPOTrainer(config, model.to(device), None, tokenizer)


def notebook_generation_kwargs(settings) -> dict:
    """The notebook's generate() keyword arguments from `settings`: transformers' own sampling, none of our rollout
    levers (`train.generation.generation_kwargs` may add those); sampled lengths are drawn by TRL, per call."""
    kwargs = dict(max_new_tokens=settings.max_new_tokens, min_length=settings.min_length, num_beams=settings.num_beams,
                  do_sample=settings.do_sample)
    if settings.do_sample:
        kwargs.update(top_k=settings.top_k, top_p=settings.top_p, temperature=settings.temperature)
    return kwargs


def trl_records(policy, tokenizer, prompts, reward_fn, cfg, device: str, batched: bool):
    """As `ours_records`, for TRL 0.11.4's PPOTrainer: one generate() per prompt (the notebook loop) or, with
    `batched`, `rollout.batch_size` prompts per generate(); forward = its own time/ppo/forward_pass stat."""
    from trl.core import LengthSampler

    trainer = trl_trainer(policy, tokenizer, cfg, device)
    seed_everything(cfg.seed)
    stream = PromptStream(len(prompts), cfg.ppo.batch_size, cfg.seed)
    settings = cfg.rollout
    kwargs = notebook_generation_kwargs(settings)
    sampler = None
    if settings.max_new_tokens_min is not None:
        low, high = settings.max_new_tokens_min, settings.max_new_tokens
        if batched:
            # One length per generate() call drawn as ours draws it (random.Random(seed).randrange), so that the
            # batched variant and ours get the same lengths step by step, not just the same distribution.
            rng = random.Random(cfg.seed)
            sampler = lambda: rng.randrange(low, high)  # noqa: E731
        else:
            sampler = LengthSampler(low, high)  # the notebook's: one numpy draw per prompt
    state = RandomState()

    def record() -> dict[str, float]:
        batch = prompts.select(stream.next_rows())
        query_tensors = [torch.tensor(ids, device=device) for ids in batch["input_ids"]]
        started = _now(device)
        if batched:
            responses = trainer.generate(query_tensors, batch_size=settings.batch_size, length_sampler=sampler,
                                         **kwargs)
        else:
            responses = []
            for query in query_tensors:
                if sampler is not None:
                    kwargs["max_new_tokens"] = sampler()
                responses.append(trainer.generate(query, **kwargs).squeeze(0))
        summaries = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        generated = _now(device)
        queries, rewards = list(batch["query"]), []
        for start in range(0, len(summaries), NOTEBOOK_REWARD_BATCH):
            end = start + NOTEBOOK_REWARD_BATCH
            rewards.extend(reward_fn(queries[start:end], summaries[start:end]).rewards)
        scored = _now(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats = trainer.step(query_tensors, responses, rewards)
        done = _now(device)
        # A row's tokens after its decoder start token, up to and including its eos (as RolloutInfo counts them).
        tokens = sum(_response_length(r, tokenizer.eos_token_id) for r in responses)
        return {
            "generation": generated - started, "scoring": scored - generated, "update": done - scored,
            "forward": float(stats["time/ppo/forward_pass"]), "total": done - started,
            "summaries": len(responses), "response_tokens": float(tokens),
        }

    return record, state


def _response_length(response: torch.Tensor, eos_id: int) -> int:
    eos = (response[1:] == eos_id).nonzero()
    return int(eos[0, 0]) + 1 if len(eos) else len(response) - 1


def measure(cfg, model_size: str, device: str, steps: int) -> dict[str, dict[str, float]]:
    """{variant: medians} for the three variants, each on a fresh copy of the seeded policy, taking turns step by
    step (`interleave`)."""
    reward_fn = make_reward_fn(dataclasses.replace(cfg.reward, device=device))
    try:
        steppers = {}
        for variant in VARIANTS:
            policy, tokenizer = load_policy_for(cfg, model_size, device)
            prompts = build_ppo_datasets(cfg.data, tokenizer)["train"]
            if variant == "ours":
                steppers[variant] = ours_records(policy, tokenizer, prompts, reward_fn, cfg, device)
            else:
                steppers[variant] = trl_records(policy, tokenizer, prompts, reward_fn, cfg, device,
                                                batched=variant == "trl_batched")
        return interleave(steppers, steps)
    finally:
        reward_fn.close()


def lengths_label(settings) -> str:
    if settings.max_new_tokens_min is not None:
        return f"{settings.max_new_tokens_min}-{settings.max_new_tokens} (sampled)"
    return str(settings.max_new_tokens)


def table(rows: list[tuple[str, dict[str, dict[str, float]]]], rollout_batch: int) -> list[str]:
    """Markdown rows: per regime, the three variants and how much faster ours is than each."""
    lines = [
        "| max_new_tokens | variant | generation s | scoring s | update s (of which no-grad forward) | total s/step "
        "| summaries/step | response tokens/step | ours faster by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lengths, results in rows:
        ours = results["ours"]["total"]
        for variant, label in VARIANTS.items():
            r = results[variant]
            if variant == "trl_batched":
                label += f" (batch_size {rollout_batch})"
            lines.append(
                f"| {lengths} | {label} | {r['generation']:.3f} | {r['scoring']:.3f} | {r['update']:.3f} "
                f"({r['forward']:.3f}) | {r['total']:.3f} | {r['summaries']:.0f} | {r['response_tokens']:.0f} "
                f"| {r['total'] / ours:.2f}x |")
    return lines


def build_configs(args, overrides: list[str]) -> list[tuple[str, Any]]:
    """[(lengths label, config)] for each measured rollout-length regime."""
    if args.model_size != "tiny":
        # The original notebook's adapter for a real FLAN-T5 size; later (user) overrides still win.
        lora = load_config(REPO_ROOT / "configs" / "flan_t5_base.yaml").lora
        overrides = ["--lora.r", str(lora.r), "--lora.alpha", str(lora.alpha), "--lora.dropout", str(lora.dropout),
                     "--lora.target_modules", "[" + ", ".join(lora.target_modules) + "]", *overrides]
    if args.dtype:
        overrides = ["--model.dtype", args.dtype, *overrides]
    cfg = load_config(args.config, overrides)
    configs = [(lengths_label(cfg.rollout), cfg)]
    if args.notebook_lengths:
        low, high = NOTEBOOK_LENGTHS
        rollout = dataclasses.replace(cfg.rollout, max_new_tokens_min=low, max_new_tokens=high)
        configs.append((lengths_label(rollout), dataclasses.replace(cfg, rollout=rollout)))
    return configs


def step_benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The options every step benchmark shares (this one and bench/estimators.py): config, model size, device, dtype,
    timed steps, threads; other --section.key value arguments override the config."""
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Other --section.key value arguments override the config.")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--model-size", choices=["tiny", "small", "base"], default="tiny",
                        help="small/base: that FLAN-T5 architecture with random weights and the notebook's LoRA")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="model dtype (default: the config's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is stable on a shared 2-core VM")
    return parser


def check_step_benchmark_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible here; run on a GPU machine or use --device cpu")


def main(argv: list[str] | None = None) -> list[str]:
    """Runs the benchmark, prints the table (and appends it to --append); returns the table's lines."""
    parser = step_benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--notebook-lengths", action="store_true",
                        help="also measure with the notebook's LengthSampler(100, 400) for max_new_tokens")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of ours (torch.profiler) per length regime: time by phase and "
                        "operator")
    parser.add_argument("--append", type=Path, help="append a results section to this Markdown file")
    args, overrides = parser.parse_known_args(argv)
    check_step_benchmark_args(parser, args)
    torch.set_num_threads(args.threads)
    # peft's note on the tiny recipe's adapter over a tied lm_head: about merging and export, not what is timed.
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*", category=UserWarning)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    try:
        configs = build_configs(args, overrides)
    except ConfigError as e:  # e.g. a mistyped option, taken for a config override
        parser.error(str(e))
    if configs[0][1].ppo.advantage_estimator != "gae" or configs[0][1].rollout.samples_per_prompt != 1:
        parser.error("this compares PPO (ppo.advantage_estimator gae, one summary per prompt) with TRL's PPOTrainer; "
                     "bench/estimators.py times RLOO and GRPO against it")
    if configs[0][1].rollout.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # The compile is timed as a first run pays it: without the compiled code earlier runs left on disk.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ppo_vs_trl_inductor_")
        atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    rows, profiles = [], []
    for lengths, cfg in configs:
        if args.profile:
            profiles += ["", *profile_ours(cfg, args.model_size, args.device)]
        results = measure(cfg, args.model_size, args.device, args.steps)
        rows.append((lengths, results))
        ours, loop, batched = (results[v]["total"] for v in ("ours", "trl_loop", "trl_batched"))
        print(f"max_new_tokens {lengths}: ours {ours:.3f} s/step; vs TRL batched {batched:.3f} s/step: "
              f"{batched / ours:.2f}x; vs TRL notebook loop {loop:.3f} s/step: {loop / ours:.2f}x", flush=True)
    cfg = configs[0][1]
    lines = table(rows, cfg.rollout.batch_size)
    compiled = ("" if not cfg.rollout.compile else "; it compiles the decoder step, from the kernels the profiled step "
                "compiled" if args.profile else "; it compiles the decoder step, the first regime's from an empty "
                "compile cache")
    lines += ["", "Our warm-up step (not in the medians" + compiled + "): " + "; ".join(
              f"{lengths} new tokens {results['ours']['warmup']:.1f} s" for lengths, results in rows) + "."]
    lines += profiles
    print("\n".join(lines))

    if args.append:
        command = "python bench/ppo_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv)
        model = ("tiny model" if args.model_size == "tiny"
                 else f"flan-t5-{args.model_size}-sized random weights")
        header = [
            "",
            f"## One PPO step: ours vs TRL 0.11.4's PPOTrainer ({model}, {cfg.model.dtype}, on {args.device})",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine_line(f'torch threads {args.threads}')}",
            f"- Versions: {versions_line(('torch', 'transformers', 'peft', 'trl'))}",
            f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Config {args.config}: ppo.batch_size {cfg.ppo.batch_size}, mini_batch_size {cfg.ppo.mini_batch_size}, "
            f"ppo_epochs {cfg.ppo.ppo_epochs}, rollout.batch_size {cfg.rollout.batch_size}, "
            f"forward_batch_size {cfg.ppo.forward_batch_size}, LoRA r {cfg.lora.r} on {', '.join(cfg.lora.target_modules)}"
            f"{'; overrides ' + ' '.join(overrides) if overrides else ''}; median of {args.steps} steps after one warm-up",
            "",
            "Seconds per step (the variants take turns step by step): generation (generate + decoding), scoring "
            "(reward model), update (TRL: "
            "`ppo_trainer.step`; ours: no-grad forward passes + `ppo_step`), total. Ours faster by: the variant's total / "
            "ours. TRL runs as it does for its users: it generates in training mode (LoRA dropout on, which costs it "
            "time per decoding step), and its notebook loop draws a length per prompt, so its response tokens per "
            "step differ from the batched variants' (compare per token there).",
            "",
        ]
        with open(args.append, "a") as f:
            f.write("\n".join(header + lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
