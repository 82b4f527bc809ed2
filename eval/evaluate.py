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

Every system writes one summary per prompt with `eval.generation` (greedy by default) and, with
`eval.samples_per_prompt` k, k more sampled with the PPO rollout settings (the `rollout` section). Every summary is
scored by the reward model and by each held-out judge of `eval.judges` (eval/judges.py), placed like the reward model.

Sharding: the split is cut into generation batches of `eval.generation.batch_size` consecutive examples, and
batch k goes to process k % num_processes. Every batch holds the same examples whatever the number of
processes, and each (batch, system) is generated with the seed `seed + k` (its samples with another seed derived
from it), so 1 process and N processes give the same summaries, samples and classifier inputs. Per-example records
are gathered with `gather_object`, keyed by example index, and checked for duplicates and gaps before anything is
written.

Metrics (main process, eval/metrics.py): ROUGE, toxicity by every judge, expected maximum toxicity and toxicity
probability over the k samples, distinct-1/2/3, length, reward, each with a bootstrap CI; every system against the
"before" one with paired bootstrap CIs, and the reward-hacking check. Writes `<output_dir>/eval/`: `examples.jsonl`,
`summary.json`, `report.md`, `toxicity.png`, `judges.png` and, given a PPO log, `ppo_curves.png`.
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
from typing import Any, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from train.rouge import rouge_per_example
from eval.judges import Judge, check_judges_available, close_judges, load_judges
from eval.metrics import compute_metrics
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

# Sampled summaries of batch b are drawn from seed + b + SAMPLE_SEED_OFFSET: never the noise of the eval.generation
# summary (the same seed + b) when that one is sampled too.
SAMPLE_SEED_OFFSET = 1 << 31


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)  # generation_kwargs draws max_new_tokens from `random` when max_new_tokens_min is set


