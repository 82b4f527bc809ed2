"""LoRA supervised fine-tuning of FLAN-T5 on DialogSum: trains the adapter that PPO starts from.

Usage:
    python -m train.sft --config configs/tiny.yaml
    python -m train.sft --config configs/flan_t5_base.yaml --data.path ../shared/data/dialogsum
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m train.sft --config configs/tiny.yaml
    accelerate launch --config_file accelerate_configs/<ddp|zero2|zero3>.yaml -m train.sft --config FILE
    python -m train.sft --config configs/tiny.yaml --resume          # continue after a kill or preemption

Writes `<output_dir>/sft/`: `checkpoints/checkpoint-<step>/`, `adapter/` (peft `save_pretrained`, safetensors),
`config.yaml` (resolved config), `metrics.json` and `log.jsonl` (one JSON object per logged step / evaluation), and
the trackers' `tensorboard/` or `wandb/` (`trackers`, which get the numbers of log.jsonl; train/trackers.py).

The global batch: `sft.batch_size` counts examples over all processes (each takes an equal share of every batch;
the last incomplete batch of an epoch is dropped), and the loss of an optimisation step is the mean over all its
label tokens on all processes and accumulation steps. So N processes compute the 1-process update on the same
examples (up to float rounding; tests/train/test_sft_distributed.py).
Export a merged model afterwards with `python -m train.merge_adapter`.

Why a short accelerate loop rather than transformers' Seq2SeqTrainer: both get DDP and DeepSpeed ZeRO-2/3 from
`accelerate launch`, but the project's guarantees (atomic checkpoints holding only trainable weights, shared with
PPO; a preemption check every optimisation step; the same loop shape as `train.ppo`) would each need a Trainer
callback or override, while here they are a few visible lines. The loop reads top to bottom:
data -> model -> optimizer/scheduler -> train with periodic evaluation and checkpoints -> save.

Precision: the base model is loaded in `model.dtype`; peft keeps the LoRA weights in float32, so the optimizer
updates full-precision weights. On CUDA with a bfloat16 model the forward pass runs under bf16 autocast; on CPU,
or with a float32 model, there is no autocast.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, get_scheduler

from train.atomic import save_directory, write_text
from train.checkpoint import check_same_checkpoint, find_resume_checkpoint, load_checkpoint, load_tensors, save_checkpoint
from train.cli import config_from_cli, run_cli
from train.config import ExperimentConfig, save_config
from train.data import build_eval_dataset, build_sft_datasets
from train.debug import write_debug_record
from train.distributed import (
    Collectives, configure_deepspeed, end_training, fix_deepspeed_cpu_ranks, gathered_trainable, use_cpu,
)
from train.errors import ConfigError, DataError
from train.generation import generate_texts
from train.models import apply_lora, load_base_model, load_tokenizer
from train.param_report import parameter_report
from train.preemption import PREEMPTED_EXIT_CODE, StopSignal
from train.rouge import compute_rouge
from train.resume import add_resume_arguments, apply_optimizer_settings, check_resume_settings, record_resume, settings_of
from train.run_log import JsonlLog
from train.trackers import check_tracker_packages, make_trackers, start_trackers

log = logging.getLogger("train.sft")

LABEL_PAD = -100  # ignored by the loss
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCHEDULER_FILE = "scheduler.pt"


@dataclass
class TrainerState:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimisation steps done
    epoch: int = 0  # current pass over the training set
    batches_in_epoch: int = 0  # batches of `epoch` already consumed by each process
    best_eval_loss: float = math.inf
    evals_without_improvement: int = 0
    num_processes: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation so far


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args, cfg = config_from_cli(__doc__.splitlines()[0], argv, add_resume_arguments)
    s = cfg.sft
    check_tracker_packages(cfg)
    sft_dir = Path(cfg.output_dir) / "sft"
    checkpoints = sft_dir / "checkpoints"
    resume_from = find_resume_checkpoint(checkpoints, args.resume or args.resume_with_changes)
    changes = check_resume_settings(resume_from, cfg, "sft", args.resume_with_changes)  # before config.yaml is rewritten

    use_bf16 = torch.cuda.is_available() and cfg.model.dtype == "bfloat16"
    accelerator = Accelerator(
        cpu=use_cpu(),
        mixed_precision="bf16" if use_bf16 else None,  # None: as launched (e.g. accelerate launch --mixed_precision)
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        # The same shuffled order on every process, reproducible per epoch; each batch (global) is split evenly.
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.seed),
        log_with=make_trackers(cfg, "sft", resume_from),
    )
    fix_deepspeed_cpu_ranks(accelerator)
    check_same_checkpoint(accelerator, resume_from)
    collectives = Collectives.of(accelerator)
    if s.batch_size % accelerator.num_processes:
        raise ConfigError(f"sft.batch_size ({s.batch_size}) is global and must be a multiple of the number of "
                          f"processes ({accelerator.num_processes})")
    start_trackers(accelerator, cfg, "sft")  # before seeding: whatever a tracker draws cannot shift our random streams
    torch.manual_seed(cfg.seed)
    stop = StopSignal()
    main_process = accelerator.is_main_process
    if main_process:
        sft_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, sft_dir / "config.yaml")

    # 1. Data: tokenized train/validation examples (filtered as the original notebook did), plus a validation sample for ROUGE.
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():  # tokenizing once fills the datasets cache for the other processes
        datasets = build_sft_datasets(cfg.data, tokenizer)
        rouge_examples = (
            build_eval_dataset(cfg.data, "validation", s.eval_rouge_examples) if s.eval_rouge_examples else None
        )
    train_set = datasets["train"].add_column("row", list(range(len(datasets["train"]))))
    collate = PaddingCollator(tokenizer)
    # Loaders draw their seeds from their own generators, never from the global RNG that dropout uses: a resumed
    # run starts a new data iterator where the uninterrupted run did not, and must still see the same dropout.
    if len(train_set) < s.batch_size:
        raise DataError(f"only {len(train_set)} SFT training examples for sft.batch_size {s.batch_size}: "
                        "raise data.max_examples or lower sft.batch_size")
    # drop_last: every step is a full global batch, split evenly whatever the number of processes.
    train_loader = DataLoader(train_set, batch_size=s.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(datasets["validation"], batch_size=s.batch_size, collate_fn=collate,
                            generator=torch.Generator().manual_seed(cfg.seed))

    # 2. Model: base + LoRA (fresh from `lora`, `model.adapter` to continue one, or the checkpoint's on resume).
    base = load_base_model(cfg.model)
    model = apply_lora(base, cfg.lora, adapter=str(resume_from) if resume_from else cfg.model.adapter)
    params = parameter_report(model)
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", params.trainable, params.total, params.percent)

    # 3. Optimizer and schedule (stepped once per optimisation step, whatever the number of processes).
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=s.learning_rate, weight_decay=s.weight_decay
    )
    configure_deepspeed(accelerator, s.batch_size // accelerator.num_processes, s.gradient_accumulation_steps,
                        s.max_grad_norm or None)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / s.gradient_accumulation_steps)
    total_steps = s.max_steps or max(1, math.ceil(s.num_epochs * steps_per_epoch))
    scheduler = get_scheduler(
        "constant_with_warmup" if s.lr_scheduler == "constant" else s.lr_scheduler,
        optimizer,
        num_warmup_steps=round(s.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    state = TrainerState(num_processes=accelerator.num_processes)
    if resume_from is not None:
        state = TrainerState(**load_checkpoint(resume_from, accelerator, model, optimizer))
        scheduler.load_state_dict(load_tensors(resume_from / SCHEDULER_FILE))
        # The restored optimizer holds the checkpoint's rate and decay; the run's own apply (the same unless changed).
        apply_optimizer_settings(optimizer, s.learning_rate, s.weight_decay, scheduler)
        if main_process:
            log.info("resumed from %s at step %d of %d", resume_from, state.step, total_steps)
            record_resume(sft_dir, state.step, resume_from, changes)
    logger = JsonlLog(sft_dir / "log.jsonl", main_process, resumed_step=state.step if resume_from else None,
                      accelerator=accelerator)  # log.jsonl and the trackers

    def evaluate() -> dict[str, Any]:
        record = {"step": state.step, "eval/loss": validation_loss(model, val_loader, accelerator)}
        if rouge_examples is not None:
            record.update(validation_rouge(model, tokenizer, rouge_examples, cfg, accelerator))
        logger.write(record)
        log.info("step %d: validation loss %.4f", state.step, record["eval/loss"])
        state.history.append(record)
        return record

    def checkpoint() -> None:
        def write_weights(directory: Path) -> None:  # the adapter (gathered under ZeRO-3) and the LR schedule
            save_adapter(model, accelerator, directory, replace=False)
            if main_process:
                torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)

        save_checkpoint(checkpoints, state.step, accelerator, model, optimizer, asdict(state), write_weights,
                        s.keep_checkpoints, settings=settings_of(cfg))

    # 4. Train: evaluate first (the zero-step baseline), then every eval_every_steps; checkpoint every save_every_steps.
    if state.step == 0 and not state.history:
        state.best_eval_loss = evaluate()["eval/loss"]
    model.train()
    progress = tqdm(total=total_steps, initial=state.step, desc="sft", disable=not main_process, unit="step")
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (summed token loss, tokens) since the last log line
    step_rows: list[int] = []  # this process's training-set rows in the current step
    stopped_early = preempted = False
    started, start_step = time.perf_counter(), state.step
    while state.step < total_steps and not (stopped_early or preempted):
        train_loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for window in accumulation_windows(batches, s.gradient_accumulation_steps):
            # The step's loss is the mean over the label tokens of all its batches on all processes.
            local_tokens = torch.stack([(b["labels"] != LABEL_PAD).sum() for b in window]).sum()
            tokens = collectives.all_reduce_sum(local_tokens)
            for i, batch in enumerate(window):
                rows = batch.pop("row")
                # The step ends with its window's last batch, also in a shorter window at the end of an epoch
                # (accelerate's accumulate() would sync every batch of a window fetched to the end of the loader).
                accelerator.sync_gradients = i == len(window) - 1
                with nullcontext() if accelerator.sync_gradients else accelerator.no_sync(model):
                    nll = summed_token_loss(model, batch)
                    # DDP/DeepSpeed average gradients over processes and accelerate divides by the accumulation
                    # steps: the two factors undo that, so the gradient is that of the global token mean.
                    accelerator.backward(nll * collectives.world_size * s.gradient_accumulation_steps / tokens.float())
                    if accelerator.sync_gradients:
                        if s.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad()
                state.batches_in_epoch += 1
                loss_sum[0] += nll.detach().double().cpu()
                step_rows += rows.tolist()
            loss_sum[1] += local_tokens.double().cpu()
            scheduler.step()
            state.step += 1
            progress.update(1)

            write_debug_record(cfg.debug_dir, accelerator, model, state.step, step_rows)  # training-set rows
            step_rows = []
            if state.step % s.log_every_steps == 0 or state.step == total_steps:
                total = collectives.all_reduce_sum(loss_sum)
                logger.write({"step": state.step, "train/loss": (total[0] / total[1]).item(),
                              "train/lr": scheduler.get_last_lr()[0], "train/epoch": state.epoch})
                loss_sum.zero_()
            if state.step % s.eval_every_steps == 0 or state.step == total_steps:
                stopped_early = update_early_stopping(state, evaluate()["eval/loss"], s.early_stopping_patience)
                model.train()
            preempted = stop.should_stop(accelerator)
            if state.step % s.save_every_steps == 0 or state.step == total_steps or stopped_early or preempted:
                checkpoint()
            if state.step >= total_steps or stopped_early or preempted:
                break
        else:  # the epoch ran to its end
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()
    seconds = time.perf_counter() - started

    if preempted:
        log.warning("stopped by a signal at step %d; rerun with --resume to continue", state.step)
        accelerator.wait_for_everyone()
        model = optimizer = scheduler = train_loader = val_loader = None  # before the process group: see end_training
        end_training(accelerator)
        sys.exit(PREEMPTED_EXIT_CODE)
    if stopped_early:
        log.info("early stop at step %d: no validation improvement in %d evaluations", state.step, s.early_stopping_patience)

    # 5. Save the final adapter and the metrics.
    save_adapter(model, accelerator, sft_dir / "adapter")
    steps_run = state.step - start_step
    metrics = {
        "steps": state.step,
        "total_steps": total_steps,
        "stopped_early": stopped_early,
        "num_processes": accelerator.num_processes,
        "trainable_parameters": params.trainable,
        "initial_eval": state.history[0],
        "final_eval": state.history[-1],
        "best_eval_loss": state.best_eval_loss,
        "train_seconds": round(seconds, 2),
        "train_examples_per_second": round(
            steps_run * s.batch_size * s.gradient_accumulation_steps / seconds, 2
        ) if seconds > 0 else None,
        "history": state.history,
    }
    if main_process:
        write_json(sft_dir / "metrics.json", metrics)
        first, last = state.history[0]["eval/loss"], state.history[-1]["eval/loss"]
        print(f"\nSFT done: {state.step} steps, validation loss {first:.4f} -> {last:.4f}; adapter: {sft_dir / 'adapter'}")
    accelerator.wait_for_everyone()
    model = optimizer = scheduler = train_loader = val_loader = None  # before the process group: see end_training
    end_training(accelerator)
    return metrics


# ----------------------------------------------------------------------------------------------------
# Settings and resume


def update_early_stopping(state: TrainerState, eval_loss: float, patience: Optional[int]) -> bool:
    """Track the best validation loss; True when `patience` evaluations in a row did not improve on it."""
    if eval_loss < state.best_eval_loss:
        state.best_eval_loss = eval_loss
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    return patience is not None and state.evals_without_improvement >= patience


# ----------------------------------------------------------------------------------------------------
# Data and loss


def accumulation_windows(batches, size: int):
    """The batches of one optimisation step at a time (`size` of them; fewer at the end of an epoch)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the label tokens of `batch` (the model's own loss is their mean)."""
    logits = model(**batch).logits
    return F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=LABEL_PAD, reduction="sum")


