"""Evaluation: the base model, the SFT adapter and the PPO adapter on the same examples, on one process or many.

The one evaluation command: the zero-shot baseline is the system `base`, a zero-shot vs SFT table is two systems.

Usage:
    python -m eval.evaluate --config configs/tiny.yaml                      # base, sft and ppo of the run
    python -m eval.evaluate --config configs/tiny.yaml --eval.systems base  # zero-shot baseline only
    python -m eval.evaluate --config configs/tiny.yaml --eval.systems base,sft=runs/tiny/sft/adapter
    accelerate launch --num_processes 8 -m eval.evaluate --config configs/flan_t5_base.yaml \\
        --eval.systems base,sft=runs/flan-t5-base/sft/adapter,ppo=runs/flan-t5-base/ppo/adapter

Systems (`eval.systems`) are NAME=ADAPTER_DIR entries; a bare `base` (or NAME=none) is the base model without
adapter. The base model is loaded once per process; every adapter is loaded into it with PEFT
(`load_adapter`) and selected with `set_adapter`, and the base system runs under `disable_adapter()`.
`model.adapter` is not used here: the systems name their adapters. Adapters must be local directories.

Sharding: the split is cut into generation batches of `eval.generation.batch_size` consecutive examples, and
batch k goes to process k % num_processes. Every batch holds the same examples whatever the number of
processes, and each (batch, system) is generated with the seed `seed + k`, so 1 process and N processes give
the same summaries (greedy or sampled) and the same reward inputs. Per-example records are gathered with
`gather_object`, keyed by example index, and checked for duplicates and gaps before anything is written.

Metrics (main process): ROUGE-1/2/L/Lsum against every human summary, toxicity mean and std, reward mean, each
with a bootstrap CI; for every system against the "before" one, the relative change in toxicity, and the
reward and ROUGE differences, with paired bootstrap CIs. Writes `<output_dir>/eval/`: `examples.jsonl`,
`summary.json`, `report.md`, `toxicity.png` and, given a PPO log, `ppo_curves.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm.auto import tqdm

from train.rouge import ROUGE_TYPES, rouge_per_example
from eval.stats import bootstrap_mean, describe, paired_difference, paired_relative_change
from train.atomic import write_text
from train.cli import config_from_cli, run_cli
from train.config import ExperimentConfig, config_to_dict, expand_output_dir
from train.data import build_eval_dataset
from train.errors import ConfigError
from train.generation import generate_texts
from train.models import (
    adapter_load_errors, check_adapter_directory, load_base_model, load_tokenizer, quiet_peft_deprecation,
)

log = logging.getLogger("eval.evaluate")

BASE_ALIASES = ("none", "null", "base", "")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class System:
    """One model to evaluate: the base model (adapter None) or the base plus a LoRA adapter directory."""

    name: str
    adapter: Optional[str]


# ----------------------------------------------------------------------------------------------------
# Systems and settings


def parse_systems(entries: list[str], output_dir: str) -> list[System]:
    """`["base", "ppo={output_dir}/ppo/adapter"]` -> Systems; ConfigError for malformed or duplicate entries."""
    if not entries:
        raise ConfigError("eval.systems is empty: list at least one system, e.g. --eval.systems base,ppo=DIR")
    systems: list[System] = []
    for entry in entries:
        name, sep, adapter = (part.strip() for part in entry.partition("="))
        if not sep:
            if name.lower() != "base":
                raise ConfigError(
                    f"eval.systems entry {entry!r} is not NAME=ADAPTER_DIR: write e.g. 'sft=runs/tiny/sft/adapter', "
                    "or 'base' for the base model without adapter"
                )
            adapter = "none"
        if not _NAME.match(name):
            raise ConfigError(f"eval.systems: system name {name!r} must be letters, digits, '_', '-' or '.'")
        if name in {s.name for s in systems}:
            raise ConfigError(f"eval.systems names {name!r} twice: give every system its own name")
        is_base = adapter.lower() in BASE_ALIASES
        systems.append(System(name, None if is_base else expand_output_dir(adapter, output_dir)))
    return systems


def comparison_pair(systems: list[System], before: Optional[str], after: Optional[str]) -> tuple[str, str]:
    """The (before, after) system names: eval.before / eval.after, defaulting to the first and last systems."""
    names = [s.name for s in systems]
    for key, value in (("eval.before", before), ("eval.after", after)):
        if value is not None and value not in names:
            raise ConfigError(f"{key}={value!r} is not one of the systems being evaluated: {', '.join(names)}")
    return before or names[0], after or names[-1]


def check_adapters(systems: list[System]) -> None:
    """Every adapter must be a local directory with an adapter_config.json, checked before any generation."""
    for system in systems:
        if system.adapter is None:
            continue
        check_adapter_directory(system.adapter, f"system '{system.name}': adapter directory",
                                "train it first (python -m train.sft / train.ppo) or fix --eval.systems "
                                "(NAME=ADAPTER_DIR written by train.sft or train.ppo, or 'base')")


def eval_out_dir(cfg: ExperimentConfig) -> Path:
    """eval.out_dir with "{output_dir}" expanded."""
    return Path(expand_output_dir(cfg.eval.out_dir, cfg.output_dir))


def resolve_ppo_log(setting: Optional[str], output_dir: str) -> Optional[Path]:
    """'auto' -> <output_dir>/ppo/log.jsonl if present; an explicit path must exist; None -> no curves."""
    if setting is None:
        return None
    if setting == "auto":
        path = Path(output_dir) / "ppo" / "log.jsonl"
        return path if path.is_file() else None
    path = Path(expand_output_dir(setting, output_dir))
    if not path.is_file():
        raise ConfigError(f"eval.ppo_log {setting} not found: pass the log.jsonl written by train.ppo, or null")
    return path


def load_examples(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The evaluation split as plain dicts (id, dialogue, prompt, human_summaries), first eval.max_examples;
    DataError when empty."""
    return build_eval_dataset(cfg.data, cfg.eval.split, cfg.eval.max_examples).to_list()


