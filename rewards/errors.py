"""Errors of the reward side. Kept separate from `train.errors` because rewards never imports train."""


class RewardError(Exception):
    """The reward model or reward server cannot produce scores (missing model, wrong labels, server down)."""
