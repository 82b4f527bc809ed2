"""Comparison table: ROUGE of the zero-shot base model vs the base with an SFT LoRA adapter.

Usage:
    python -m eval.compare --config configs/tiny.yaml --adapter runs/tiny/sft/adapter
    python -m eval.compare --config configs/flan_t5_base.yaml --data.path ../shared/data/dialogsum \
        --adapter runs/flan-t5-base/sft/adapter --eval.max_examples 200

Both systems summarise the same `eval.split` examples (default test) with `eval.generation` (greedy by
default); ROUGE-1/2/L/Lsum use every reference of an example (three on DialogSum's test split). Writes
`<output_dir>/compare/rouge.json` and `predictions.jsonl` and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from eval.metrics import RougeResult, compute_rouge, format_rouge_table
from train.atomic import write_text
from train.cli import config_from_cli, run_cli
from train.config import ExperimentConfig
from train.data import build_eval_dataset
from train.errors import ConfigError
from train.generation import generate_texts
from train.models import apply_lora, load_base_model, load_tokenizer

log = logging.getLogger("eval.compare")

ZERO_SHOT, SFT = "zero-shot", "sft"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="SFT LoRA adapter directory (default: model.adapter from the config)")


def compare(cfg: ExperimentConfig, adapter: str) -> tuple[dict[str, RougeResult], dict[str, list[str]], list[dict]]:
    """ROUGE and predictions of both systems on the evaluation examples (returned as dicts for the report)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples = build_eval_dataset(cfg.data, cfg.eval.split, cfg.eval.max_examples)
    log.info("%d %s examples from %s", len(examples), cfg.eval.split, cfg.data.path)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model).to(device).eval()

    def summarise(system: str) -> list[str]:
        return generate_texts(
            model, tokenizer, examples["prompt"], cfg.eval.generation, cfg.data.max_prompt_tokens, device, desc=system
        )

    predictions = {ZERO_SHOT: summarise(ZERO_SHOT)}
    model = apply_lora(model, cfg.lora, adapter=adapter, trainable=False).eval()  # the same base, adapter on top
    predictions[SFT] = summarise(SFT)
    results = {name: compute_rouge(preds, examples["references"]) for name, preds in predictions.items()}
    return results, predictions, examples.select_columns(["id", "references"]).to_list()


def main(argv: Optional[list[str]] = None) -> dict:
    args, cfg = config_from_cli(__doc__.splitlines()[0], argv, add_arguments)
    adapter = args.adapter or cfg.model.adapter
    if adapter is None:
        raise ConfigError("no adapter to compare: pass --adapter DIR (e.g. runs/tiny/sft/adapter) or set model.adapter")
    torch.manual_seed(cfg.seed)
    results, predictions, examples = compare(cfg, adapter)

    out_dir = Path(cfg.output_dir) / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    with io.StringIO() as f:
        for i, ex in enumerate(examples):
            systems = {name: {"summary": predictions[name][i], **results[name].per_example[i]} for name in results}
            f.write(json.dumps({"id": ex["id"], "references": ex["references"], "systems": systems}) + "\n")
        write_text(out_dir / "predictions.jsonl", f.getvalue())
    summary = {
        "model": cfg.model.name_or_path,
        "adapter": adapter,
        "split": cfg.eval.split,
        "num_examples": len(examples),
        "systems": {name: {"num_examples": r.num_examples, "rouge": r.mean} for name, r in results.items()},
    }
    write_text(out_dir / "rouge.json", json.dumps(summary, indent=2))
    print(f"\nROUGE on {cfg.eval.split} ({len(examples)} examples): {cfg.model.name_or_path} zero-shot vs + {adapter}\n")
    print(format_rouge_table(results))
    print(f"\nwritten: {out_dir / 'rouge.json'}, {out_dir / 'predictions.jsonl'}")
    return summary


if __name__ == "__main__":
    run_cli(main)