# ----------------------------------------------------------------------------------------------------
# Sharding and gathering


def shard_batches(num_examples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, range]]:
    """(batch number, example indices) of the batches process `rank` evaluates: batch k goes to k % world_size.

    Batches are fixed by `batch_size` alone, so their composition (and thus every generated token, which
    can depend on the other sequences of a padded batch) does not change with the number of processes.
    """
    starts = range(0, num_examples, batch_size)
    return [(k, range(s, min(s + batch_size, num_examples))) for k, s in enumerate(starts) if k % world_size == rank]


def merge_shards(shards: list[dict[str, Any]], num_examples: int) -> list[dict[str, Any]]:
    """Records from all processes, one per example index in order; an index seen twice or missing is a bug."""
    by_index: dict[int, dict[str, Any]] = {}
    duplicates = []
    for record in shards:
        if record["index"] in by_index:
            duplicates.append(record["index"])
        by_index[record["index"]] = record
    missing = sorted(set(range(num_examples)) - set(by_index))
    if duplicates or missing or len(by_index) != num_examples:
        raise RuntimeError(
            f"gathered evaluation records are inconsistent: duplicates {sorted(duplicates)[:10]}, "
            f"missing {missing[:10]}, {len(by_index)} of {num_examples}"
        )
    return [by_index[i] for i in range(num_examples)]


# ----------------------------------------------------------------------------------------------------
# Models


def load_models(cfg: ExperimentConfig, systems: list[System], device: torch.device):
    """The tokenizer and one model holding every adapter (PEFT adapter names = system names), in eval mode."""
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    adapters = [s for s in systems if s.adapter is not None]
    for i, system in enumerate(adapters):
        # One line per failure: missing, damaged, unreachable hub id, or trained on another base (both named).
        with adapter_load_errors(system.adapter, cfg.model.name_or_path, f"system '{system.name}': adapter"):
            with quiet_peft_deprecation():
                if i == 0:
                    from peft import PeftModel

                    model = PeftModel.from_pretrained(model, system.adapter, adapter_name=system.name,
                                                      is_trainable=False)
                else:
                    model.load_adapter(system.adapter, adapter_name=system.name, is_trainable=False)
    return model.to(device).eval(), tokenizer


@contextmanager
def active_system(model, system: System) -> Iterator[None]:
    """Run `model` as `system`: its adapter selected, or every adapter switched off for the base model."""
    from peft import PeftModel

    if system.adapter is None:
        with model.disable_adapter() if isinstance(model, PeftModel) else nullcontext():
            yield
    else:
        model.set_adapter(system.name)
        yield


