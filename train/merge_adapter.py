"""Merge a LoRA adapter into its base model and save a standalone model for export.

Usage:
    python -m train.merge_adapter --config configs/tiny.yaml --model.adapter runs/tiny/sft/adapter --out runs/tiny/merged

The adapter comes from `model.adapter` (a directory or hub id; the former `--adapter` flag stops with an error
naming that key), the base model from `model.name_or_path` (in `model.dtype`); `--out` is the command's only flag.
The output directory holds the merged weights (`model.safetensors`, via `save_pretrained`) and the tokenizer,
loadable with `AutoModelForSeq2SeqLM.from_pretrained(out)` and no peft. A PPO adapter's value head is not part of
the language model and is left out.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Optional

from train.atomic import save_directory
from train.cli import config_from_cli, run_cli
from train.config import ExperimentConfig
from train.errors import ConfigError
from train.models import apply_lora, load_base_model, load_tokenizer

log = logging.getLogger("train.merge_adapter")


# The flag of earlier versions and the key that replaced it: it stops with one line naming the key.
FORMER_FLAGS = {"adapter": "model.adapter"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the merged model (replaced if it exists)")


def merge_adapter(cfg: ExperimentConfig, out: str | os.PathLike) -> Path:
    """Base + the adapter `cfg.model.adapter`, merged with peft's `merge_and_unload`, saved (safetensors) with its
    tokenizer to `out`."""
    if cfg.model.adapter is None:
        raise ConfigError("model.adapter is null: set --model.adapter DIR to the LoRA adapter to merge, "
                          "e.g. runs/tiny/sft/adapter")
    if cfg.model.quantization is not None:
        raise ConfigError("cannot merge into a quantized base: set --model.quantization null to merge in full precision")
    out = Path(out)
    tokenizer = load_tokenizer(cfg.model)
    model = apply_lora(load_base_model(cfg.model), cfg.lora, adapter=cfg.model.adapter, trainable=False)
    merged = model.merge_and_unload()
    def write(tmp: Path) -> None:  # written aside and renamed, so `out` is never half-written
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return save_directory(out, write)


def main(argv: Optional[list[str]] = None) -> Path:
    args, cfg = config_from_cli(__doc__.splitlines()[0], argv, add_arguments, renamed=FORMER_FLAGS,
                                prog="python -m train.merge_adapter")
    out = merge_adapter(cfg, args.out)
    print(f"merged {cfg.model.adapter} into {cfg.model.name_or_path}: {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
