"""rewards/config.py: what the reward server reads of a training recipe. The grammar itself is tested through
train.config (tests/train/test_config.py)."""

from __future__ import annotations

import dataclasses

import pytest

from rewards.config import RECIPE_KEYS, load_server_config
from rewards.errors import ConfigError
from train.config import ExperimentConfig


def test_recipe_keys_are_the_training_recipes_top_level_keys():
    # rewards must not import train, so the server keeps its own copy of the list; this keeps the two equal.
    assert list(RECIPE_KEYS) == [f.name for f in dataclasses.fields(ExperimentConfig)]


def test_server_reads_a_whole_training_recipe_and_refuses_an_unknown_section(tmp_path, repo_root):
    for recipe in sorted((repo_root / "configs").glob("*.yaml")):  # the shipped recipes start a server
        load_server_config(recipe)
    typo = tmp_path / "typo.yaml"
    typo.write_text("seed: 1\nreward_sever:\n  port: 9001\n")
    with pytest.raises(ConfigError) as error:
        load_server_config(typo)
    message = str(error.value)
    assert "\n" not in message
    assert message == f"{typo}: unknown key 'reward_sever'; did you mean 'reward_server'?"


def test_every_numeric_setting_the_server_reads_has_a_range():
    """The server checks its sections with its own tables (it does not import train): a new int or float key of
    RewardConfig or RewardServerConfig without a range fails here."""
    import typing

    from rewards.config import REWARD_BOUNDS, REWARD_SERVER_BOUNDS, RewardConfig, RewardServerConfig

    for cls, bounds in ((RewardConfig, REWARD_BOUNDS), (RewardServerConfig, REWARD_SERVER_BOUNDS)):
        hints = typing.get_type_hints(cls)
        numeric = set()
        for f in dataclasses.fields(cls):
            types = {t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None)}
            if types and types <= {int, float}:
                numeric.add(f.name)
        assert numeric and sorted(numeric ^ set(bounds)) == [], cls.__name__