# ----------------------------------------------------------------------------------------------------
# Generation and scoring of one process's shard


def evaluate_shard(
    cfg: ExperimentConfig,
    model,
    tokenizer,
    reward_fn,
    examples,
    systems: list[System],
    batches: list[tuple[int, range]],
    device: torch.device,
    progress: bool,
) -> list[dict[str, Any]]:
    """Per-example records (index, id, dialogue, human_summaries, per-system summary/reward/toxicity/ROUGE)."""
    settings = cfg.eval.generation
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(batches) * len(systems), desc="evaluating", unit="batch", disable=not progress)
    for batch_number, indices in batches:
        rows = [examples[i] for i in indices]
        prompts = [row["prompt"] for row in rows]
        summaries: dict[str, list[str]] = {}
        for system in systems:
            # Same seed for every system on a batch: identical inputs and identical sampling noise.
            seed = cfg.seed + batch_number
            torch.manual_seed(seed)
            random.seed(seed)  # generation_kwargs draws max_new_tokens from `random` when max_new_tokens_min is set
            with active_system(model, system):
                summaries[system.name] = generate_texts(
                    model, tokenizer, prompts, settings, cfg.data.max_prompt_tokens, device, progress=False
                )
            bar.update(1)
        # One scoring call per batch for all systems: the classifier sees the same batches whatever the
        # number of processes.
        scores = reward_fn([p for _ in systems for p in prompts], [t for s in systems for t in summaries[s.name]])
        rewards, toxicity = scores.rewards.tolist(), scores.toxicity.tolist()
        targets = [row["human_summaries"] for row in rows]
        per_system_rouge = {s.name: rouge_per_example(summaries[s.name], targets) for s in systems}
        for j, (index, row) in enumerate(zip(indices, rows)):
            record = {"index": index, "id": row["id"], "dialogue": row["dialogue"], "human_summaries": row["human_summaries"],
                      "systems": {}}
            for k, system in enumerate(systems):
                flat = k * len(prompts) + j
                record["systems"][system.name] = {
                    "summary": summaries[system.name][j],
                    "reward": rewards[flat],
                    "toxicity": toxicity[flat],
                    **per_system_rouge[system.name][j],
                }
            records.append(record)
    bar.close()
    return records


# ----------------------------------------------------------------------------------------------------
# Metrics


def compute_metrics(
    records: list[dict[str, Any]], systems: list[System], before: str, after: str, samples: int,
    confidence: float, seed: int,
) -> dict[str, Any]:
    """Per-system metrics with bootstrap CIs, and paired comparisons of every system against `before`.

    Every statistic uses the same seed, so all bootstraps draw the same resampled example sets.
    """
    boot = dict(samples=samples, confidence=confidence, seed=seed)

    def column(system: str, key: str) -> list[float]:
        return [r["systems"][system][key] for r in records]

    metrics = {}
    for s in systems:
        metrics[s.name] = {
            "adapter": s.adapter,
            "n": len(records),
            "rouge": {k: bootstrap_mean(column(s.name, k), **boot).to_dict() for k in ROUGE_TYPES},
            "toxicity": describe(column(s.name, "toxicity"), **boot).to_dict(),
            "reward": bootstrap_mean(column(s.name, "reward"), **boot).to_dict(),
        }
    comparisons = {}
    for s in systems:
        if s.name == before:
            continue
        comparisons[s.name] = {
            "before": before,
            "toxicity_relative_change_pct": paired_relative_change(
                column(before, "toxicity"), column(s.name, "toxicity"), **boot
            ).to_dict(),
            "toxicity_difference": paired_difference(column(before, "toxicity"), column(s.name, "toxicity"), **boot).to_dict(),
            "reward_difference": paired_difference(column(before, "reward"), column(s.name, "reward"), **boot).to_dict(),
            "rouge_difference": {
                k: paired_difference(column(before, k), column(s.name, k), **boot).to_dict() for k in ROUGE_TYPES
            },
        }
    return {"before": before, "after": after, "systems": metrics, "comparisons": comparisons}


# ----------------------------------------------------------------------------------------------------
# Output


