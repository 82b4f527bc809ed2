"""PPO detoxification of a LoRA-adapted seq2seq policy against a hate-speech reward model.

Usage:
    python -m train.ppo --config configs/tiny.yaml
    python -m train.ppo --config configs/tiny.yaml --resume            # continue from the newest checkpoint
    python -m train.ppo --config configs/flan_t5_base.yaml --model.adapter runs/flan-t5-base/sft/adapter
    accelerate launch --multi_gpu --num_processes 2 -m train.ppo --config configs/flan_t5_base.yaml
    accelerate launch --config_file accelerate_configs/X.yaml -m train.ppo --config ...   # e.g. DeepSpeed ZeRO-2/3

`main` is setup -> train -> cleanup. Each step of `train`:
  1. trajectory: this process's prompts -> summaries -> reward scores -> no-grad forward passes
     (train/rollout.py), gathered into the global batch on every process;
  2. rewards: shaped scores, KL penalty per token, score on the last token;
  3. advantages: GAE, whitened over the global batch;
  4. PPO epochs over shuffled mini-batches, each split evenly over the processes;
  5. the KL controller;
  6. log: stats to `log.jsonl`, TensorBoard and the progress bar;
  7. checkpoint every `ppo.save_every_steps` (and on SIGUSR1/SIGTERM, then exit with status 3).
Steps 2-5 are `ppo_step`; the math is in train/ppo_core.py.

The global batch: `ppo.batch_size` and `ppo.mini_batch_size` count rows over all processes, and N processes
compute the update of one process on the same rows (up to float rounding): the mini-batches do not depend on N,
and every statistic over the batch (score shaping, whitening, loss normalisation, the skip decision, logged stats)
is global. Only the sampling differs: each process samples its own rows with its own seed.

Writes `<output_dir>/ppo/`: `checkpoints/checkpoint-<step>/`, `adapter/` (final LoRA adapter + value head),
`config.yaml`, `log.jsonl`, `tensorboard/`. Setting the environment variable DETOX_PPO_DEBUG_DIR makes every
process append its prompt ids and a hash of its trainable weights per step to `<dir>/rank<r>.jsonl`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from rewards.reward_fn import make_reward_fn
from train.checkpoint import find_resume_checkpoint, load_checkpoint, save_atomically, save_checkpoint
from train.cli import config_from_cli, run_cli
from train.config import ExperimentConfig, PPOConfig, save_config
from train.data import build_ppo_datasets
from train.debug import write_debug_record
from train.distributed import Collectives, configure_deepspeed, fix_deepspeed_cpu_ranks, gathered_trainable, use_cpu
from train.errors import ConfigError
from train.models import add_reference_adapter, load_policy, parameter_report, save_policy
from train.ppo_core import (
    ScoreShaper, Trajectory, gae_advantages, kl_penalized_rewards, make_kl_controller, ppo_loss, step_stats,
    trajectory_minibatch_stats,
)
from train.preemption import PREEMPTED_EXIT_CODE, StopSignal
from train.rollout import PromptStream, gather_trajectory, make_experience, policy_forward, rollout_stats
from train.run_log import JsonlLog

log = logging.getLogger("train.ppo")
POLICY_DIR = "policy"  # adapter + value head inside a checkpoint


@dataclass
class Run:
    """Everything `setup` builds for `train` and `cleanup`."""

    cfg: ExperimentConfig
    out: Path
    accelerator: Accelerator
    policy: Any
    tokenizer: Any
    optimizer: Any
    prompts: Any
    stream: PromptStream
    reward_fn: Any
    kl_ctl: Any
    shaper: ScoreShaper
    shuffle: torch.Generator  # mini-batch order: the same on every process
    start_step: int
    log: JsonlLog
    stop: StopSignal


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    args, cfg = config_from_cli(__doc__.splitlines()[0], argv, lambda p: p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint"))
    run = setup(cfg, args.resume)
    try:
        return train(run)
    finally:
        cleanup(run)


def setup(cfg: ExperimentConfig, resume: bool) -> Run:
    out = Path(cfg.output_dir) / "ppo"
    resume_from = find_resume_checkpoint(out / "checkpoints", resume)
    # Loaded before the Accelerator: under ZeRO-3 every later from_pretrained is partitioned across processes,
    # which is right for the policy but not for a scorer that each process runs whole.
    reward_fn = make_reward_fn(cfg.reward)
    accelerator = Accelerator(cpu=use_cpu(), gradient_accumulation_steps=cfg.ppo.gradient_accumulation_steps,
                              log_with="tensorboard", project_dir=str(out))
    fix_deepspeed_cpu_ranks(accelerator)
    check_batch_sizes(cfg.ppo, accelerator.num_processes)
    if accelerator.is_main_process:
        log.info("reward model %s (%s)", cfg.reward.model_name_or_path, reward_fn.where)
        save_config(cfg, out / "config.yaml")
        accelerator.init_trackers("tensorboard")
    set_seed(cfg.seed)  # the same initial weights on every process

    # The policy: base + LoRA + value head; on resume the adapter and value head come from the checkpoint. The KL
    # reference: the base (adapter off), or a frozen copy of the adapter this run started from (also on resume).
    model_cfg = cfg.model if resume_from is None else dataclasses.replace(cfg.model, adapter=str(resume_from / POLICY_DIR))
    policy, tokenizer = load_policy(dataclasses.replace(cfg, model=model_cfg))
    if cfg.ppo.reference == "initial_adapter" and cfg.model.adapter is not None:
        add_reference_adapter(policy, cfg.model.adapter)
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        prompts = build_ppo_datasets(cfg.data, tokenizer)["train"]
    stream = PromptStream(len(prompts), cfg.ppo.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)
    if accelerator.is_main_process:
        log.info("KL reference: %s; %d PPO prompts; %s", f"the initial adapter {cfg.model.adapter}"
                 if policy.reference_adapter else "the base model (adapter off)", len(prompts),
                 parameter_report(policy).format().replace("\n", "; "))

    # TRL's optimizer (Adam on the trainable parameters, constant rate); DeepSpeed gets our batch and clipping.
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.ppo.learning_rate)
    configure_deepspeed(accelerator, cfg.ppo.mini_batch_size // accelerator.num_processes,
                        cfg.ppo.gradient_accumulation_steps, cfg.ppo.max_grad_norm)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    p = cfg.ppo
    kl_ctl = make_kl_controller(p.init_kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
    shaper = ScoreShaper(p.score_normalization, p.score_clip)
    set_seed(cfg.seed + accelerator.process_index)  # each process samples its own rows, reproducibly
    shuffle = torch.Generator().manual_seed(cfg.seed)
    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, policy, optimizer, shuffle=shuffle)
        kl_ctl.load_state_dict(state["kl_controller"])
        shaper.load_state_dict(state["scores"])
        stream.load_state_dict(state["data"])
        start_step = int(state["step"])
        log.info("resumed from %s at step %d", resume_from, start_step)
    run_log = JsonlLog(out / "log.jsonl", accelerator.is_main_process, resumed_step=start_step if resume_from else None)
    return Run(cfg, out, accelerator, policy, tokenizer, optimizer, prompts, stream, reward_fn, kl_ctl, shaper,
               shuffle, start_step, run_log, StopSignal())


def train(run: Run) -> dict[str, float]:
    cfg, accelerator, policy = run.cfg, run.accelerator, run.policy
    collectives = Collectives.of(accelerator)
    is_main = accelerator.is_main_process
    progress = tqdm(total=cfg.ppo.steps, initial=run.start_step, desc="PPO", unit="step", disable=not is_main)
    stats: dict[str, float] = {}
    for step in range(run.start_step + 1, cfg.ppo.steps + 1):
        started = time.perf_counter()
        # 1. Trajectory: this process's rows, then the global batch on every process.
        batch = run.prompts.select(run.stream.next_rows())
        local, info = make_experience(policy, run.tokenizer, batch, run.reward_fn, cfg, accelerator, random)
        trajectory = gather_trajectory(local, collectives, run.tokenizer.pad_token_id)

        # 2-5. Rewards, advantages, PPO epochs over mini-batches, KL controller.
        update_started = time.perf_counter()
        stats = ppo_step(policy, run.optimizer, trajectory, run.kl_ctl, run.shaper, cfg.ppo,
                         accelerator=accelerator, generator=run.shuffle)

        # 6. Log.
        stats.update(rollout_stats(trajectory, info, collectives))
        stats.update({"time/update": time.perf_counter() - update_started, "time/step": time.perf_counter() - started})
        run.log.write({"step": step, **stats})
        if is_main:
            accelerator.log(stats, step=step)
            progress.update(1)
            progress.set_postfix(reward=f"{stats['env/reward_mean']:.3f}", kl=f"{stats['objective/kl']:.3f}")
            if step % cfg.ppo.log_every_steps == 0:
                for i in range(min(2, len(info.summaries))):
                    log.info("step %d sample %s: reward %.3f, toxicity %.3f: %r", step, batch["id"][i],
                             local.scores[i].item(), info.toxicity[i].item(), info.summaries[i][:200])
        write_debug_record(accelerator, policy, step, info.prompt_ids)

        # 7. Checkpoint periodically, and on a stop signal (then exit for the scheduler to requeue).
        preempted = run.stop.should_stop(accelerator)
        if step % cfg.ppo.save_every_steps == 0 or preempted:
            save_ppo_checkpoint(run, step)
        if preempted:
            log.warning("stopped by a signal after step %d; checkpoint written, exiting with status %d",
                        step, PREEMPTED_EXIT_CODE)
            raise SystemExit(PREEMPTED_EXIT_CODE)
    progress.close()

    with gathered_trainable(accelerator, policy):  # the final adapter and value head
        if is_main:
            save_atomically(run.out / "adapter", lambda tmp: save_policy(accelerator.unwrap_model(policy), tmp, run.tokenizer))
    if is_main:
        log.info("PPO done: adapter written to %s", run.out / "adapter")
    return stats


def cleanup(run: Run) -> None:
    run.stop.restore()
    run.reward_fn.close()
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


def ppo_step(
    policy: Any,
    optimizer: Any,
    trajectory: Trajectory,
    kl_ctl: Any,
    shaper: ScoreShaper,
    cfg: PPOConfig,
    *,
    accelerator: Any = None,
    generator: Optional[torch.Generator] = None,
) -> dict[str, float]:
    """Steps 2-5 on the global batch `trajectory` (the same on every process); returns TRL-named stats."""
    collectives = Collectives.of(accelerator)
    check_batch_sizes(cfg, collectives.world_size, len(trajectory), accelerator)
    started, kl_coef = time.perf_counter(), kl_ctl.value
    # 2. Rewards: shaped scores, the KL penalty per token, the score on the last response token.
    scores = shaper(trajectory.scores)
    rewards, non_score_rewards, kls = kl_penalized_rewards(
        scores, trajectory.logprobs, trajectory.ref_logprobs, trajectory.masks, kl_coef)
    # 3. Advantages: GAE, whitened over the whole batch.
    values, advantages, returns = gae_advantages(trajectory.values, rewards, trajectory.masks, cfg.gamma, cfg.lam,
                                                 cfg.whiten_rewards)
    # 4. PPO epochs over mini-batches.
    minibatch_stats = ppo_epochs(policy, optimizer, trajectory, values, advantages, returns, cfg, accelerator,
                                 collectives, generator)
    stats = step_stats(trajectory, scores, kls, non_score_rewards, kl_coef, minibatch_stats)
    # 5. The KL controller, counting the global batch.
    kl_ctl.update(stats["objective/kl"], cfg.batch_size)
    stats["ppo/learning_rate"] = optimizer.param_groups[0]["lr"]
    stats["time/ppo/total"] = time.perf_counter() - started
    return stats


def ppo_epochs(policy, optimizer, trajectory: Trajectory, values: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor, cfg: PPOConfig, accelerator: Any, collectives: Collectives,
               generator: Optional[torch.Generator]) -> list[dict[str, torch.Tensor]]:
    """Step 4: `ppo_epochs` passes over the global batch in an order shared by every process; each mini-batch of
    `mini_batch_size` rows is cut into equal contiguous shares and process p computes share p. The loss is the
    mini-batch's global token mean (`ppo_loss`). Dropout is off, as in TRL, so the first ratio is exactly 1."""
    share, rank = cfg.mini_batch_size // collectives.world_size, collectives.rank
    params = [p for p in policy.parameters() if p.requires_grad]
    was_training = policy.training
    policy.eval()
    all_stats = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(trajectory), generator=generator).to(trajectory.scores.device)
        for k, start in enumerate(range(0, len(trajectory), cfg.mini_batch_size)):
            rows = order[start : start + cfg.mini_batch_size]
            mine = rows[rank * share : (rank + 1) * share]
            # accelerate's accumulate() skips the gradient all-reduce until the last mini-batch of an accumulation.
            with accelerator.accumulate(policy) if accelerator is not None else nullcontext():
                part = trajectory.select(mine).trimmed()
                logits, logprobs, vpreds, _ = policy_forward(policy, part, cfg.trl_first_token_mask)
                t = logprobs.shape[1]  # this share's own width; the columns after it are masked out
                loss, stats = ppo_loss(
                    part.logprobs, values[mine, :t], logprobs, vpreds, logits, part.masks, advantages[mine, :t],
                    returns[mine, :t], cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
                    vf_coef=cfg.vf_coef, ratio_threshold=cfg.ratio_threshold,
                    token_count=float(trajectory.masks[rows].sum()), all_reduce_sum=collectives.all_reduce_sum,
                    gradient_averaged_over=collectives.world_size,
                )
                if accelerator is not None:
                    accelerator.backward(loss)  # divides by the accumulation steps itself
                    sync = accelerator.sync_gradients
                else:
                    (loss / cfg.gradient_accumulation_steps).backward()
                    sync = (k + 1) % cfg.gradient_accumulation_steps == 0
                if sync and cfg.max_grad_norm is not None:  # DeepSpeed clips inside its step (configure_deepspeed)
                    if accelerator is not None:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    else:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if sync:
                    optimizer.step()
                    optimizer.zero_grad()
            stats.update(trajectory_minibatch_stats(values[rows], advantages[rows], returns[rows], trajectory.masks[rows]))
            all_stats.append(stats)
    policy.train(was_training)
    return all_stats


