"""The checkpoint name tables, as the loaders of :mod:`jpeft.io` read them: :mod:`jpeft.models.names`.

The tables are data each model family declares, so they live with the models (which import
nothing from ``io``); this module keeps the name ``jpeft.io.names`` for the format code that
reads them.
"""

from jpeft.models.names import CheckpointNames, NameRule, NameTable, to_file, to_model  # noqa: F401

__all__ = ["CheckpointNames", "NameRule", "NameTable", "to_file", "to_model"]
