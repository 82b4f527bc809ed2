"""Errors of the reward side, and the user-input errors every entry point shares.

`DetoxSumError` and `ConfigError` are defined here, at the bottom of the import order (eval -> train ->
rewards), because the config grammar in `rewards.config` raises `ConfigError` and the reward server uses it
without importing `train`; `train.errors` re-exports both, so there is one class of each.
"""


class DetoxSumError(Exception):
    """Base class of errors caused by the user's input (configs, data, model paths)."""


class ConfigError(DetoxSumError):
    """A config file or command-line override is missing, unknown or of the wrong type."""


class RewardError(Exception):
    """The reward model or reward server cannot produce scores (missing model, wrong labels, server down)."""