def check_batch_sizes(cfg: PPOConfig, processes: int, rows: Optional[int] = None, accelerator: Any = None) -> None:
    """One clear error for global batch sizes that do not split evenly over processes and mini-batches."""
    if cfg.batch_size % processes or cfg.mini_batch_size % processes:
        raise ConfigError(f"ppo.batch_size ({cfg.batch_size}) and ppo.mini_batch_size ({cfg.mini_batch_size}) are "
                          f"global and must be multiples of the number of processes ({processes})")
    if cfg.batch_size % (cfg.mini_batch_size * cfg.gradient_accumulation_steps):
        raise ConfigError(f"ppo.batch_size ({cfg.batch_size}) must be a multiple of ppo.mini_batch_size "
                          f"({cfg.mini_batch_size}) x ppo.gradient_accumulation_steps ({cfg.gradient_accumulation_steps})")
    if rows is not None and rows != cfg.batch_size:
        raise ConfigError(f"the trajectory has {rows} rows but ppo.batch_size is {cfg.batch_size} (global)")
    if accelerator is not None and accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ConfigError(f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} steps but "
                          f"ppo.gradient_accumulation_steps is {cfg.gradient_accumulation_steps}")


def save_ppo_checkpoint(run: Run, step: int) -> None:
    """Trainable weights, optimizer and RNG states, KL controller, score statistics, step and data position."""
    accelerator, policy = run.accelerator, run.policy

    def write_policy(directory: Path) -> None:
        with gathered_trainable(accelerator, policy):
            if accelerator.is_main_process:
                save_policy(accelerator.unwrap_model(policy), directory / POLICY_DIR)

    # No LR scheduler: the classic TRL PPO trainer (and ppo.learning_rate) keeps the rate constant.
    state = {"step": step, "data": run.stream.state_dict(), "kl_controller": run.kl_ctl.state_dict(),
             "scores": run.shaper.state_dict()}
    save_checkpoint(run.out / "checkpoints", step, accelerator, policy, run.optimizer, state, write_policy,
                    run.cfg.ppo.keep_checkpoints, shuffle=run.shuffle)


if __name__ == "__main__":
    run_cli(main)
