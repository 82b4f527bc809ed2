"""The experiment trackers (train/trackers.py): a tracker that cannot start a run is one clear error. What the
trackers receive from a run is tested end to end in test_sft.py and test_ppo.py."""

from __future__ import annotations

import pytest

from train.config import load_config
from train.errors import ConfigError


def test_a_wandb_run_that_cannot_start_is_one_clear_error(repo_root, tmp_path):
    import wandb.errors

    from train.trackers import start_trackers

    class NotLoggedIn:  # what accelerate's init_trackers does when wandb.init fails (online, no API key)
        log_with, is_main_process, trackers = ["wandb"], True, ["a wandb tracker that did not start"]

        def init_trackers(self, *args, **kwargs):
            raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    accelerator = NotLoggedIn()
    cfg = load_config(repo_root / "configs/tiny.yaml", ["--output_dir", str(tmp_path), "--trackers", "wandb"])
    with pytest.raises(ConfigError, match=r"wandb could not start a run \(No API key.*wandb login.*WANDB_MODE=offline"):
        start_trackers(accelerator, cfg, "sft")
    assert accelerator.trackers == []  # end_training() must not finish a run that never started
