"""Reward side of detox-sum: the hate-speech classifier, its scorer, the reward server and its client.

Imports are lazy so that `rewards.config` (read by the training config loader) does not pull in torch,
transformers or httpx.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "RewardConfig": "rewards.config",
    "RewardServerConfig": "rewards.config",
    "RewardError": "rewards.errors",
    "ConfigError": "rewards.errors",
    "load_reward_classifier": "rewards.classifier",
    "RewardScorer": "rewards.scorer",
    "RewardScores": "rewards.scorer",
    "scored_texts": "rewards.scorer",
    "RewardClient": "rewards.client",
    "RewardFunction": "rewards.reward_fn",
    "make_reward_fn": "rewards.reward_fn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rewards' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
