"""User-facing errors: one clear message naming what is wrong and how to fix it.

Entry points catch `DetoxSumError` (see `train.cli.run_cli`) and print the message alone, without a
traceback; anything else is a bug and keeps its traceback.

`DetoxSumError` and `ConfigError` live in `rewards.errors` (the config grammar and the reward server raise
`ConfigError` without importing `train`); they are re-exported here, the same classes.
"""

from rewards.errors import ConfigError, DetoxSumError

__all__ = ["CheckpointError", "ConfigError", "DataError", "DetoxSumError", "ModelError"]


class DataError(DetoxSumError):
    """A dataset cannot be found or does not have the expected layout/columns."""


class ModelError(DetoxSumError):
    """A model, tokenizer or adapter cannot be found or does not fit the request."""


class CheckpointError(DetoxSumError):
    """A checkpoint cannot be written (disk full) or read back (damaged, foreign, tampered with)."""
