"""Zero-shot baseline: ROUGE of the base model (no adapter) on a DialogSum split.

Usage:
    python -m eval.baseline --config configs/tiny.yaml
    python -m eval.baseline --config configs/flan_t5_base.yaml --data.path ../shared/data/dialogsum
    python -m eval.baseline --config configs/tiny.yaml --eval.max_examples 50 --eval.split validation

Generates with batched `generate()` (greedy by default: `eval.generation`), scores ROUGE-1/2/L/Lsum with
`rouge_score` (stemming on; multi-reference when the split has several summaries), prints a table and writes
`<output_dir>/baseline/rouge.json` and `predictions.jsonl`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from eval.metrics import compute_rouge, format_rouge_table
from train.atomic import write_text
from train.cli import config_from_cli, run_cli
from train.config import config_to_dict
from train.data import build_eval_dataset
from train.generation import generate_texts
from train.models import load_base_model, load_tokenizer

log = logging.getLogger("eval.baseline")


def main(argv: Optional[list[str]] = None) -> dict:
    _, cfg = config_from_cli(__doc__.splitlines()[0], argv)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 1. Data: the evaluation split, with every reference summary kept.
    examples = build_eval_dataset(cfg.data, cfg.eval.split, cfg.eval.max_examples)
    log.info("%d %s examples from %s", len(examples), cfg.eval.split, cfg.data.path)

    # 2. Model: the base model alone (zero-shot: no adapter, even if model.adapter is set).
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model).to(device).eval()

    # 3. Generate and score.
    started = time.perf_counter()
    predictions = generate_texts(
        model, tokenizer, examples["prompt"], cfg.eval.generation, cfg.data.max_prompt_tokens, device, desc="zero-shot"
    )
    seconds = time.perf_counter() - started
    rouge = compute_rouge(predictions, examples["references"])

    # 4. Report.
    out_dir = Path(cfg.output_dir) / "baseline"
    out_dir.mkdir(parents=True, exist_ok=True)
    with io.StringIO() as f:
        for ex, pred, scores in zip(examples, predictions, rouge.per_example):
            f.write(json.dumps({"id": ex["id"], "prediction": pred, "references": ex["references"], **scores}) + "\n")
        write_text(out_dir / "predictions.jsonl", f.getvalue())
    summary = {
        "system": "zero-shot",
        "model": cfg.model.name_or_path,
        "split": cfg.eval.split,
        "num_examples": rouge.num_examples,
        "rouge": rouge.mean,
        "generation_seconds": round(seconds, 2),
        "examples_per_second": round(rouge.num_examples / seconds, 2) if seconds else None,
        "config": config_to_dict(cfg),
    }
    write_text(out_dir / "rouge.json", json.dumps(summary, indent=2))
    print(f"\nZero-shot ROUGE of {cfg.model.name_or_path} on {cfg.eval.split} ({rouge.num_examples} examples):\n")
    print(format_rouge_table({"zero-shot": rouge}))
    print(f"\nwritten: {out_dir / 'rouge.json'}, {out_dir / 'predictions.jsonl'}")
    return summary


if __name__ == "__main__":
    run_cli(main)
