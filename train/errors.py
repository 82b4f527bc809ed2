"""User-facing errors: one clear message naming what is wrong and how to fix it.

Entry points catch `DetoxSumError` (see `train.cli.run_cli`) and print the message alone, without a
traceback; anything else is a bug and keeps its traceback.
"""


class DetoxSumError(Exception):
    """Base class of errors caused by the user's input (configs, data, model paths)."""


class ConfigError(DetoxSumError):
    """A config file or command-line override is missing, unknown or of the wrong type."""


class DataError(DetoxSumError):
    """A dataset cannot be found or does not have the expected layout/columns."""


class ModelError(DetoxSumError):
    """A model, tokenizer or adapter cannot be found or does not fit the request."""
