"""Print how many parameters LoRA (and the PPO value head) trains, offline, from the shipped architectures.

    python -m train.param_report --model google/flan-t5-base              # LoRA r=32 on q,v
    python -m train.param_report --model google/flan-t5-base --value-head --r 16 --targets q,k,v,o
    python -m train.param_report --config configs/flan_t5_base.yaml      # model and lora from a recipe
    python -m train.param_report --all                                    # table for the five FLAN-T5 sizes

Models are built on the meta device (no weights, no memory, no download): a hub id must be one of the
shipped `configs/architectures/`, anything else must be a local model directory with a config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from train.cli import run_cli
from train.config import LoraSettings, load_config
from train.models import ARCHITECTURES, ValueHead, apply_lora, build_from_architecture, parameter_report, ParamReport


def report_for(model_name: str, lora: Optional[LoraSettings], value_head: bool) -> ParamReport:
    """Counts for `model_name` (+ fresh LoRA when `lora` is given) (+ value head)."""
    model = build_from_architecture(model_name, device="meta")
    if lora is not None:
        model = apply_lora(model, lora)
    else:
        model.requires_grad_(False)  # without LoRA nothing is trained: the report shows the frozen base
    report = parameter_report(model)
    if value_head:
        head = parameter_report(ValueHead(model.config.d_model))  # trainable, like the PPO value head
        report = ParamReport(report.trainable + head.trainable, report.total + head.total)
    return report


def format_table(rows: list[tuple[str, int, ParamReport]]) -> str:
    """One line per model: base parameters, then trainable / all with LoRA (and value head)."""
    header = f"{'model':<22} {'base':>16} {'trainable':>12} {'all':>16} {'trainable %':>12}"
    lines = [header, "-" * len(header)]
    for name, base, r in rows:
        lines.append(f"{name:<22} {base:>16,} {r.trainable:>12,} {r.total:>16,} {r.percent:>11.2f}%")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe: takes model.name_or_path and the lora section from it")
    parser.add_argument("--model", help="hub id of a shipped architecture or a local model directory "
                        "(default: google/flan-t5-base, or the recipe's model)")
    parser.add_argument("--all", action="store_true", help="a table for all shipped FLAN-T5 sizes")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="add a fresh LoRA")
    parser.add_argument("--value-head", action="store_true", help="add the PPO value head (d_model + 1)")
    parser.add_argument("--r", type=int, help="LoRA rank (default 32 or the recipe's)")
    parser.add_argument("--alpha", type=int, help="LoRA alpha (does not change counts)")
    parser.add_argument("--targets", help="comma-separated LoRA target modules, e.g. q,v")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config)
    lora = dataclasses.replace(cfg.lora)
    if args.r is not None:
        lora.r = args.r
    if args.alpha is not None:
        lora.alpha = args.alpha
    if args.targets is not None:
        lora.target_modules = [t.strip() for t in args.targets.split(",") if t.strip()]
    lora_or_none = lora if args.lora else None

    if args.all:
        rows = [
            (name, report_for(name, None, False).total, report_for(name, lora_or_none, args.value_head))
            for name in ARCHITECTURES
        ]
        print(format_table(rows))
        return
    model_name = args.model or cfg.model.name_or_path
    print(report_for(model_name, lora_or_none, args.value_head).format())


if __name__ == "__main__":
    run_cli(main)
