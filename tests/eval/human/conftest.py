"""Fixtures of the human evaluation tests: studies exported from small evaluation outputs, of two and of three
systems."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.human.export import export_study
from helpers import write_eval_examples


@pytest.fixture
def two_system_study(tmp_path: Path) -> Path:
    eval_dir = write_eval_examples(tmp_path / "eval", 8, ["base_model", "ppo_model"])
    return export_study(eval_dir, tmp_path / "human", n=5, seed=3)


@pytest.fixture
def three_system_study(tmp_path: Path) -> Path:
    eval_dir = write_eval_examples(tmp_path / "eval3", 6, ["base_model", "sft_model", "ppo_model"])
    return export_study(eval_dir, tmp_path / "human3", n=6, seed=1)
