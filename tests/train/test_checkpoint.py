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
