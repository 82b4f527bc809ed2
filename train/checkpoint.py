"""Atomic, verified, resumable checkpoints shared by SFT and PPO.

A checkpoint is a directory `<root>/checkpoint-<step>/`. It is written under a temporary name, every file is
fsynced, and it is renamed into place only when complete, with a `COMPLETE` manifest written last (size and sha256
of every other file), so a run killed mid-save never leaves a checkpoint that looks usable. On `--resume` the newest
checkpoint whose files still match their manifest is used; a damaged newer one (a node crash before the disk had
the data, a truncated copy) is skipped with a warning. Older ones are pruned.

Only trainable weights go into a checkpoint (LoRA adapter + value head, safetensors): the frozen base is
reloaded from its source, so a flan-t5-xxl checkpoint is megabytes, not 44 GB. Nothing in a checkpoint is
unpickled as code: torch files are read with `weights_only=True` (DeepSpeed's own files too), so a file planted in
a shared scratch directory cannot run anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from train.atomic import fsync_dir, fsync_tree, write_text
from train.distributed import Collectives, is_deepspeed, zero_stage
from train.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"  # written last: the manifest {"files": {relative path: {"bytes", "sha256"}}}
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint skipped on resume is renamed checkpoint-<step>.damaged
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
SETTINGS_KEY = "settings"  # trainer-state entry: the resolved config the checkpoint was trained under (train/resume.py)
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
    """Yield a temporary directory to write a checkpoint into; on success it becomes `final` (one process; several
    processes use `save_checkpoint`, which agrees on success first). On an exception the temporary directory is
    removed."""
    final = Path(final)
    tmp = _fresh_tmp(final) if is_main_process else final.with_name(f".tmp-{final.name}")
    try:
        yield tmp
    except BaseException:
        if is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main_process:
        _publish(tmp, final)


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """fsync every file, the manifest last, then the rename: `final` appears whole or not at all. Re-saving a step
    (a preemption save right after a periodic one) moves the old copy aside first and deletes it only after."""
    fsync_tree(tmp)
    write_manifest(tmp)
    replaced = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """`COMPLETE`: the size and sha256 of every file under `directory` (fsynced, like the files before it)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    write_text(directory / COMPLETE_MARKER, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_damage(directory: str | os.PathLike) -> Optional[str]:
    """What is wrong with a checkpoint that has its `COMPLETE` marker (a file missing, truncated or changed since it
    was written), or None when every file matches the manifest."""
    directory = Path(directory)
    try:
        text = (directory / COMPLETE_MARKER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return f"its {COMPLETE_MARKER} manifest cannot be read ({e})"
    if text.strip() == "ok":  # written before checkpoints carried a manifest: nothing to verify against
        return None
    try:
        files = json.loads(text)["files"]
        entries = [(str(name), int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {COMPLETE_MARKER} manifest is not valid"
    try:
        for name, size, digest in entries:
            path = directory / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                return f"its manifest names a file outside the checkpoint: {name}"
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
            if _sha256(path) != digest:
                return f"{name} differs from what was written (sha256 mismatch)"
        listed = {name for name, _, _ in entries} | {COMPLETE_MARKER}
        for path in sorted(directory.rglob("*")):
            # DeepSpeed finds its files by pattern: a file added later would change what it loads.
            if path.is_file() and path.relative_to(directory).as_posix() not in listed:
                return f"{path.relative_to(directory).as_posix()} was added after the checkpoint was written"
    except OSError as e:  # vanished or unreadable while being checked
        return f"it cannot be read ({e})"
    return None


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
    """The checkpoint a run continues from (None = start fresh): the newest one whose files match their manifest;
    damaged newer ones are skipped with a warning. Without --resume, existing checkpoints are an error rather than
    something to overwrite silently."""
    found = list_checkpoints(root)
    if found and not resume:
        raise ConfigError(f"{root} has checkpoints from an earlier run: pass --resume to continue it "
                          "or choose another --output_dir")
    if resume and not found:
        _log_once(logging.INFO, "--resume: no checkpoint under %s, starting fresh", root)
    damaged = []
    for _, path in reversed(found):
        damage = checkpoint_damage(path)
        if damage is None:
            if damaged:
                _log_once(logging.WARNING, "resuming from %s, the newest intact checkpoint", path.name)
            return path
        _log_once(logging.WARNING, "%s is damaged (%s): skipped, and renamed %s%s so that it is neither resumed "
                  "nor counted when old checkpoints are pruned", path, damage, path.name, DAMAGED_SUFFIX)
        damaged.append(f"{path.name}: {damage}")
        if is_first_process():  # one process renames; the others skip it either way
            try:
                os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
            except OSError:
                pass
    if damaged:
        raise CheckpointError(f"every checkpoint under {root} is damaged ({'; '.join(damaged)}): nothing intact to "
                              f"resume from; move {root} aside to start afresh")
    return None


def check_same_checkpoint(accelerator: Any, checkpoint: Optional[Path]) -> None:
    """Every process chose the same checkpoint (each chose alone, before the process group existed): a file system
    that showed them different ones would otherwise make them train from different states."""
    collectives = Collectives.of(accelerator)
    if collectives.world_size == 1:
        return
    step = torch.tensor([checkpoint_step(checkpoint) if checkpoint is not None else -1])
    steps = sorted({int(t.item()) for t in collectives.all_gather(step)})
    if len(steps) > 1:
        shown = ", ".join("none" if s < 0 else f"checkpoint-{s}" for s in steps)
        raise CheckpointError(f"the processes of this run see different checkpoints ({shown}): the checkpoint "
                              "directory must be the same shared directory for all of them; check the file system "
                              "and rerun with --resume")


def is_first_process() -> bool:
    """Rank 0 by the launcher's environment: resuming is decided on every process, before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


def _log_once(level: int, message: str, *args: Any) -> None:
    """Log from the first process only (see is_first_process)."""
    if is_first_process():
        log.log(level, message, *args)


def prune_checkpoints(root: str | os.PathLike, keep_last: int, newest: Optional[int] = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints up to step `newest` (the one just written; later
    steps belong to an abandoned timeline and are not counted), and stale temporary directories."""
    found = [(step, path) for step, path in list_checkpoints(root) if newest is None or step <= newest]
    for _, path in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for stale in list(Path(root).glob(".tmp-checkpoint-*")) + list(Path(root).glob(".old-checkpoint-*")):
        shutil.rmtree(stale, ignore_errors=True)


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
        with deepspeed_weights_only_loads(directory):
            loaded, _ = model.load_checkpoint(str(directory / DEEPSPEED_DIR), load_module_strict=False,
                                              load_lr_scheduler_states=False)
        if loaded is None:  # DeepSpeed only logs a warning and carries on without the optimizer state
            raise CheckpointError(f"{directory} holds no DeepSpeed optimizer state: it was not written under DeepSpeed")
    else:
        optimizer.load_state_dict(load_tensors(directory / OPTIMIZER_FILE))
    rng = load_tensors(rng_file(directory, accelerator.process_index))
    restore_rng_state(rng["global"])
    for name, generator in generators.items():
        generator.set_state(rng[name])


def load_tensors(path: Path) -> Any:
    """A torch file of tensors and plain containers, unpickling no code; one clear error for anything else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_foreign_pickle(path, e)) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                              "the checkpoint is damaged; move it aside to resume from an older one") from None


def _foreign_pickle(path: Path, error: Exception) -> str:
    found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))))
    what = f" ({', '.join(found)})" if found else ""
    deepspeed = [name for name in found if name.startswith("deepspeed.")]
    if deepspeed:  # a DeepSpeed version that stores a class this allow-list does not know yet
        return (f"{path} holds DeepSpeed objects not on the allow-list of train/checkpoint.py{what}: refused "
                "without running them. If this checkpoint is yours, add them to deepspeed_pickle_classes "
                "(and report it)")
    return (f"{path} holds Python objects other than tensors{what}: refused without running it. This checkpoint "
            "was not written by detox-sum or was changed since; delete it (or move it aside) and resume from an "
            "older one")


def deepspeed_pickle_classes() -> list[type]:
    """The DeepSpeed classes its optimizer files hold (seen in ZeRO-1/2/3, fp32 and bf16), allowed as plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_FORCE_WEIGHTS_ONLY, _FORCE_NOT_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def deepspeed_weights_only_loads(directory: Path) -> Iterator[None]:
    """DeepSpeed reads its files with `torch.load(weights_only=False)`; inside this block torch refuses anything
    but tensors, containers and the allow-listed DeepSpeed classes (torch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at
    every load, and it overrides the call's argument), so a planted file fails instead of running."""
    saved = {name: os.environ.pop(name, None) for name in (_FORCE_WEIGHTS_ONLY, _FORCE_NOT_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_pickle_classes()):
            yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(_foreign_pickle(directory / DEEPSPEED_DIR, e)) from None
    except (OSError, RuntimeError, EOFError, KeyError) as e:
        raise CheckpointError(f"{directory / DEEPSPEED_DIR} cannot be loaded by DeepSpeed ({_first_line(e)}): the "
                              "checkpoint is damaged or from another configuration; move it aside to resume from an "
                              "older one") from None
    finally:
        os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        os.environ.update({name: value for name, value in saved.items() if value is not None})


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_checkpoint(
    root: Path,
    step: int,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    trainer_state: dict[str, Any],
    write_weights: Callable[[Path], None],
    keep: int,
    settings: Optional[dict[str, Any]] = None,
    **generators: torch.Generator,
) -> Path:
    """`checkpoint-<step>` under `root`, atomically: `write_weights(dir)` (called on every process: a ZeRO-3
    gather is collective), the optimizer and RNG states (`save_training_state`), and `trainer_state` (JSON, with
    the process count, the backend and the run's `settings` added) from the main process; then all but the newest
    `keep` checkpoints are pruned. Every process must call it.

    A write that fails (a full disk) is one CheckpointError and leaves the earlier checkpoints as they were. Where
    the processes agree on failure without entering another collective (the free-space check before writing, the
    main process's publishing after) they all stop with it; a failure while writing, where DeepSpeed and ZeRO-3 run
    collectives of their own, stops the failing process, and the launcher (accelerate, torchrun, srun) ends the rest.
    """
    final = checkpoint_path(root, step)
    is_main = accelerator.is_main_process
    collectives = Collectives.of(accelerator)
    tmp = final.with_name(f".tmp-{final.name}")
    _agree_or_raise(collectives, _space_problem(root), final)
    try:
        if is_main:
            _fresh_tmp(final)
        accelerator.wait_for_everyone()  # the main process has created `tmp`
        try:
            write_weights(tmp)
            save_training_state(tmp, accelerator, model, optimizer, **generators)
            if is_main:
                state = {**trainer_state, "num_processes": accelerator.num_processes,
                         "backend": backend_name(accelerator), SETTINGS_KEY: settings}
                (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
        except Exception as e:  # torch, safetensors and DeepSpeed report a full disk as RuntimeError, their own...
            raise CheckpointError(_write_failure(final, e)) from None
        accelerator.wait_for_everyone()  # every process has written before the main process publishes
        problem = None
        if is_main:
            try:
                _publish(tmp, final)
            except Exception as e:
                problem = _write_failure(final, e)
        _agree_or_raise(collectives, problem, final)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        prune_checkpoints(root, keep, newest=step)
    accelerator.wait_for_everyone()
    return final


def _write_failure(final: Path, error: BaseException) -> str:
    text = str(error)
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in text
    reason = "the disk is full (No space left on device)" if full else f"{type(error).__name__}: {_first_line(error)}"
    where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
    return (f"could not write checkpoint {final}: {reason}{where}. The earlier checkpoints are intact: free space "
            "(or fix the directory) and rerun with --resume")


def _space_problem(root: Path) -> Optional[str]:
    """A checkpoint is about as large as the newest one: refuse to start one that cannot fit, while every process
    can still stop cleanly (a write that fails midway may be inside DeepSpeed's collectives)."""
    found = list_checkpoints(root)
    if not found:
        return None
    needed = sum(p.stat().st_size for p in found[-1][1].rglob("*") if p.is_file())
    free = shutil.disk_usage(root).free
    if free >= needed:
        return None
    return (f"could not write checkpoint under {root}: the disk is full ({free / 2**20:.1f} MiB free, the last "
            f"checkpoint took {needed / 2**20:.1f} MiB). The earlier checkpoints are intact: free space and rerun "
            "with --resume")


def _agree_or_raise(collectives: Collectives, problem: Optional[str], final: Path) -> None:
    """A barrier that also agrees whether a process failed, so that all stop together with one line."""
    failed = collectives.all_reduce_sum(torch.tensor([float(problem is not None)]))
    if problem is not None:
        raise CheckpointError(problem)
    if failed.item():
        raise CheckpointError(f"could not write checkpoint {final}: another process could not (see its error). "
                              "The earlier checkpoints are intact; rerun with --resume")


def load_checkpoint(
    directory: Path, accelerator: Any, model: Any, optimizer: Any, **generators: torch.Generator
) -> dict[str, Any]:
    """Restore the optimizer and RNG states from `directory` and return its trainer state (the trainable weights
    were loaded with the model)."""
    state = read_trainer_state(directory)
    if state["num_processes"] != accelerator.num_processes:
        raise ConfigError(
            f"{directory} was written by {state['num_processes']} process(es) but this run has "
            f"{accelerator.num_processes}: the per-process RNG states need the same number, so resume with it"
        )
    if state.get("backend", backend_name(accelerator)) != backend_name(accelerator):
        raise ConfigError(f"{directory} was written under {state['backend']} but this run uses "
                          f"{backend_name(accelerator)}: the optimizer state is stored differently; resume with the same")
    state.pop("backend", None)
    state.pop(SETTINGS_KEY, None)
    load_training_state(directory, accelerator, model, optimizer, **generators)
    return state


def read_trainer_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (JSON) of a checkpoint; CheckpointError if it is not an object."""
    path = Path(directory) / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}): the checkpoint is damaged; move it aside to resume "
                              "from an older one") from None
    if not isinstance(state, dict) or "num_processes" not in state:
        raise CheckpointError(f"{path} is not a detox-sum trainer state; move the checkpoint aside")
    return state
