"""Errors shared across jpeft's modules.

Example:
    >>> issubclass(CheckpointError, ValueError)
    True
"""


class CheckpointError(ValueError):
    """A checkpoint or adapter does not fit: missing, unexpected or mis-shaped entries, or a bad file."""
