"""Errors shared across jpeft's modules.

Example:
    >>> issubclass(CheckpointError, ValueError)
    True
    >>> str(SettingError("rank", 0, "must be > 0", what="LoRA"))
    'LoRA rank must be > 0, got rank=0'
"""

from typing import Any


class CheckpointError(ValueError):
    """A checkpoint or adapter does not fit: missing, unexpected or mis-shaped entries, or a bad file."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, garbled): unlike a checkpoint that does not
    fit, an older save may still be good."""


class SettingError(ValueError):
    """A method or model setting with a bad value; names the setting so a program can name its key.

    Attributes:
        setting: the builder argument's name (``"rank"``).
        value: the value given.
        problem: what is wrong, as a predicate (``"must be > 0"``).
    """

    def __init__(self, setting: str, value: Any, problem: str, *, what: str = ""):
        self.setting, self.value, self.problem = setting, value, problem
        prefix = f"{what} " if what else ""
        super().__init__(f"{prefix}{setting} {problem}, got {setting}={value!r}")
