"""Model families by name, and by the names checkpoint files give them.

Loaders find the family for a file here (a ``config.json``'s ``model_type``, a GGUF
file's ``general.architecture``), so no loader imports a family. jpeft's own
families register when :mod:`jpeft.models` is imported; a new family registers itself
the same way::

    families.register(MY_FAMILY)

Example:
    >>> family_for_hf("qwen2").name
    'llama'
    >>> family_for_hf("gpt2")
    Traceback (most recent call last):
    ...
    ValueError: Unsupported model_type 'gpt2'; supported: ['bert', 'llama', 'mistral', 'qwen2', 't5'].
"""

from __future__ import annotations

import importlib

from jpeft.models.model import Family

_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds (or replaces) a family under ``family.name``; returns it."""
    _FAMILIES[family.name] = family
    return family


def _builtins() -> dict[str, Family]:
    importlib.import_module("jpeft.models")  # registers jpeft's own families
    return _FAMILIES


def get(name: str) -> Family:
    """The family registered as ``name``."""
    families = _builtins()
    if name not in families:
        raise ValueError(f"no model family {name!r}; registered: {sorted(families)}")
    return families[name]


def names() -> list[str]:
    return sorted(_builtins())


def _family_for(field: str, value: str | None, what: str) -> Family:
    """The family whose checkpoint names list ``value`` in ``field``, or a ValueError listing the known ones."""
    families = [f for f in _builtins().values() if f.names is not None]
    for family in families:
        if value in getattr(family.names, field):
            return family
    known = sorted(v for f in families for v in getattr(f.names, field))
    raise ValueError(what.format(value=value, known=known))


def family_for_hf(model_type: str | None) -> Family:
    """The family that reads Hugging Face ``config.json`` files with this ``model_type``."""
    return _family_for("hf_model_types", model_type, "Unsupported model_type {value!r}; supported: {known}.")


def family_for_gguf(architecture: str | None) -> Family:
    """The family that reads GGUF files of this ``general.architecture``."""
    return _family_for("gguf_architectures", architecture,
                       "GGUF architecture {value!r} is not supported; supported: {known}.")
