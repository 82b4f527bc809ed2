"""train/checkpoint.py: atomic checkpoints shared by SFT and PPO, pruning, RNG state, and resuming under another
backend."""

import os
import random

import numpy as np
import pytest
import torch

from train.checkpoint import (
    atomic_checkpoint_dir, capture_rng_state, checkpoint_path, latest_checkpoint, list_checkpoints,
    prune_checkpoints, restore_rng_state,
)


def test_checkpoint_appears_only_when_complete(tmp_path):
    with atomic_checkpoint_dir(checkpoint_path(tmp_path, 5)) as d:
        (d / "weights.bin").write_text("x")
        assert latest_checkpoint(tmp_path) is None  # not visible while being written
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert (tmp_path / "checkpoint-5/weights.bin").read_text() == "x"


def test_a_failed_save_leaves_no_checkpoint(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_checkpoint_dir(checkpoint_path(tmp_path, 7)) as d:
            (d / "half").write_text("x")
            raise RuntimeError("killed mid-save")
    assert list_checkpoints(tmp_path) == [] and os.listdir(tmp_path) == []


def test_incomplete_directories_are_ignored_and_old_ones_pruned(tmp_path):
    for step in (1, 2, 3):
        with atomic_checkpoint_dir(checkpoint_path(tmp_path, step)):
            pass
    (tmp_path / "checkpoint-9").mkdir()  # no COMPLETE marker: e.g. a copy interrupted by hand
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]


