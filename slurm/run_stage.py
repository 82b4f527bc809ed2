"""Run a stage's module in this process and leave a marker file when it stopped for preemption.

    accelerate launch ... slurm/run_stage.py train.ppo --config configs/tiny.yaml --resume

The training scripts exit with status 3 (train.preemption.PREEMPTED_EXIT_CODE) after checkpointing on
SIGUSR1/SIGTERM, but `accelerate launch` reports every failure of its workers as status 1. So each worker runs
the module through this wrapper (in-process: the script's own signal handlers and `sys.argv` are unchanged) and,
on status 3, creates the file named by DETOX_PREEMPTED_MARKER; the SLURM template requeues the job when it
exists and fails it otherwise.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as `python -m` would have

from train.preemption import PREEMPTED_EXIT_CODE  # noqa: E402

MARKER_ENV = "DETOX_PREEMPTED_MARKER"


def exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: slurm/run_stage.py MODULE [ARGS...]   e.g. slurm/run_stage.py train.ppo --config FILE",
              file=sys.stderr)
        sys.exit(2)
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]  # what the module sees under `python -m module ARGS`
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exit_code(exc) == PREEMPTED_EXIT_CODE and os.environ.get(MARKER_ENV):
            marker = Path(os.environ[MARKER_ENV])
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        raise


if __name__ == "__main__":
    main()