def generate_system(cfg: ExperimentConfig, model, tokenizer, prompts: list[str], seed: int,
                    device: torch.device) -> tuple[list[str], list[list[str]]]:
    """The active system's eval.generation summary of each prompt, and its eval.samples_per_prompt summaries
    sampled with the rollout settings (k per prompt; [] each without samples)."""
    seed_everything(seed)
    summaries = generate_texts(model, tokenizer, prompts, cfg.eval.generation, cfg.data.max_prompt_tokens, device,
                               progress=False)
    k = cfg.eval.samples_per_prompt or 0
    if not k:
        return summaries, [[] for _ in prompts]
    seed_everything(seed + SAMPLE_SEED_OFFSET)
    # The training sampling settings, batched as evaluation batches: k rows per prompt, eval.generation.batch_size
    # rows per generate call, whatever the number of processes.
    sampling = dataclasses.replace(cfg.rollout, batch_size=cfg.eval.generation.batch_size)
    flat = generate_texts(model, tokenizer, [p for p in prompts for _ in range(k)], sampling,
                          cfg.data.max_prompt_tokens, device, progress=False)
    return summaries, [flat[j * k : (j + 1) * k] for j in range(len(prompts))]


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
    judges: Sequence[Judge] = (),
) -> list[dict[str, Any]]:
    """Per-example records (index, id, dialogue, human_summaries, per-system summary/reward/toxicity/ROUGE/length,
    held-out judges' toxicity and the k samples), in the layout eval.metrics documents."""
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(batches) * len(systems), desc="evaluating", unit="batch", disable=not progress)
    for batch_number, indices in batches:
        rows = [examples[i] for i in indices]
        prompts = [row["prompt"] for row in rows]
        generated: dict[str, tuple[list[str], list[list[str]]]] = {}
        for system in systems:
            # Same seed for every system on a batch: identical inputs and identical sampling noise.
            with active_system(model, system):
                generated[system.name] = generate_system(cfg, model, tokenizer, prompts, cfg.seed + batch_number, device)
            bar.update(1)
        # One scoring call per batch and judge for all systems, the summaries then the samples of each: the
        # classifiers see the same batches whatever the number of processes.
        pair_prompts, texts = [], []
        for system in systems:
            summaries, samples = generated[system.name]
            pair_prompts += prompts + [p for p, texts_of_p in zip(prompts, samples) for _ in texts_of_p]
            texts += summaries + [t for texts_of_p in samples for t in texts_of_p]
        scores = reward_fn(pair_prompts, texts)
        rewards, toxicity = scores.rewards.tolist(), scores.toxicity.tolist()
        held_out = {judge.name: judge.toxicity(pair_prompts, texts) for judge in judges}

        def scored(flat: int, summary: str) -> dict[str, Any]:
            return {"summary": summary, "reward": rewards[flat], "toxicity": toxicity[flat],
                    "judges": {name: values[flat] for name, values in held_out.items()}}

        targets = [row["human_summaries"] for row in rows]
        outputs: list[dict[str, Any]] = [{} for _ in rows]
        offset = 0
        for system in systems:
            summaries, samples = generated[system.name]
            rouge = rouge_per_example(summaries, targets)
            lengths = [len(ids) for ids in tokenizer(summaries, add_special_tokens=False)["input_ids"]]
            sample_offset = offset + len(summaries)
            for j, summary in enumerate(summaries):
                output = {**scored(offset + j, summary), **rouge[j], "length_tokens": lengths[j]}
                if samples[j]:
                    output["samples"] = [scored(sample_offset + i, text) for i, text in enumerate(samples[j])]
                    sample_offset += len(samples[j])
                outputs[j][system.name] = output
            offset = sample_offset
        for index, row, output in zip(indices, rows, outputs):
            records.append({"index": index, "id": row["id"], "dialogue": row["dialogue"],
                            "human_summaries": row["human_summaries"], "systems": output})
    bar.close()
    return records


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
    check_judges_available(cfg.eval.judges)
    if cfg.eval.samples_per_prompt and not cfg.rollout.do_sample:
        raise ConfigError(f"eval.samples_per_prompt {cfg.eval.samples_per_prompt} samples with the rollout settings, but "
                          "rollout.do_sample is false: the samples would be copies of one summary. Set "
                          "--rollout.do_sample true or --eval.samples_per_prompt null")
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
    log.info("process %d/%d: %d of the examples, in %d batch(es)", accelerator.process_index,
             accelerator.num_processes, sum(len(b) for _, b in batches), len(batches))

    # 2. Models: one base per process with every adapter loaded into it; the reward classifier per
    # reward.device ("auto" here means this process's own device, so N GPUs score N shards in parallel).
    model, tokenizer = load_models(cfg, systems, accelerator.device)
    from rewards.reward_fn import make_reward_fn

    reward_cfg = cfg.reward
    if reward_cfg.device == "auto" and not reward_cfg.url:
        reward_cfg = dataclasses.replace(reward_cfg, device=str(accelerator.device))
    reward_fn = make_reward_fn(reward_cfg)
    try:
        judges = load_judges(cfg.eval.judges, cfg.reward, accelerator.device)
    except BaseException:
        reward_fn.close()
        raise
    if is_main:
        log.info("rewards: %s; held-out judges: %s", reward_fn.where,
                 ", ".join(f"{j.name} ({j.where})" for j in judges) or "none")

    # 3. Generate and score this process's batches, then gather every example on every process.
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    try:
        shard = evaluate_shard(cfg, model, tokenizer, reward_fn, examples, systems, batches, accelerator.device, is_main,
                               judges)
    finally:
        reward_fn.close()
        close_judges(judges)
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
            "judges": [{**j.describe(), "model": judge.model_name_or_path, "toxic_label": judge.toxic_label}
                       for j, judge in zip(judges, cfg.eval.judges)],
            "samples_per_prompt": cfg.eval.samples_per_prompt,
            # The rollout's sampling settings; its samples_per_prompt is training's, not this evaluation's k, and
            # its compile is training's decoding (evaluation decodes uncompiled).
            "sampling": {key: value for key, value in dataclasses.asdict(cfg.rollout).items()
                         if key not in ("samples_per_prompt", "compile")},
            "bootstrap": {"samples": cfg.eval.bootstrap_samples, "confidence": cfg.eval.confidence, "seed": cfg.seed},
            "metrics": compute_metrics(records, [s.name for s in systems], before, after, cfg.eval.bootstrap_samples,
                                       cfg.eval.confidence, cfg.seed, adapters={s.name: s.adapter for s in systems}),
            "throughput": {
                "num_processes": accelerator.num_processes,
                "seconds": round(seconds, 3),
                "examples_per_second": round(len(records) / seconds, 3) if seconds > 0 else None,
                "summaries_per_second": round(len(records) * len(systems) * (1 + (cfg.eval.samples_per_prompt or 0))
                                              / seconds, 3) if seconds > 0 else None,
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
