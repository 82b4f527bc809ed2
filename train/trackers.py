"""Experiment trackers of SFT and PPO, through accelerate: TensorBoard (the default), Weights & Biases, or none.

The `trackers` config key picks them; `check_trackers` validates the names when the config loads, and
`check_tracker_packages` checks wandb is installed first thing in SFT and PPO (before any model): each a clear error. Both training loops build their Accelerator with
`log_with=make_trackers(...)`, call `start_trackers` once, and give the accelerator to their `JsonlLog`
(train/run_log.py), which logs the numbers of every log.jsonl record to the trackers at the record's step;
`accelerator.end_training()` finishes them.

Files, under the stage directory `<output_dir>/<sft|ppo>/`:
- tensorboard: `tensorboard/` (on --resume the earlier events after the checkpoint's step are hidden, as log.jsonl
  drops its lines: TensorBoard's purge_step);
- wandb: `wandb/` (wandb's run files and logs; an offline run in full); project `tracker_project` (null: $WANDB_PROJECT, else "detox-sum"),
  run `<output_dir name>-<stage>` in group `<output_dir name>`, job type the stage. wandb's own environment variables
  win over these: WANDB_DIR, WANDB_NAME, WANDB_RUN_GROUP, WANDB_JOB_TYPE; WANDB_MODE chooses online (the default
  when logged in) or offline (upload later with `wandb sync`). A resumed run is a new wandb run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Optional

from train.errors import ConfigError

TRACKERS = ("tensorboard", "wandb")
DEFAULT_PROJECT = "detox-sum"
# wandb.init arguments we set, and the environment variable that overrides each (we pass it only when unset).
WANDB_ENV = {"dir": "WANDB_DIR", "name": "WANDB_NAME", "group": "WANDB_RUN_GROUP", "job_type": "WANDB_JOB_TYPE"}


def check_trackers(names: list[str]) -> list[str]:
    """The trackers to use, without repeats ([] for ["none"]); ConfigError for an unknown one or a missing wandb."""
    if names == ["none"]:
        return []
    for name in names:
        if name == "none":
            raise ConfigError(f"trackers: 'none' cannot be combined with other trackers, got {names}")
        if name not in TRACKERS:
            raise ConfigError(f"trackers: unknown tracker {name!r}; use tensorboard, wandb, both "
                              "(--trackers tensorboard,wandb) or none (--trackers none)")
    return list(dict.fromkeys(names))


def check_tracker_packages(cfg: Any) -> None:
    """The packages of the chosen trackers are installed; called first by the training loops (the commands that
    track), so that evaluation or the planner can read a recipe that names wandb without having it."""
    if "wandb" in cfg.trackers and importlib.util.find_spec("wandb") is None:
        raise ConfigError("trackers: wandb is not installed: pip install wandb (or pip install -e '.[wandb]'), "
                          "or choose --trackers tensorboard")


def make_trackers(cfg: Any, stage: str, resume_from: Optional[Path] = None) -> Optional[list[Any]]:
    """`Accelerator(log_with=...)` for stage "sft" or "ppo" of `cfg` (None without trackers); `resume_from`: the
    checkpoint a resumed run starts from."""
    if not cfg.trackers:
        return None
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    from train.checkpoint import checkpoint_step

    stage_dir = Path(cfg.output_dir) / stage
    trackers: list[Any] = []
    for name in cfg.trackers:
        if name == "tensorboard":
            # Hide earlier events from the resumed checkpoint's step on (a fresh run: all of them), as log.jsonl is cut.
            purge_step = 0 if resume_from is None else checkpoint_step(resume_from) + 1
            trackers.append(TensorBoardTracker("tensorboard", stage_dir, purge_step=purge_step))  # -> <stage dir>/tensorboard/
        elif name == "wandb":
            run = Path(cfg.output_dir).resolve().name
            init = {"dir": str(stage_dir), "name": f"{run}-{stage}", "group": run, "job_type": stage}
            init = {key: value for key, value in init.items() if not os.environ.get(WANDB_ENV[key])}
            trackers.append(WandBTracker(project_name(cfg), **init))
        else:
            raise ConfigError(f"unknown tracker {name!r}")  # check_trackers let it through: a bug
    return trackers


def project_name(cfg: Any) -> str:
    return cfg.tracker_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def start_trackers(accelerator: Any, cfg: Any, stage: str) -> None:
    """Start the trackers given to `accelerator` (main process), with the flattened config as hyperparameters."""
    if not accelerator.log_with:
        return
    if accelerator.is_main_process:
        (Path(cfg.output_dir) / stage).mkdir(parents=True, exist_ok=True)
    try:  # our trackers come named (make_trackers): accelerate passes the project name only to trackers it builds
        accelerator.init_trackers(project_name(cfg), config=flat_config(cfg))
    except Exception as e:
        wandb_errors = sys.modules.get("wandb.errors")
        if wandb_errors is None or not isinstance(e, wandb_errors.Error):
            raise
        accelerator.trackers.clear()  # a wandb tracker that did not start cannot finish in end_training()
        raise ConfigError(f"wandb could not start a run ({e}): log in with `wandb login` (or set WANDB_API_KEY), or "
                          "set WANDB_MODE=offline and upload later with `wandb sync`") from None


def log_to_trackers(accelerator: Any, record: dict[str, Any]) -> None:
    """The numbers of a log.jsonl record (`step` plus values) to every tracker, at the record's step."""
    values = {key: value for key, value in record.items()
              if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if values:
        accelerator.log(values, step=record["step"])


def flat_config(cfg: Any) -> dict[str, Any]:
    """The config as {"ppo.learning_rate": 1.41e-05, ...} (the override names); lists as "a,b" strings, since
    TensorBoard's hyperparameters are numbers, strings or booleans."""
    flat: dict[str, Any] = {}

    def walk(section: dict[str, Any], prefix: str) -> None:
        for key, value in section.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = ",".join(map(str, value)) if isinstance(value, list) else value

    walk(dataclasses.asdict(cfg), "")
    return flat