def test_resaving_a_step_replaces_it(tmp_path):
    for content in ("a", "b"):
        with atomic_checkpoint_dir(checkpoint_path(tmp_path, 4)) as d:
            (d / "f").write_text(content)
    assert (tmp_path / "checkpoint-4/f").read_text() == "b"


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    np.random.seed(1)
    np.random.normal()  # a cached gaussian is part of numpy's state too
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.normal()), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # tensors and numbers only
    got = (random.random(), float(np.random.normal()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_resuming_under_another_backend_is_one_clear_error(tmp_path):
    from types import SimpleNamespace

    from train.checkpoint import load_checkpoint
    from train.errors import ConfigError

    (tmp_path / "trainer_state.json").write_text('{"step": 2, "num_processes": 1, "backend": "torch"}')
    zero2 = SimpleNamespace(num_processes=1, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    with pytest.raises(ConfigError, match="written under torch but this run uses deepspeed-zero2"):
        load_checkpoint(tmp_path, zero2, None, None)


# Fault injection: damaged checkpoints, planted pickles, a full disk.

class _OneProcess:
    """The accelerator attributes the checkpoint functions read, for one plain process."""

    is_main_process, num_processes, process_index = True, 1, 0

    def wait_for_everyone(self):
        pass


def _save(root, step, write_weights=None):
    from train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    write = write_weights or (lambda d: (d / "policy").mkdir() or (d / "policy" / "weights.bin").write_bytes(b"w" * 64))
    return save_checkpoint(root, step, _OneProcess(), model, optimizer, {"step": step}, write, keep=5)


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_for_the_newest_intact_one(tmp_path, caplog):
    from train.checkpoint import find_resume_checkpoint

    for step in (2, 4, 6):
        _save(tmp_path, step)
    # A node crash after the rename, before the disk had the data: a file of the right size with other bytes...
    weights = tmp_path / "checkpoint-6/policy/weights.bin"
    weights.write_bytes(b"x" + weights.read_bytes()[1:])
    # ...and a truncated optimizer file in the one before it.
    optimizer = tmp_path / "checkpoint-4/optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:10])
    with caplog.at_level("WARNING"):
        assert find_resume_checkpoint(tmp_path, resume=True) == tmp_path / "checkpoint-2"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint-6 is damaged (policy/weights.bin differs" in w for w in warnings), warnings
    assert any("checkpoint-4 is damaged (optimizer.pt has 10 bytes" in w for w in warnings), warnings
    assert warnings[-1] == "resuming from checkpoint-2, the newest intact checkpoint"


def test_when_every_checkpoint_is_damaged_resume_is_one_clear_error(tmp_path):
    from train.checkpoint import find_resume_checkpoint
    from train.errors import CheckpointError

    _save(tmp_path, 3)
    (tmp_path / "checkpoint-3/trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"every checkpoint under .* is damaged \(checkpoint-3: "
                                              r"trainer_state.json is missing\).*move .* aside"):
        find_resume_checkpoint(tmp_path, resume=True)


def test_every_file_of_a_checkpoint_is_fsynced_before_its_manifest(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    final = _save(tmp_path, 1)
    files = {p.name for p in final.rglob("*") if p.is_file()}
    assert files == {"weights.bin", "optimizer.pt", "rng-rank0.pt", "trainer_state.json", "COMPLETE"}
    synced_names = [os.path.basename(p) for p in synced]
    for name in files - {"COMPLETE"}:
        assert name in synced_names, f"{name} was never fsynced"
        assert synced_names.index(name) < synced_names.index(".tmp-COMPLETE"), f"{name} fsynced after the manifest"


class _RunsCode:
    """A pickle that would create a directory when loaded (what a planted file could do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_run(tmp_path):
    from train.checkpoint import load_checkpoint, write_manifest
    from train.errors import CheckpointError

    final = _save(tmp_path, 2)
    marker = tmp_path / "pwned"
    torch.save({"global": _RunsCode(marker)}, final / "rng-rank0.pt")
    write_manifest(final)  # the planter rewrote the manifest too: only the weights-only load stands in the way
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"rng-rank0.pt holds Python objects other than tensors \(posix.mkdir\): "
                                              r"refused without running it"):
        load_checkpoint(final, _OneProcess(), model, torch.optim.Adam(model.parameters()))
    assert not marker.exists()


def test_deepspeed_loads_run_weights_only_with_its_own_classes_allowed(tmp_path, monkeypatch):
    # DeepSpeed reads its files with torch.load(weights_only=False); inside the block that call is weights-only.
    import importlib.util

    # deepspeed is in the dev extra: a missing install fails here rather than skipping.
    assert importlib.util.find_spec("deepspeed"), "deepspeed is not installed: pip install -e '.[dev]'"
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from train.checkpoint import deepspeed_weights_only_loads
    from train.errors import CheckpointError

    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, tmp_path / "optim_states.pt")
    torch.save({"loss_scaler": LossScaler(1.0), "step": torch.tensor(3)}, tmp_path / "good.pt")
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors .*refused without running it"):
        with deepspeed_weights_only_loads(tmp_path):
            torch.load(tmp_path / "optim_states.pt", weights_only=False)
    assert not marker.exists()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's setting must not defeat (or break) it
    with deepspeed_weights_only_loads(tmp_path):
        loaded = torch.load(tmp_path / "good.pt", weights_only=False)
    assert isinstance(loaded["loss_scaler"], LossScaler) and loaded["step"].item() == 3
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the block
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_a_full_disk_while_checkpointing_is_one_clear_error_and_keeps_the_earlier_checkpoint(tmp_path, failure):
    import errno

    from train.checkpoint import find_resume_checkpoint
    from train.errors import CheckpointError

    _save(tmp_path, 5)

    def disk_full(directory):
        (directory / "policy").mkdir()
        if failure == "torch":  # how torch.save (and DeepSpeed through it) reports a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 214\n"
                               "write(): fd 3 failed with No space left on device")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "policy" / "weights.bin"))

    with pytest.raises(CheckpointError) as error:
        _save(tmp_path, 10, disk_full)
    message = str(error.value)
    assert "\n" not in message and "could not write checkpoint" in message and "checkpoint-10" in message
    assert "the disk is full (No space left on device)" in message and "rerun with --resume" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]  # no half-written directory left
    assert find_resume_checkpoint(tmp_path, resume=True) == tmp_path / "checkpoint-5"


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from train.errors import CheckpointError

    _save(tmp_path, 1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=100, used=90, free=10))
    with pytest.raises(CheckpointError, match=r"could not write checkpoint under .*: the disk is full \(0.0 MiB free"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


@pytest.mark.parametrize("case", ["space", "publish", "different"])
def test_two_processes_stop_together_with_one_error_when_one_cannot_checkpoint(tmp_path, case):
    import subprocess
    import sys

    from helpers import REPO_ROOT, free_port

    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(REPO_ROOT / "tests/checkpoint_worker.py"), str(tmp_path), case],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    lines = [out.strip().splitlines()[-1] if out.strip() else f"no output: {err[-2000:]}" for out, err in outputs]
    assert all(line.startswith("raised: ") for line in lines), lines
    expected = {"space": ("the disk is full (0.0 MiB free", "another process could not"),
                "publish": ("the disk is full (No space left on device)", "another process could not"),
                "different": ("see different checkpoints (checkpoint-1, checkpoint-2)",) * 2}[case]
    if case == "space":  # rank 1 found the disk full; rank 0 learns it from the agreement
        expected = expected[::-1]
    for line, words in zip(lines, expected):
        assert words in line, lines
    if case != "different":
        assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case == "publish" else ["checkpoint-1"])


def test_a_damaged_checkpoint_skipped_on_resume_is_set_aside_and_not_counted_by_pruning(tmp_path):
    from train.checkpoint import find_resume_checkpoint, prune_checkpoints

    for step in (5, 10):
        _save(tmp_path, step)
    (tmp_path / "checkpoint-10/optimizer.pt").write_bytes(b"")
    assert find_resume_checkpoint(tmp_path, resume=True) == tmp_path / "checkpoint-5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10.damaged", "checkpoint-5"]
    _save(tmp_path, 6)
    prune_checkpoints(tmp_path, keep_last=1, newest=6)
    assert find_resume_checkpoint(tmp_path, resume=True) == tmp_path / "checkpoint-6"


def test_a_file_added_to_a_checkpoint_after_it_was_written_makes_it_damaged(tmp_path):
    from train.checkpoint import checkpoint_damage

    final = _save(tmp_path, 1)
    assert checkpoint_damage(final) is None
    (final / "rng-rank1.pt").write_bytes(b"x")
    assert checkpoint_damage(final) == "rng-rank1.pt was added after the checkpoint was written"
