"""PPO detoxification of a LoRA-adapted seq2seq policy against a hate-speech reward model.

Usage:
    python -m train.ppo --config configs/tiny.yaml
    python -m train.ppo --config configs/tiny.yaml --resume            # continue from the newest checkpoint
    python -m train.ppo --config configs/flan_t5_base.yaml --model.adapter runs/flan-t5-base/sft/adapter
    accelerate launch --multi_gpu --num_processes 2 -m train.ppo --config configs/flan_t5_base.yaml
    accelerate launch --config_file accelerate_configs/X.yaml -m train.ppo --config ...   # e.g. DeepSpeed ZeRO-2/3

Each PPO step, read top to bottom in `main`:
  1. rollout: this process's shard of the global batch of prompts, generated in batches (train/rollout.py);
  2. score: the reward model on the summaries (in-process on `reward.device` or the server at `reward.url`);
  3-6. `ppo_step` (train/ppo_core.py): log-probs/values and reference log-probs (adapter off, or the frozen
     starting adapter with `ppo.reference: initial_adapter`), KL-penalised rewards, GAE advantages, PPO epochs
     over mini-batches (gradients synchronised by accelerate);
  7. log: namespaced stats to `log.jsonl`, TensorBoard and the progress bar;
  8. checkpoint every `ppo.save_every_steps` (and on SIGUSR1/SIGTERM, then exit with status 3).

Writes `<output_dir>/ppo/`: `checkpoints/checkpoint-<step>/`, `adapter/` (final LoRA adapter + value head),
`config.yaml`, `log.jsonl`, `tensorboard/`. Setting the environment variable DETOX_PPO_DEBUG_DIR makes every
process append its prompt ids and a hash of its trainable weights per step to `<dir>/rank<r>.jsonl` (tests use it
to check sharding and that all processes hold the same weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from rewards.reward_fn import make_reward_fn
from train.checkpoint import (
    atomic_checkpoint_dir,
    capture_rng_state,
    checkpoint_path,
    find_resume_checkpoint,
    prune_checkpoints,
    restore_rng_state,
)
from train.cli import config_from_cli, run_cli
from train.config import ExperimentConfig, save_config
from train.data import build_ppo_datasets
from train.errors import ConfigError
from train.models import add_reference_adapter, load_policy, parameter_report, save_policy
from train.ppo_core import make_kl_controller, ppo_step
from train.preemption import PREEMPTED_EXIT_CODE, StopSignal
from train.rollout import PromptStream, RolloutInfo, ScoreShaper, gather_rows, make_rollout

log = logging.getLogger("train.ppo")

KEEP_CHECKPOINTS = 2  # newest complete checkpoints kept on disk
TRAINER_STATE_FILE = "trainer_state.json"
POLICY_DIR = "policy"  # adapter + value head inside a checkpoint
DEBUG_ENV = "DETOX_PPO_DEBUG_DIR"


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    args, cfg = config_from_cli(
        __doc__.splitlines()[0],
        argv,
        lambda p: p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint"),
    )

    # ============================================================================================
    # 1. Reward function, accelerator, output directory
    # ============================================================================================
    ppo_dir = Path(cfg.output_dir) / "ppo"
    ckpt_root = ppo_dir / "checkpoints"
    resume_from = find_resume_checkpoint(ckpt_root, args.resume)
    # The reward model is loaded before the Accelerator exists: under ZeRO-3 every later from_pretrained is
    # partitioned across processes (deepspeed.zero.Init), which is right for the policy but not for a scorer
    # that each process runs whole.
    reward_fn = make_reward_fn(cfg.reward)
    accelerator = Accelerator(
        cpu=use_cpu(),
        gradient_accumulation_steps=cfg.ppo.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(ppo_dir),
    )
    fix_deepspeed_cpu_ranks(accelerator)
    is_main = accelerator.is_main_process
    if is_main:
        log.info("reward model %s (%s)", cfg.reward.model_name_or_path, reward_fn.where)
        ppo_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, ppo_dir / "config.yaml")
        accelerator.init_trackers("tensorboard")
    set_seed(cfg.seed)  # same initial weights on every process

    # ============================================================================================
    # 2. Policy (base + LoRA + value head), its KL reference, and the prompts
    # ============================================================================================
    # On resume the adapter and value head come from the checkpoint; everything else as configured.
    model_cfg = cfg.model if resume_from is None else dataclasses.replace(cfg.model, adapter=str(resume_from / POLICY_DIR))
    policy, tokenizer = load_policy(dataclasses.replace(cfg, model=model_cfg))
    # The reference is the base with the adapter off, or a frozen copy of the adapter this run started from
    # (the configured model.adapter, also on resume). A fresh adapter starts as the base, so both are the base.
    if cfg.ppo.reference == "initial_adapter" and cfg.model.adapter is not None:
        add_reference_adapter(policy, cfg.model.adapter)
    if is_main:
        log.info("KL reference: %s", f"the initial adapter {cfg.model.adapter}" if policy.reference_adapter
                 else "the base model (adapter off)")
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        prompts = build_ppo_datasets(cfg.data, tokenizer)["train"]
    # A seeded order over the prompts; every process takes its own slice of each global batch.
    stream = PromptStream(len(prompts), cfg.ppo.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)
    if is_main:
        log.info("%d PPO prompts; %s", len(prompts), parameter_report(policy).format().replace("\n", "; "))

    # ============================================================================================
    # 3. Optimizer (TRL's Adam on the trainable parameters), KL controller, score shaping, resume
    # ============================================================================================
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.ppo.learning_rate)
    configure_deepspeed_batch(accelerator, cfg)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    kl_ctl = make_kl_controller(cfg.ppo)
    shaper = ScoreShaper(cfg)
    # Different samples on each process, reproducible per process; the mini-batch shuffle has its own generator.
    set_seed(cfg.seed + accelerator.process_index)
    shuffle_generator = torch.Generator().manual_seed(cfg.seed)
    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, accelerator, optimizer, kl_ctl, shaper, stream, shuffle_generator)
        if is_main:
            log.info("resumed from %s at step %d", resume_from, start_step)
    elif args.resume and is_main:
        log.info("--resume: no checkpoint under %s, starting fresh", ckpt_root)
    if is_main:  # drop lines an interrupted run logged after its last checkpoint (all of them when fresh)
        truncate_log(ppo_dir / "log.jsonl", start_step)

    # ============================================================================================
    # 4. Train: rollout -> score -> PPO update -> log -> checkpoint
    # ============================================================================================
    stop = StopSignal()
    debug_dir = os.environ.get(DEBUG_ENV)
    progress = tqdm(total=cfg.ppo.steps, initial=start_step, desc="PPO", unit="step", disable=not is_main)
    stats: dict[str, float] = {}
    preempted = False
    for step in range(start_step, cfg.ppo.steps):
        step_started = time.perf_counter()
        # 1-2. Rollout and scores for this process's prompts.
        batch = prompts.select(stream.next_rows())
        rollout, info = make_rollout(policy, tokenizer, batch, reward_fn, shaper, cfg, accelerator, random)

        # 3-6. KL-penalised rewards, advantages, PPO epochs over mini-batches, KL controller update.
        update_started = time.perf_counter()
        stats = ppo_step(policy, optimizer, rollout, kl_ctl, cfg.ppo, accelerator=accelerator, generator=shuffle_generator)
        time_update = time.perf_counter() - update_started

        # 7. Log.
        stats.update(rollout_stats(info, accelerator))
        stats.update({"time/update": time_update, "time/step": time.perf_counter() - step_started})
        done = step + 1
        if is_main:
            write_log(ppo_dir / "log.jsonl", done, stats)
            accelerator.log(stats, step=done)
            progress.update(1)
            progress.set_postfix(reward=f"{stats['env/reward_mean']:.3f}", kl=f"{stats['objective/kl']:.3f}")
            if done % max(cfg.ppo.log_every_steps, 1) == 0:
                log_samples(done, batch, info)
        if debug_dir:
            write_debug(Path(debug_dir), accelerator, policy, done, info)

        # 8. Checkpoint periodically, and on a stop signal (then exit for the scheduler to requeue).
        preempted = stop.should_stop(accelerator)
        if done % cfg.ppo.save_every_steps == 0 or preempted:
            save_checkpoint(ckpt_root, done, accelerator, policy, optimizer, kl_ctl, shaper, stream, shuffle_generator)
        if preempted:
            if is_main:
                log.warning("stopped by a signal after step %d; checkpoint written, exiting with status %d",
                            done, PREEMPTED_EXIT_CODE)
            break
    progress.close()
    stop.restore()

    # ============================================================================================
    # 5. Save the final adapter and value head
    # ============================================================================================
    if not preempted:
        with gathered_trainable(accelerator, policy):
            if is_main:
                save_final_adapter(accelerator.unwrap_model(policy), tokenizer, ppo_dir / "adapter")
        if is_main:
            log.info("PPO done: adapter written to %s", ppo_dir / "adapter")
    reward_fn.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if preempted:
        raise SystemExit(PREEMPTED_EXIT_CODE)
    return stats


# ----------------------------------------------------------------------------------------------------
# Setup helpers


def use_cpu() -> bool:
    """Accelerator(cpu=...): CPU without CUDA, except under DeepSpeed, which brings its own accelerator
    (DS_ACCELERATOR=cpu) and refuses accelerate's plain CPU mode."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return False
    return not torch.cuda.is_available()


