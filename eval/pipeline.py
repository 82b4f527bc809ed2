"""The whole workflow in one command: LoRA SFT → PPO → evaluation (zero-shot base, SFT, PPO) and report.

Usage:
    python -m eval.pipeline --config configs/tiny.yaml            # the main job of `make demo`
    python -m eval.pipeline --config configs/tiny.yaml --stages sft,ppo,eval --resume
    python -m eval.pipeline --config configs/flan_t5_base.yaml --data.path ../shared/data/dialogsum

Each stage runs as its own process, exactly the command a user would type for that stage (printed before it
runs), so a stage can be re-run or launched with `accelerate launch` by hand. Overrides after --config go to
every stage. PPO starts from the SFT adapter; evaluation compares the zero-shot base model, SFT and PPO on the
same examples (the base model is the zero-shot baseline: there is no separate baseline stage).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from train.config import expand_output_dir, load_config
from train.errors import DetoxSumError

STAGES = ("sft", "ppo", "eval")
TITLES = {"sft": "LoRA SFT", "ppo": "PPO detoxification", "eval": "evaluation and report"}


def stage_commands(config: str, overrides: list[str], output_dir: str, resume: bool) -> dict[str, list[str]]:
    out = Path(output_dir)
    sft_adapter = out / "sft" / "adapter"
    base = ["--config", config, *overrides]
    again = ["--resume"] if resume else []
    return {
        "sft": ["-m", "train.sft", *base, *again],
        "ppo": ["-m", "train.ppo", *base, *again, "--model.adapter", str(sft_adapter)],
        # eval.systems defaults to base, sft and ppo of this output_dir and finds the PPO log itself. Before/after
        # is SFT → PPO, as in the original notebook (PPO starts from the SFT policy); base is reported too.
        "eval": ["-m", "eval.evaluate", *base, "--eval.before", "sft", "--eval.after", "ppo"],
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--resume", action="store_true", help="resume SFT and PPO from their last checkpoints")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)  # fail fast on a bad config, before any stage starts
    except DetoxSumError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if "baseline" in unknown:
        print("error: there is no baseline stage any more: the eval stage scores the zero-shot base model "
              "(system 'base'); for the baseline alone run python -m eval.evaluate --config FILE --eval.systems base",
              file=sys.stderr)
        return 2
    if unknown:
        print(f"error: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2

    if "eval" in stages:
        from eval.judges import check_judges_available

        from rewards.errors import RewardError

        try:  # a judge that cannot load must not wait until training has finished to say so
            check_judges_available(cfg.eval.judges)
        except (DetoxSumError, RewardError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    commands = stage_commands(args.config, overrides, cfg.output_dir, args.resume)
    started = time.perf_counter()
    timings = []
    for number, stage in enumerate(stages, 1):
        cmd = [sys.executable, *commands[stage]]
        print(f"\n=== [{number}/{len(stages)}] {TITLES[stage]} ===", flush=True)
        print("$ python " + shlex.join(commands[stage]), flush=True)
        t0 = time.perf_counter()
        status = subprocess.call(cmd)
        timings.append((stage, time.perf_counter() - t0))
        if status != 0:
            print(f"\nstage '{stage}' failed with exit status {status}; fix it and re-run with "
                  f"--stages {','.join(stages[number - 1:])}" + (" --resume" if stage in ("sft", "ppo") else ""),
                  file=sys.stderr)
            return status
        print(f"=== [{number}/{len(stages)}] {TITLES[stage]} done in {timings[-1][1]:.0f} s "
              f"(total {time.perf_counter() - started:.0f} s) ===", flush=True)

    print("\nStage times: " + ", ".join(f"{s} {t:.0f} s" for s, t in timings)
          + f"; total {time.perf_counter() - started:.0f} s")
    report = Path(expand_output_dir(cfg.eval.out_dir, cfg.output_dir)) / "report.md"  # no torch import here
    if "eval" in stages and report.is_file():
        print(f"Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
