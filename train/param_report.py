"""Print how many parameters LoRA (and the PPO value head) trains, offline, from the shipped architectures.

    python -m train.param_report                                          # google/flan-t5-base, LoRA r=32 on q,v
    python -m train.param_report --value-head --lora.r 16 --lora.target_modules q,k,v,o
    python -m train.param_report --config configs/flan_t5_base.yaml      # model and lora from a recipe
    python -m train.param_report --all [--no-lora]                        # table for the five FLAN-T5 sizes

Settings are config keys (`--config FILE`, `--model.name_or_path`, `--lora.r`, `--lora.alpha`,
`--lora.target_modules`); `--all`, `--no-lora` and `--value-head` choose what is reported.

Models are built on the meta device (no weights, no memory, no download): a hub id must be one of the
shipped `configs/architectures/`, anything else must be a local model directory with a config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from train.cli import config_from_cli, overridden, run_cli
from train.config import LoraSettings
from train.errors import ConfigError
from train.models import ARCHITECTURES, ValueHead, apply_lora, build_from_architecture


@dataclass
class ParamReport:
    trainable: int
    total: int
    percent: float = field(init=False)

    def __post_init__(self) -> None:
        self.percent = 100.0 * self.trainable / self.total if self.total else 0.0

    def format(self) -> str:
        """The three lines the original notebook printed."""
        return (
            f"trainable model parameters: {self.trainable}\n"
            f"all model parameters: {self.total}\n"
            f"percentage of trainable model parameters: {self.percent:.2f}%"
        )


def _numel(param: torch.Tensor) -> int:
    n = param.numel()
    # bitsandbytes packs two 4-bit values per byte of storage (as peft's get_nb_trainable_parameters counts).
    if param.__class__.__name__ == "Params4bit":
        if hasattr(param, "element_size"):
            n *= 2 * param.element_size()
        elif hasattr(param, "quant_storage"):
            n *= 2 * param.quant_storage.itemsize
        else:
            n *= 2
    return n


def parameter_report(model: nn.Module) -> ParamReport:
    """Trainable and total parameters, each shared Parameter counted once (named_parameters deduplicates)."""
    trainable = total = 0
    for _, param in model.named_parameters():
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParamReport(trainable=trainable, total=total)

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


# Flags of earlier versions and the keys that replaced them: each stops with one line naming its key.
FORMER_FLAGS = {"model": "model.name_or_path", "r": "lora.r", "alpha": "lora.alpha", "targets": "lora.target_modules"}


def add_modes(parser) -> None:
    parser.add_argument("--all", action="store_true", help="a table for all shipped FLAN-T5 sizes")
    parser.add_argument("--no-lora", action="store_true", help="the base model alone, without a fresh LoRA")
    parser.add_argument("--value-head", action="store_true", help="add the PPO value head (d_model + 1)")


def main(argv: Optional[list[str]] = None) -> None:
    args, cfg = config_from_cli(__doc__.split("\n\n")[0], argv, add_modes, config_required=False,
                                renamed=FORMER_FLAGS, prog="python -m train.param_report",
                                epilog="Keys read: --model.name_or_path (a shipped architecture or a local model directory),\n"
                                       "--lora.r, --lora.alpha, --lora.target_modules. Counts do not depend on model.dtype or\n"
                                       "model.quantization (a 4-bit weight is still one parameter).")
    lora = None if args.no_lora else cfg.lora
    if args.all and overridden(argv, ("model.name_or_path",)):
        raise ConfigError("--all reports every shipped FLAN-T5 size: drop --model.name_or_path, or drop --all")
    if args.all:
        rows = [
            (name, report_for(name, None, False).total, report_for(name, lora, args.value_head))
            for name in ARCHITECTURES
        ]
        print(format_table(rows))
        return
    print(report_for(cfg.model.name_or_path, lora, args.value_head).format())


if __name__ == "__main__":
    run_cli(main)
