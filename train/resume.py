"""What a resumed run may change: `--resume` continues under the checkpoint's settings, or says what differs.

A checkpoint records the settings it was trained under. On `--resume` the settings that shape what a stage trains
are compared with the checkpoint's, before any model loads:
- a difference stops the run with the list (checkpoint -> now), since the optimizer state would otherwise carry the
  old learning rate while `config.yaml` records the new one;
- `--resume-with-changes` accepts them: they take effect from the resumed step (the learning rate and weight
  decay are set on the restored optimizer), and `<stage>/resumes.jsonl` records each resume with its changes;
- keys that define the run itself (seed, data, LoRA shape, base model, SFT batch layout) cannot change within it.
How a run is operated (checkpoint and log cadence, PPO's step count, where the reward model runs) may always change.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from train.checkpoint import SETTINGS_KEY, is_first_process, read_trainer_state
from train.config import config_to_dict
from train.errors import ConfigError

log = logging.getLogger(__name__)

# The sections each stage reads; the others cannot change what it trains.
STAGE_SECTIONS = {"sft": ("seed", "data", "model", "lora", "sft"),
                  "ppo": ("seed", "data", "model", "lora", "rollout", "ppo", "reward")}
# How a run is operated, not what it computes: free to change on any resume (prefixes of dotted keys).
OPERATIONAL = ("sft.save_every_steps", "sft.keep_checkpoints", "sft.log_every_steps", "sft.eval_rouge_examples",
               "ppo.steps", "ppo.save_every_steps", "ppo.keep_checkpoints", "ppo.log_every_steps",
               "ppo.forward_batch_size", "ppo.merge_adapter_for_rollout", "reward.device", "reward.batch_size", "reward.url", "reward.token_env",
               "reward.timeout_s", "reward.max_retries")
# Read by one stage only, or only when a run starts: a resumed SFT run takes its adapter from the checkpoint and has
# no value head; a resumed PPO run takes its adapter from the checkpoint too, unless it is also the KL reference.
NOT_READ_ON_RESUME = {"sft": ("model.adapter", "model.value_head_dropout"), "ppo": ("model.adapter",)}
# What defines the run: the data order, the adapter's shape, the model under it and SFT's position in its epoch.
FIXED = ("seed", "data", "lora", "model.name_or_path", "model.revision", "model.quantization", "model.adapter",
         "sft.batch_size", "sft.gradient_accumulation_steps",
         "ppo.advantage_estimator")  # whether the policy has a value head (and the optimizer its parameters)
PATH_KEYS = ("data.path", "model.name_or_path", "model.adapter", "reward.model_name_or_path")
UNORDERED_KEYS = ("lora.target_modules",)


def add_resume_arguments(parser: Any) -> None:
    """--resume and --resume-with-changes, for SFT and PPO."""
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint of this "
                        "output_dir, under its settings")
    parser.add_argument("--resume-with-changes", action="store_true", help="continue from it under changed "
                        "settings (recorded in <stage>/resumes.jsonl); implies --resume")


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for name, item in value.items():
            flat.update(_flatten(item, f"{prefix}{name}."))
        return flat
    return {prefix[:-1]: value}


def settings_of(cfg: Any) -> dict[str, Any]:
    """The resolved config as JSON data, as a checkpoint stores it."""
    return json.loads(json.dumps(config_to_dict(cfg)))


def setting_changes(saved: dict[str, Any], cfg: Any, stage: str) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, this run's value)} for each setting `stage` reads on resume that differs,
    operational ones aside. A key the checkpoint does not have (written by a version before the key existed) counts
    as its default, which is what that version ran: a run started with PPO cannot resume as RLOO either way."""
    before, now = {**_flatten(settings_of(type(cfg)())), **_flatten(saved)}, _flatten(settings_of(cfg))
    ignored = OPERATIONAL + NOT_READ_ON_RESUME[stage]
    if stage == "ppo" and "initial_adapter" in (before.get("ppo.reference"), now.get("ppo.reference")):
        ignored = OPERATIONAL  # model.adapter is the KL reference
    return {key: (before[key], now[key]) for key in now
            if key in before and not _same(key, before[key], now[key]) and _under(key, STAGE_SECTIONS[stage])
            and not _under(key, ignored)}


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in UNORDERED_KEYS and isinstance(old, list) and isinstance(new, list):
        return sorted(map(str, old)) == sorted(map(str, new))
    if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str) and Path(old).exists() and Path(new).exists():
        return os.path.realpath(old) == os.path.realpath(new)  # the same directory, written another way
    return False


def check_resume_settings(checkpoint: Optional[Path], cfg: Any, stage: str,
                          accept_changes: bool) -> dict[str, tuple[Any, Any]]:
    """The accepted changes of a resume (empty when none); ConfigError listing them when they are not accepted,
    or when one of them is FIXED."""
    if checkpoint is None:
        if accept_changes:
            raise ConfigError("--resume-with-changes: there is no checkpoint to resume (run without it)")
        return {}
    saved = read_trainer_state(checkpoint).get(SETTINGS_KEY)
    if saved is None:
        log.warning("%s does not record its settings (written by an older version): not compared", checkpoint)
        return {}
    changes = setting_changes(saved, cfg, stage)
    listed = "; ".join(f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items())
    fixed = [key for key in changes if _under(key, FIXED)]
    if fixed:
        raise ConfigError(f"--resume from {checkpoint}: {', '.join(fixed)} cannot change within a run "
                          f"(checkpoint -> now: {listed}); use the checkpoint's values, or start a new run in "
                          "another output_dir")
    if changes and not accept_changes:
        raise ConfigError(f"--resume from {checkpoint}: settings differ from the checkpoint's (checkpoint -> now: "
                          f"{listed}); use the checkpoint's values, or pass --resume-with-changes to continue under "
                          "the new ones")
    if changes and is_first_process():
        log.warning("resuming from %s with changed settings (checkpoint -> now): %s", checkpoint, listed)
    return changes


def record_resume(stage_dir: Path, step: int, checkpoint: Path, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append this resume to `<stage>/resumes.jsonl` (main process): the step, the checkpoint and what changed."""
    entry = {"step": step, "checkpoint": str(checkpoint),
             "changes": {key: {"checkpoint": old, "now": new} for key, (old, new) in changes.items()}}
    with open(Path(stage_dir) / "resumes.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def apply_optimizer_settings(optimizer: Any, learning_rate: float, weight_decay: Optional[float] = None,
                             scheduler: Any = None) -> None:
    """Set the run's learning rate (and weight decay) on a restored optimizer, which otherwise keeps the
    checkpoint's. With a LambdaLR schedule the rate is the new base rate times the schedule's factor at its step."""
    if scheduler is not None:
        scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]
        rates = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        scheduler._last_lr = rates
    else:
        rates = [learning_rate for _ in optimizer.param_groups]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
        if weight_decay is not None:
            group["weight_decay"] = weight_decay


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list, dict)) or value is None else str(value)
