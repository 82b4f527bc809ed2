"""Atomic, resumable checkpoints shared by SFT and PPO.

A checkpoint is a directory `<root>/checkpoint-<step>/`. It is written under a temporary name and renamed into
place only when complete, with a `COMPLETE` marker written last, so a run killed mid-save never leaves a
checkpoint that looks usable. `latest_checkpoint` returns the newest complete one; older ones are pruned.

Only trainable weights go into a checkpoint (LoRA adapter + value head, safetensors): the frozen base is
reloaded from its source, so a flan-t5-xxl checkpoint is megabytes, not 44 GB.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from train.errors import ConfigError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"checkpoint-{step}"


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
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a preemption save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)


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
    """RNG states of python, numpy and torch (CPU and CUDA) of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
