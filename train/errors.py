"""The training program's error about its inputs (everything else it reports comes from jpeft).

Example:
    >>> issubclass(ConfigError, ValueError)
    True
"""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""
