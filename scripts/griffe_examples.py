"""griffe extension for the API reference: jpeft's ``Example:`` sections are read as ``Examples:``.

jpeft's docstrings head their doctests ``Example:`` (singular). Google style's section is
``Examples:``; read as such, the ``>>>`` lines render as code rather than as markdown text.
"""

from __future__ import annotations

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example(?: \([^)]*\))?:\s*$", re.MULTILINE)  # also "Example (a note):"


class SingularExamples(griffe.Extension):
    """Renames a docstring's ``Example:`` section heading to ``Examples:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
