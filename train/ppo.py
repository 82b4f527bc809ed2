"""PPO detoxification of a LoRA-adapted seq2seq policy against a hate-speech reward model.

Usage:
    python -m train.ppo --config configs/tiny.yaml [--resume]
    python -m train.ppo --config configs/flan_t5_base.yaml --model.adapter runs/flan-t5-base/sft/adapter
    accelerate launch --config_file accelerate_configs/X.yaml -m train.ppo --config ...   # DDP, DeepSpeed ZeRO-2/3

`PPORun` is setup -> train -> cleanup; each step of `train` is numbered: 1. trajectory (train/rollout.py), 2. rewards,
3. advantages, 4. PPO epochs over mini-batches, 5. KL controller (2-5 are `ppo_step`; the math is in
train/ppo_core.py), 6. log, 7. checkpoint (also on SIGUSR1/SIGTERM, then exit with status 3).

The advantage estimator (`ppo.advantage_estimator`, resolved once by `estimator_for`): "gae" is PPO with a value
head; "rloo" and "group" (GRPO) are critic-free: no value head is built or saved, and each prompt is sampled
`rollout.samples_per_prompt` (k) times so that its summaries are each other's baseline. The same clipped update
runs for all three; the KL to the reference enters the reward or, as the k3 term, the loss (`ppo.kl_penalty`).

The global batch: `ppo.batch_size` and `ppo.mini_batch_size` count rows over all processes, and N processes
compute the 1-process update of the same rows (up to float rounding): the mini-batches do not depend on N, and
every statistic over the batch (score shaping, whitening, loss normalisation, the skip decision, logged stats) is
global. Only sampling differs: each process samples its own rows with its own seed. With k samples per prompt a
process samples all k of each of its prompts, so the batch has ppo.batch_size / k prompts.

Writes `<output_dir>/ppo/`: `checkpoints/checkpoint-<step>/`, `adapter/` (final LoRA adapter + value head for gae),
`config.yaml`, `log.jsonl`, and the trackers' `tensorboard/` or `wandb/` (`trackers`; train/trackers.py).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.profiler import record_function
from tqdm.auto import tqdm

from rewards.reward_fn import make_reward_fn
from train.atomic import save_directory
from train.checkpoint import check_same_checkpoint, find_resume_checkpoint, load_checkpoint, save_checkpoint
from train.cli import config_from_cli, run_cli
from train.config import ExperimentConfig, PPOConfig, save_config
from train.data import build_ppo_datasets
from train.debug import write_debug_record
from train.distributed import (
    Collectives, PlainAccumulation, configure_deepspeed, end_training, fix_deepspeed_cpu_ranks, gathered_trainable,
    use_cpu,
)
from train.errors import ConfigError
from train.models import add_reference_adapter, load_policy, save_policy
from train.param_report import parameter_report
from train.ppo_core import (
    Advantages, Estimator, ScoreShaper, Trajectory, check_batch_sizes, make_estimator, make_kl_controller, ppo_loss,
    select_rows, step_stats, trajectory_minibatch_stats,
)
from train.preemption import PREEMPTED_EXIT_CODE, StopSignal
from train.rollout import PromptStream, gather_trajectory, log_samples, make_experience, policy_forward, rollout_stats
from train.resume import add_resume_arguments, apply_optimizer_settings, check_resume_settings, record_resume, settings_of
from train.run_log import JsonlLog
from train.trackers import check_tracker_packages, make_trackers, start_trackers

log = logging.getLogger("train.ppo")
POLICY_DIR = "policy"  # adapter (+ value head for gae) inside a checkpoint


def estimator_for(p: PPOConfig, samples_per_prompt: int = 1) -> Estimator:
    """The run's advantage estimator and loss parts, from ppo.advantage_estimator / kl_penalty and
    rollout.samples_per_prompt."""
    return make_estimator(p.advantage_estimator, p.kl_penalty, samples_per_prompt, p.gamma, p.lam, p.whiten_rewards)


def make_optimizer(policy: Any, learning_rate: float) -> torch.optim.Optimizer:
    """TRL's optimizer: Adam on the trainable parameters, constant rate. `foreach` runs each update operation once
    over all the adapter's tensors instead of once per tensor (torch picks it by itself for CUDA tensors only); the
    arithmetic is the same, bit for bit."""
    return torch.optim.Adam([q for q in policy.parameters() if q.requires_grad], lr=learning_rate, foreach=True)


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    args, cfg = config_from_cli(__doc__.splitlines()[0], argv, add_resume_arguments)
    run = PPORun(cfg)
    try:
        run.setup(args.resume or args.resume_with_changes, args.resume_with_changes)
        return run.train()
    finally:
        run.cleanup()


class PPORun:
    """One PPO run: `setup` builds everything, `train` runs the steps, `cleanup` releases what setup took."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg, self.out = cfg, Path(cfg.output_dir) / "ppo"
        self.reward_fn = self.accelerator = None
        self.stop = StopSignal()

    def setup(self, resume: bool, accept_changes: bool = False) -> None:
        cfg, p = self.cfg, self.cfg.ppo
        check_tracker_packages(cfg)
        resume_from = find_resume_checkpoint(self.out / "checkpoints", resume)
        changes = check_resume_settings(resume_from, cfg, "ppo", accept_changes)  # before config.yaml is rewritten
        # Loaded before the Accelerator: under ZeRO-3 every later from_pretrained is partitioned across processes,
        # which is right for the policy but not for a scorer that each process runs whole.
        self.reward_fn = make_reward_fn(cfg.reward)
        self.accelerator = accelerator = Accelerator(
            cpu=use_cpu(), gradient_accumulation_steps=p.gradient_accumulation_steps,
            log_with=make_trackers(cfg, "ppo", resume_from))
        fix_deepspeed_cpu_ranks(accelerator)
        check_same_checkpoint(accelerator, resume_from)
        k = cfg.rollout.samples_per_prompt
        check_batch_sizes(p.batch_size, p.mini_batch_size, p.gradient_accumulation_steps, accelerator.num_processes,
                          samples_per_prompt=k)
        self.estimator = estimator_for(p, k)
        if accelerator.is_main_process:
            log.info("reward model %s (%s)", cfg.reward.model_name_or_path, self.reward_fn.where)
            save_config(cfg, self.out / "config.yaml")
        start_trackers(accelerator, cfg, "ppo")
        set_seed(cfg.seed)  # the same initial weights on every process

        # The policy: base + LoRA + value head (gae only); on resume the adapter and value head come from the
        # checkpoint. The KL reference: the base (adapter off), or a frozen copy of the adapter this run started from.
        model = cfg.model if resume_from is None else dataclasses.replace(cfg.model, adapter=str(resume_from / POLICY_DIR))
        policy, self.tokenizer = load_policy(dataclasses.replace(cfg, model=model),
                                             with_value_head=self.estimator.uses_value_head)
        if p.reference == "initial_adapter" and cfg.model.adapter is not None:
            add_reference_adapter(policy, cfg.model.adapter)
        with accelerator.main_process_first():  # the main process fills the datasets cache first
            self.prompts = build_ppo_datasets(cfg.data, self.tokenizer)["train"]
        self.stream = PromptStream(len(self.prompts), p.batch_size // k, cfg.seed, accelerator.process_index,
                                   accelerator.num_processes)
        if accelerator.is_main_process:
            log.info("advantages: %s (%d summaries per prompt, KL in the %s); KL reference: %s; %d PPO prompts; %s",
                     self.estimator.name, k, "loss" if self.estimator.kl_in_loss else "reward",
                     f"the initial adapter {cfg.model.adapter}" if policy.reference_adapter
                     else "the base model (adapter off)", len(self.prompts),
                     parameter_report(policy).format().replace("\n", "; "))

        optimizer = make_optimizer(policy, p.learning_rate)  # DeepSpeed gets our batch and clipping below
        configure_deepspeed(accelerator, p.mini_batch_size // accelerator.num_processes, p.gradient_accumulation_steps,
                            p.max_grad_norm)
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
        self.kl_ctl = make_kl_controller(p.init_kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
        self.shaper = ScoreShaper(p.score_normalization, p.score_clip)
        set_seed(cfg.seed + accelerator.process_index)  # each process samples its own rows, reproducibly
        self.shuffle = torch.Generator().manual_seed(cfg.seed)  # the mini-batch order, the same on every process
        self.start_step = 0
        if resume_from is not None:
            state = load_checkpoint(resume_from, accelerator, self.policy, self.optimizer, shuffle=self.shuffle)
            apply_optimizer_settings(self.optimizer, p.learning_rate)  # the restored state holds the checkpoint's
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.shaper.load_state_dict(state["scores"])
            self.stream.load_state_dict(state["data"])
            self.start_step = int(state["step"])
            if accelerator.is_main_process:
                log.info("resumed from %s at step %d", resume_from, self.start_step)
                record_resume(self.out, self.start_step, resume_from, changes)
        self.log = JsonlLog(self.out / "log.jsonl", accelerator.is_main_process,
                            resumed_step=self.start_step if resume_from else None, accelerator=accelerator)

    def train(self) -> dict[str, float]:
        cfg, accelerator, policy = self.cfg, self.accelerator, self.policy
        collectives, is_main = Collectives.of(accelerator), accelerator.is_main_process
        progress = tqdm(total=cfg.ppo.steps, initial=self.start_step, desc="PPO", unit="step", disable=not is_main)
        stats: dict[str, float] = {}
        for step in range(self.start_step + 1, cfg.ppo.steps + 1):
            started = time.perf_counter()
            # 1. Trajectory: this process's rows, then the global batch on every process.
            batch = self.prompts.select(self.stream.next_rows())
            local, info = make_experience(policy, self.tokenizer, batch, self.reward_fn, cfg, accelerator, random)
            trajectory = gather_trajectory(local, collectives, self.tokenizer.pad_token_id)

            # 2-5. Rewards, advantages, PPO epochs over mini-batches, KL controller.
            update_started = time.perf_counter()
            stats = ppo_step(policy, self.optimizer, trajectory, self.kl_ctl, self.shaper, cfg.ppo, self.estimator,
                             accelerator=accelerator, generator=self.shuffle)

            # 6. Log.
            stats.update(rollout_stats(trajectory, info, collectives))
            stats.update({"time/update": time.perf_counter() - update_started, "time/step": time.perf_counter() - started})
            if torch.cuda.is_available():
                stats["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.log.write({"step": step, **stats})  # and to the trackers
            if is_main:
                progress.update(1)
                progress.set_postfix(reward=f"{stats['env/reward_mean']:.3f}", kl=f"{stats['objective/kl']:.3f}")
                if step % cfg.ppo.log_every_steps == 0:
                    log_samples(step, local, info)
            write_debug_record(cfg.debug_dir, accelerator, policy, step, info.prompt_ids)

            # 7. Checkpoint periodically, and on a stop signal (then exit for the scheduler to requeue).
            preempted = self.stop.should_stop(accelerator)
            if step % cfg.ppo.save_every_steps == 0 or preempted:
                self.save_checkpoint(step)
            if preempted:
                if is_main:
                    log.warning("stopped by a signal after step %d; checkpoint written, exiting with status %d",
                                step, PREEMPTED_EXIT_CODE)
                raise SystemExit(PREEMPTED_EXIT_CODE)
        progress.close()

        self.save_policy(self.out / "adapter", self.tokenizer)
        if is_main:
            log.info("PPO done: adapter written to %s", self.out / "adapter")
        accelerator.wait_for_everyone()
        return stats

    def save_policy(self, directory: Path, tokenizer: Any = None) -> None:
        """The adapter (and value head, if any), from the main process; every process calls it (ZeRO-3 gathers them)."""
        with gathered_trainable(self.accelerator, self.policy):
            if self.accelerator.is_main_process:
                unwrapped = self.accelerator.unwrap_model(self.policy)
                save_directory(directory, lambda tmp: save_policy(unwrapped, tmp, tokenizer))

    def save_checkpoint(self, step: int) -> None:
        """Trainable weights, optimizer and RNG states, KL controller, score statistics, step and data position."""
        # No LR scheduler: the classic TRL PPO trainer (and ppo.learning_rate) keeps the rate constant.
        state = {"step": step, "data": self.stream.state_dict(), "kl_controller": self.kl_ctl.state_dict(),
                 "scores": self.shaper.state_dict()}
        save_checkpoint(self.out / "checkpoints", step, self.accelerator, self.policy, self.optimizer, state,
                        lambda directory: self.save_policy(directory / POLICY_DIR), self.cfg.ppo.keep_checkpoints,
                        settings=settings_of(self.cfg), shuffle=self.shuffle)

    def cleanup(self) -> None:
        """Also after an error, so no barrier here: a process that failed alone must exit, not wait for the others."""
        self.stop.restore()
        if self.reward_fn is not None:
            self.reward_fn.close()
        if self.accelerator is not None:
            self.policy = self.optimizer = None  # before the process group: see end_training
            end_training(self.accelerator)


def ppo_step(policy: Any, optimizer: Any, trajectory: Trajectory, kl_ctl: Any, shaper: ScoreShaper, cfg: PPOConfig,
             estimator: Estimator, *, accelerator: Any = None,
             generator: Optional[torch.Generator] = None) -> dict[str, float]:
    """Steps 2-5 on the global batch `trajectory` (the same on every process; a prompt's k samples in consecutive
    rows); returns TRL-named stats. Without an accelerator it runs as one plain process."""
    collectives = Collectives.of(accelerator)
    check_batch_sizes(cfg.batch_size, cfg.mini_batch_size, cfg.gradient_accumulation_steps, collectives.world_size,
                      len(trajectory))
    if accelerator is not None and accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ConfigError("build the Accelerator with gradient_accumulation_steps=ppo.gradient_accumulation_steps")
    if (trajectory.values is not None) != estimator.uses_value_head:
        raise ConfigError(f"the {estimator.name} estimator {'needs' if estimator.uses_value_head else 'builds no'} "
                          "value head, but the trajectory's policy " + ("has none" if trajectory.values is None
                                                                        else "has one"))
    estimator.check_groups(trajectory.query_ids)
    started, kl_coef = time.perf_counter(), kl_ctl.value
    # 2-3. Rewards (shaped scores, the KL penalty unless it is in the loss) and advantages: GAE whitened over the
    # whole batch, or a summary's reward against its prompt's other samples (rloo, group).
    scores = shaper(trajectory.scores)
    targets = estimator.advantages(trajectory, scores, kl_coef)
    # 4. PPO epochs over mini-batches.
    minibatch_stats = ppo_epochs(policy, optimizer, trajectory, targets, estimator, kl_coef, cfg, accelerator,
                                 collectives, generator)
    stats = step_stats(trajectory, scores, targets.kls, targets.non_score_rewards, kl_coef, minibatch_stats)
    # 5. The KL controller, counting the global batch.
    kl_ctl.update(stats["objective/kl"], cfg.batch_size)
    stats["ppo/learning_rate"] = optimizer.param_groups[0]["lr"]
    stats["time/ppo/total"] = time.perf_counter() - started
    return stats


def ppo_epochs(policy, optimizer, trajectory: Trajectory, targets: Advantages, estimator: Estimator, kl_coef: float,
               cfg: PPOConfig, accelerator: Any, collectives: Collectives,
               generator: Optional[torch.Generator]) -> list[dict[str, torch.Tensor]]:
    """Step 4: `ppo_epochs` passes over the global batch in an order shared by every process; each mini-batch of
    `mini_batch_size` rows is cut into equal contiguous shares and process p computes share p. The loss is the
    mini-batch's global token mean (`ppo_loss`, with the estimator's parts). Dropout is off, as in TRL, so the first
    ratio is exactly 1."""
    if generator is None and collectives.world_size > 1:
        raise ConfigError("several processes need one mini-batch order: pass a generator seeded alike on every process")
    share, rank = cfg.mini_batch_size // collectives.world_size, collectives.rank
    params = [p for p in policy.parameters() if p.requires_grad]
    loop = accelerator if accelerator is not None else PlainAccumulation(cfg.gradient_accumulation_steps)
    was_training = policy.training
    policy.eval()
    all_stats = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(trajectory), generator=generator).to(trajectory.scores.device)
        for start in range(0, len(trajectory), cfg.mini_batch_size):
            rows = order[start : start + cfg.mini_batch_size]
            mine = rows[rank * share : (rank + 1) * share]
            # accumulate() skips the gradient all-reduce until the last mini-batch of an accumulation.
            with loop.accumulate(policy):
                part = trajectory.select(mine).trimmed()
                with record_function("ppo/forward"):
                    logits, logprobs, vpreds, _ = policy_forward(policy, part, cfg.trl_first_token_mask)
                    columns = (mine, slice(logprobs.shape[1]))  # this share's own width; the rest is masked out
                    loss, stats = ppo_loss(
                        part.logprobs, select_rows(targets.values, columns), logprobs, vpreds, logits, part.masks,
                        targets.advantages[columns], select_rows(targets.returns, columns), cliprange=cfg.cliprange,
                        cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef, ratio_threshold=cfg.ratio_threshold,
                        token_count=float(trajectory.masks[rows].sum()), all_reduce_sum=collectives.all_reduce_sum,
                        gradient_averaged_over=collectives.world_size,
                        ref_logprobs=part.ref_logprobs if estimator.kl_in_loss else None, kl_coef=kl_coef,
                    )
                with record_function("ppo/backward"):
                    loop.backward(loss)  # divides by the accumulation steps
                with record_function("ppo/optimizer_step"):
                    if loop.sync_gradients and cfg.max_grad_norm is not None:  # DeepSpeed clips in its own step
                        loop.clip_grad_norm_(params, cfg.max_grad_norm)
                    if loop.sync_gradients:
                        optimizer.step()
                        optimizer.zero_grad()
            stats.update(trajectory_minibatch_stats(select_rows(targets.values, rows), targets.advantages[rows],
                                                    select_rows(targets.returns, rows), trajectory.masks[rows]))
            all_stats.append(stats)
    policy.train(was_training)
    return all_stats


if __name__ == "__main__":
    run_cli(main)
