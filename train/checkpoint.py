"""Atomic, resumable checkpoints shared by SFT and PPO.

A checkpoint is a directory `<root>/checkpoint-<step>/`. It is written under a temporary name and renamed into
place only when complete, with a `COMPLETE` marker written last, so a run killed mid-save never leaves a
checkpoint that looks usable. `latest_checkpoint` returns the newest complete one; older ones are pruned.

Only trainable weights go into a checkpoint (LoRA adapter + value head, safetensors): the frozen base is
reloaded from its source, so a flan-t5-xxl checkpoint is megabytes, not 44 GB.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from train.atomic import fsync_dir
from train.distributed import is_deepspeed, zero_stage
from train.errors import ConfigError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"  # the engine's own checkpoint: partitioned optimizer state and fp32 master weights
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"checkpoint-{step}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of checkpoint directory `path` (`checkpoint-<step>`)."""
    m = _CHECKPOINT_NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"not a checkpoint directory name: {path}")
    return int(m.group(1))


@contextmanager
def atomic_checkpoint_dir(final: str | os.PathLike, is_main_process: bool = True) -> Iterator[Path]:
    """Yield a temporary directory to write a checkpoint into; on success it becomes `final`.

    In multi-process runs every process may write into the yielded directory (it is the same path on a shared
    filesystem); call `accelerator.wait_for_everyone()` before leaving the block so that the main process
    renames only after all writes are done. On an exception the temporary directory is removed.
    """
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main_process:
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a preemption save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CHECKPOINT_NAME.match(p.name)
        if m and (p / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def find_resume_checkpoint(root: str | os.PathLike, resume: bool) -> Optional[Path]:
    """The checkpoint a run continues from (None = start fresh). Without --resume, existing checkpoints are an
    error rather than something to overwrite silently."""
    latest = latest_checkpoint(root)
    if latest is not None and not resume:
        raise ConfigError(f"{root} has checkpoints from an earlier run: pass --resume to continue it "
                          "or choose another --output_dir")
    if resume and latest is None:
        log.info("--resume: no checkpoint under %s, starting fresh", root)
    return latest


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temporary directories."""
    for _, path in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def capture_rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and CUDA) of this process, as tensors and plain numbers only, so
    that `torch.load(weights_only=True)` reads them back (a checkpoint never needs to unpickle code)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def backend_name(accelerator: Any) -> str:
    """How the optimizer state is stored: "deepspeed-zero<stage>" or "torch"."""
    stage = zero_stage(accelerator)
    return f"deepspeed-zero{stage}" if is_deepspeed(accelerator) else "torch"


def rng_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rng-rank{rank}.pt"


def save_training_state(directory: Path, accelerator: Any, model: Any, optimizer: Any, **generators: torch.Generator) -> None:
    """The optimizer state and this process's RNG states (plus named torch generators) into `directory`.

    Every process must call it. Under DeepSpeed the engine saves its partitioned optimizer state, which holds the
    fp32 master weights of a bf16 model (trainable parameters only), and restores both on load; otherwise the main
    process saves the (replicated) optimizer state.
    """
    directory = Path(directory)
    if is_deepspeed(accelerator):
        model.save_checkpoint(str(directory / DEEPSPEED_DIR), exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    rng = {"global": capture_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    torch.save(rng, rng_file(directory, accelerator.process_index))


def load_training_state(directory: Path, accelerator: Any, model: Any, optimizer: Any, **generators: torch.Generator) -> None:
    """Restore what `save_training_state` wrote (the trainable weights come back with the model)."""
    directory = Path(directory)
    if is_deepspeed(accelerator):
        # load_from_fp32_weights (DeepSpeed's default): the fp32 master weights come from the checkpoint, not
        # from the bf16 model weights, so a bf16 run resumes exactly.
        loaded, _ = model.load_checkpoint(str(directory / DEEPSPEED_DIR), load_module_strict=False,
                                          load_lr_scheduler_states=False)
        if loaded is None:  # DeepSpeed only logs a warning and carries on without the optimizer state
            raise ConfigError(f"{directory} holds no DeepSpeed optimizer state: it was not written under DeepSpeed")
    else:
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    rng = torch.load(rng_file(directory, accelerator.process_index), weights_only=True)
    restore_rng_state(rng["global"])
    for name, generator in generators.items():
        generator.set_state(rng[name])


def save_checkpoint(
    root: Path,
    step: int,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    trainer_state: dict[str, Any],
    write_weights: Callable[[Path], None],
    keep: int,
    **generators: torch.Generator,
) -> Path:
    """`checkpoint-<step>` under `root`, atomically: `write_weights(dir)` (called on every process: a ZeRO-3
    gather is collective), the optimizer and RNG states (`save_training_state`), and `trainer_state` (JSON, with
    the process count added) from the main process; then all but the newest `keep` checkpoints are pruned.
    Every process must call it."""
    final = checkpoint_path(root, step)
    is_main = accelerator.is_main_process
    with atomic_checkpoint_dir(final, is_main) as tmp:
        accelerator.wait_for_everyone()  # the main process has created `tmp`
        write_weights(tmp)
        save_training_state(tmp, accelerator, model, optimizer, **generators)
        if is_main:
            state = {**trainer_state, "num_processes": accelerator.num_processes, "backend": backend_name(accelerator)}
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()  # every process has written before the main process renames
    if is_main:
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    directory: Path, accelerator: Any, model: Any, optimizer: Any, **generators: torch.Generator
) -> dict[str, Any]:
    """Restore the optimizer and RNG states from `directory` and return its trainer state (the trainable weights
    were loaded with the model)."""
    state = json.loads((Path(directory) / TRAINER_STATE_FILE).read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise ConfigError(
            f"{directory} was written by {state['num_processes']} process(es) but this run has "
            f"{accelerator.num_processes}: the per-process RNG states need the same number, so resume with it"
        )
    if state.get("backend", backend_name(accelerator)) != backend_name(accelerator):
        raise ConfigError(f"{directory} was written under {state['backend']} but this run uses "
                          f"{backend_name(accelerator)}: the optimizer state is stored differently; resume with the same")
    state.pop("backend", None)
    load_training_state(directory, accelerator, model, optimizer, **generators)
    return state