class PaddingCollator:
    """Pads prompts with the tokenizer's pad token and labels with -100; carries the `row` index along."""

    def __init__(self, tokenizer):
        self.pad = DataCollatorForSeq2Seq(
            tokenizer, label_pad_token_id=LABEL_PAD, pad_to_multiple_of=8 if torch.cuda.is_available() else None
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad([{k: v for k, v in f.items() if k != "row"} for f in features])
        if "row" in features[0]:
            batch["row"] = torch.tensor([f["row"] for f in features])
        return batch


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def validation_loss(model, loader: DataLoader, accelerator: Accelerator) -> float:
    """Mean token-level cross-entropy over the whole validation split (each process scores its shard)."""
    model.eval()
    nll_total = tokens_total = 0.0
    for batch in loader:
        logits = model(**batch).logits
        labels = batch["labels"]
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=LABEL_PAD, reduction="none").sum(1)
        tokens = (labels != LABEL_PAD).sum(1)
        nll, tokens = Collectives.of(accelerator).gather_for_metrics(nll, tokens)  # without an uneven batch's padding
        nll_total += nll.sum().item()
        tokens_total += tokens.sum().item()
    return nll_total / max(tokens_total, 1)


def validation_rouge(model, tokenizer, examples, cfg: ExperimentConfig, accelerator: Accelerator) -> dict[str, Any]:
    """Greedy (`eval.generation`) summaries of the validation sample, split across processes; ROUGE and 2 samples."""
    model.eval()
    prompts = examples["prompt"]
    # Equal shares (the last padded) keep the processes in step: under ZeRO-3 every generate() is collective.
    with accelerator.split_between_processes(list(range(len(prompts))), apply_padding=True) as mine:
        predictions = generate_texts(
            accelerator.unwrap_model(model), tokenizer, [prompts[i] for i in mine], cfg.eval.generation,
            cfg.data.max_prompt_tokens, accelerator.device, progress=False,
        )
    predictions = gather_object(predictions)[: len(prompts)]
    rouge = compute_rouge(predictions, examples["human_summaries"])
    record: dict[str, Any] = {f"eval/{k}": v for k, v in rouge.mean.items()}
    record["eval/samples"] = [{"id": i, "prediction": p} for i, p in zip(examples["id"][:2], predictions[:2])]
    return record


# ----------------------------------------------------------------------------------------------------
# Checkpoints and outputs


def save_adapter(model, accelerator: Accelerator, directory: Path, replace: bool = True) -> None:
    """peft `save_pretrained` (adapter_model.safetensors + adapter_config.json) from the main process. Every
    process must call it: under ZeRO-3 the trainable weights are gathered first. `replace`: written aside and
    renamed into place (the final adapter); else straight into `directory` (a checkpoint being written)."""
    with gathered_trainable(accelerator, model):
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)

            def write(target: Path) -> None:  # frozen base embeddings/head are not adapter weights
                unwrapped.save_pretrained(str(target), safe_serialization=True, save_embedding_layers=False)

            if replace:
                save_directory(directory, write)
            else:
                write(directory)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2))


if __name__ == "__main__":
    run_cli(main)