def fix_deepspeed_cpu_ranks(accelerator: Accelerator) -> None:
    """Under DeepSpeed on CPU (DS_ACCELERATOR=cpu) accelerate 1.15 finds no GPU backend and reports one process of
    rank 0 everywhere, although DeepSpeed has initialised torch.distributed (gloo) over all of them. Take the ranks
    from torch.distributed so sharding, main-process side effects and collectives are right."""
    if accelerator.state.deepspeed_plugin is None or not torch.distributed.is_initialized():
        return
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if accelerator.num_processes == world:
        return
    from accelerate.state import PartialState

    for state in (PartialState(), accelerator.state):  # both keep their own shared copy
        state.num_processes, state.process_index = world, rank
        state.local_process_index = int(os.environ.get("LOCAL_RANK", rank))


def configure_deepspeed_batch(accelerator: Accelerator, cfg: ExperimentConfig) -> None:
    """DeepSpeed wants a micro-batch size, which it usually reads from a dataloader; PPO has none (as TRL did)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds_config = plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = cfg.ppo.mini_batch_size // accelerator.num_processes
    ds_config["gradient_accumulation_steps"] = cfg.ppo.gradient_accumulation_steps
    ds_config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    if cfg.ppo.max_grad_norm is not None:
        ds_config["gradient_clipping"] = cfg.ppo.max_grad_norm


# ----------------------------------------------------------------------------------------------------
# Logging


def rollout_stats(info: RolloutInfo, accelerator: Accelerator) -> dict[str, float]:
    """Reward, toxicity, response length and timing stats over the global batch."""
    local = torch.stack([info.raw_rewards, info.toxicity, info.response_lengths], dim=1).to(accelerator.device)
    rewards, toxicity, lengths = gather_rows(local, accelerator).float().cpu().unbind(dim=1)
    timings = torch.tensor([info.time_generate, info.time_score], device=accelerator.device)
    timings = accelerator.reduce(timings, reduction="mean").cpu() if accelerator.num_processes > 1 else timings.cpu()
    return {
        "env/reward_mean": rewards.mean().item(),
        "env/reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "env/toxicity_mean": toxicity.mean().item(),
        "tokens/response_len": lengths.mean().item(),
        "time/generate": timings[0].item(),
        "time/score": timings[1].item(),
    }


def write_log(path: Path, step: int, stats: dict[str, float]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **stats}) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after `step` (written by the interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def log_samples(step: int, batch: Any, info: RolloutInfo, count: int = 2) -> None:
    for i in range(min(count, len(info.summaries))):
        log.info("step %d sample %s: reward %.3f, toxicity %.3f: %r", step, batch["id"][i],
                 info.raw_rewards[i].item(), info.toxicity[i].item(), info.summaries[i][:200])


def trainable_hash(policy: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in policy.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_debug(directory: Path, accelerator: Accelerator, policy: Any, step: int, info: RolloutInfo) -> None:
    with gathered_trainable(accelerator, policy):
        digest = trainable_hash(accelerator.unwrap_model(policy))
    directory.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "prompt_ids": info.prompt_ids, "params_sha256": digest}
    with open(directory / f"rank{accelerator.process_index}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


@contextmanager
def gathered_trainable(accelerator: Accelerator, policy: Any) -> Iterator[None]:
    """Full trainable parameters on every process for saving/hashing (a no-op unless DeepSpeed ZeRO-3).
    Every process must enter it (the gather is collective)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    import deepspeed

    params = [p for p in accelerator.unwrap_model(policy).parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def save_final_adapter(policy: Any, tokenizer: Any, directory: Path) -> None:
    """`save_policy` into a temporary sibling, then swap it in: a kill never leaves half an adapter."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tmp, tokenizer)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def save_checkpoint(
    root: Path,
    step: int,
    accelerator: Accelerator,
    policy: Any,
    optimizer: Any,
    kl_ctl: Any,
    shaper: ScoreShaper,
    stream: PromptStream,
    shuffle_generator: torch.Generator,
) -> Path:
    """Trainable weights, optimizer, KL controller, score statistics, RNG states (per process), step and data
    position, written atomically (see train/checkpoint.py). Every process must call it."""
    rank, is_main = accelerator.process_index, accelerator.is_main_process
    final = checkpoint_path(root, step)
    with atomic_checkpoint_dir(final, is_main) as tmp:
        accelerator.wait_for_everyone()  # the main process has created `tmp`
        with gathered_trainable(accelerator, policy):
            if is_main:
                save_policy(accelerator.unwrap_model(policy), tmp / POLICY_DIR)
        if _is_deepspeed(accelerator):  # ZeRO partitions the optimizer state: one file per process
            torch.save(optimizer.state_dict(), tmp / f"optimizer-rank{rank}.pt")
        elif is_main:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"global": capture_rng_state(), "shuffle": shuffle_generator.get_state()}
        torch.save(rng, tmp / f"rng-rank{rank}.pt")
        if is_main:
            state = {
                "step": step,
                "num_processes": accelerator.num_processes,
                "data": stream.state_dict(),
                "kl_controller": kl_ctl.state_dict(),
                "scores": shaper.state_dict(),
                # No LR scheduler: the classic TRL PPO trainer (and ppo.learning_rate) keeps the rate constant.
                "scheduler": None,
            }
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()  # every process has written before the main process renames
    if is_main:
        prune_checkpoints(root, KEEP_CHECKPOINTS)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    directory: Path,
    accelerator: Accelerator,
    optimizer: Any,
    kl_ctl: Any,
    shaper: ScoreShaper,
    stream: PromptStream,
    shuffle_generator: torch.Generator,
) -> int:
    """Restore everything but the weights (loaded with the policy) from `directory`; returns the step."""
    state = json.loads((directory / TRAINER_STATE_FILE).read_text())
    rank = accelerator.process_index
    if state["num_processes"] != accelerator.num_processes:
        raise ConfigError(
            f"{directory} was written by {state['num_processes']} processes but this run has "
            f"{accelerator.num_processes}: resume with the same number of processes"
        )
    if _is_deepspeed(accelerator):
        files = [directory / f"optimizer-rank{r}.pt" for r in range(accelerator.num_processes)]
        optimizer.load_state_dict([torch.load(f, map_location="cpu", weights_only=False) for f in files])
    else:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    kl_ctl.load_state_dict(state["kl_controller"])
    shaper.load_state_dict(state["scores"])
    stream.load_state_dict(state["data"])
    # Python/numpy RNG states are pickled tuples, so these files are not weights_only-loadable; we wrote them.
    rng = torch.load(directory / f"rng-rank{rank}.pt", weights_only=False)
    restore_rng_state(rng["global"])
    shuffle_generator.set_state(rng["shuffle"])
    return int(state["step"])


if __name__ == "__main__":
    run_cli(main)
