"""Shared command-line plumbing: `--config FILE` plus `--section.key value` overrides, clean errors."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from typing import Callable, Mapping, Optional, Sequence

from rewards.errors import RewardError
from train.config import ExperimentConfig, load_config
from train.errors import DetoxSumError

OVERRIDE_HELP = (
    "Any config key can be overridden on the command line as --section.key VALUE or --section.key=VALUE, "
    "e.g. --ppo.learning_rate 1e-5 --model.name_or_path google/flan-t5-large. See train/config.py for all keys."
)


def config_from_cli(
    description: str,
    argv: Optional[list[str]] = None,
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
    config_required: bool = True,
    renamed: Optional[Mapping[str, str]] = None,
    prog: Optional[str] = None,
    epilog: str = "",
) -> tuple[argparse.Namespace, ExperimentConfig]:
    """Parse `--config` and the script's own flags (modes such as --resume); everything else is a config override.

    `renamed` maps the command's former flags to the keys that replaced them ({"gpus": "plan.gpus"}): such a flag
    stops with one line naming its key. `epilog` is shown in --help before the override grammar.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog="\n\n".join(filter(None, [epilog, textwrap.fill(OVERRIDE_HELP, 100)])),
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    if config_required:
        parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    else:
        parser.add_argument("--config", help="YAML recipe, e.g. configs/tiny.yaml (default: the defaults in train/config.py)")
    if add_arguments is not None:
        add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    return args, load_config(args.config, rest, renamed=renamed)


def overridden(argv: Optional[list[str]], keys: Sequence[str]) -> list[str]:
    """The `keys` among `argv`'s --section.key overrides (for modes that set those keys themselves)."""
    tokens = sys.argv[1:] if argv is None else argv
    return [k for k in keys if any(t == f"--{k}" or t.startswith(f"--{k}=") for t in tokens)]


def run_cli(main: Callable[[Optional[list[str]]], object], argv: Optional[list[str]] = None) -> None:
    """Run an entry point; user errors print one line and exit with status 2, bugs keep their traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except (DetoxSumError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