def write_examples(path: Path, records: list[dict[str, Any]]) -> None:
    """examples.jsonl in the layout eval.report and eval.human read, one example per line in split order."""
    keys = ("id", "dialogue", "human_summaries", "systems")
    write_text(path, "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in records))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the evaluation; returns the summary (on the main process; {} on the others)."""
    _, cfg = config_from_cli(__doc__.splitlines()[0], argv)
    threads = torch.get_num_threads()
    if cfg.eval.torch_threads is not None:
        torch.set_num_threads(cfg.eval.torch_threads)
    try:
        return evaluate(cfg)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests, notebooks) keep their setting


def evaluate(cfg: ExperimentConfig) -> dict[str, Any]:
    # 0. Everything a user can get wrong is checked before any model is loaded.
    systems = parse_systems(cfg.eval.systems, cfg.output_dir)
    before, after = comparison_pair(systems, cfg.eval.before, cfg.eval.after)
    check_adapters(systems)
    ppo_log = resolve_ppo_log(cfg.eval.ppo_log, cfg.output_dir)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs a line per scorer it builds

    # 1. Data: every process reads the whole split and keeps its own batches.
    examples = load_examples(cfg)

    from accelerate import Accelerator
    from accelerate.utils import gather_object

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    batches = shard_batches(len(examples), cfg.eval.generation.batch_size, accelerator.process_index,
                            accelerator.num_processes)
    if is_main:
        log.info("%d %s examples, %d systems (%s), %d process(es)", len(examples), cfg.eval.split, len(systems),
                 ", ".join(s.name for s in systems), accelerator.num_processes)

    # 2. Models: one base per process with every adapter loaded into it; the reward classifier per
    # reward.device ("auto" here means this process's own device, so N GPUs score N shards in parallel).
    model, tokenizer = load_models(cfg, systems, accelerator.device)
    from rewards.reward_fn import make_reward_fn

    reward_cfg = cfg.reward
    if reward_cfg.device == "auto" and not reward_cfg.url:
        reward_cfg = dataclasses.replace(reward_cfg, device=str(accelerator.device))
    reward_fn = make_reward_fn(reward_cfg)
    if is_main:
        log.info("rewards: %s", reward_fn.where)

    # 3. Generate and score this process's batches, then gather every example on every process.
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    try:
        shard = evaluate_shard(cfg, model, tokenizer, reward_fn, examples, systems, batches, accelerator.device, is_main)
    finally:
        reward_fn.close()
    records = merge_shards(gather_object(shard), len(examples))
    seconds = time.perf_counter() - started

    # 4. Metrics and files, on the main process only.
    summary: dict[str, Any] = {}
    if is_main:
        from eval.report import metrics_table, write_report

        out_dir = eval_out_dir(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "split": cfg.eval.split,
            "data": cfg.data.path,
            "model": cfg.model.name_or_path,
            "num_examples": len(records),
            "systems": [{"name": s.name, "adapter": s.adapter} for s in systems],
            "generation": dataclasses.asdict(cfg.eval.generation),
            "reward": {"model": cfg.reward.model_name_or_path, "text": cfg.reward.text, "where": reward_fn.where},
            "bootstrap": {"samples": cfg.eval.bootstrap_samples, "confidence": cfg.eval.confidence, "seed": cfg.seed},
            "metrics": compute_metrics(records, systems, before, after, cfg.eval.bootstrap_samples,
                                       cfg.eval.confidence, cfg.seed),
            "throughput": {
                "num_processes": accelerator.num_processes,
                "seconds": round(seconds, 3),
                "examples_per_second": round(len(records) / seconds, 3) if seconds > 0 else None,
                "summaries_per_second": round(len(records) * len(systems) / seconds, 3) if seconds > 0 else None,
            },
            "config": config_to_dict(cfg),
        }
        write_examples(out_dir / "examples.jsonl", records)
        write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
        written = write_report(summary, records, out_dir, ppo_log=ppo_log, rows=cfg.eval.qualitative_rows)
        print("\n" + metrics_table(summary))
        print(f"\n{len(records)} examples x {len(systems)} systems in {seconds:.1f} s "
              f"on {accelerator.num_processes} process(es); written to {out_dir}: "
              + ", ".join(p.name for p in [out_dir / "examples.jsonl", out_dir / "summary.json", *written]))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    run_cli(main)
