"""Checkpoint name tables: how a file's tensor names map to a model's parameter paths.

A model family gives one :class:`NameTable` per file format (Hugging Face safetensors,
GGUF) as data: a list of :class:`NameRule` templates such as::

    NameRule("model.layers.{layer}.self_attn.{proj}.weight",
             "layers_{layer}/self_attn/{proj}/kernel", transpose=True)

``{layer}`` matches a layer number, any other ``{field}`` a name without dots or
slashes; both sides must use the same fields. Paths name one layer at a time
(``layers_{i}``); the loaders stack them when the model scans its layers. ``transpose``
turns a PyTorch ``Linear`` weight ``(out, in)`` into a Flax kernel ``(in, out)`` (and back);
``convert`` is an optional ``(array, config, to_model) -> array`` for anything else (e.g.
llama.cpp's rotary row order).

Example:
    >>> table = NameTable((NameRule("model.layers.{layer}.mlp.{proj}.weight",
    ...                             "layers_{layer}/mlp/{proj}/kernel", transpose=True),))
    >>> table.to_path("model.layers.3.mlp.up_proj.weight")[0]
    'layers_3/mlp/up_proj/kernel'
    >>> table.to_name("layers_0/mlp/down_proj/kernel")[0]
    'model.layers.0.mlp.down_proj.weight'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

_FIELD = re.compile(r"\{(\w+)\}")


class NameRule(NamedTuple):
    """One template pair (see the module docstring).

    Attributes:
        name: the template of the file's tensor name.
        path: the template of the jpeft parameter path (one layer at a time).
        transpose: the stored tensor is the transpose of the parameter.
        convert: ``(array, config, to_model: bool) -> array``, applied after (loading) or
            before (saving) the transpose.
        optional: the tensor may be in the file although the model has no such parameter
            (e.g. a tied ``lm_head.weight``): then it is skipped, not an error.
    """

    name: str
    path: str
    transpose: bool = False
    convert: Callable[..., Any] | None = None
    optional: bool = False


def _compile(template: str, sep: str) -> re.Pattern:
    out, last = [], 0
    for match in _FIELD.finditer(template):
        out.append(re.escape(template[last:match.start()]))
        field = match.group(1)
        pattern = r"\d+" if field == "layer" else rf"[^{re.escape(sep)}./]+"
        out.append(f"(?P<{field}>{pattern})")
        last = match.end()
    out.append(re.escape(template[last:]))
    return re.compile("".join(out))


class NameTable:
    """Tensor names <-> parameter paths for one file format (hashable: rules are a tuple).

    Args:
        rules: the :class:`NameRule` templates, tried in order.
        ignored: regexes of tensor names to skip when loading (e.g. rotary caches).
    """

    def __init__(self, rules: tuple[NameRule, ...], ignored: tuple[str, ...] = ()):
        self.rules = tuple(rules)
        self.ignored = tuple(ignored)
        for rule in self.rules:
            if set(_FIELD.findall(rule.name)) != set(_FIELD.findall(rule.path)):
                raise ValueError(f"name rule {rule.name!r} -> {rule.path!r}: both sides need the same fields")
        self._by_name = [(_compile(r.name, "."), r) for r in self.rules]
        self._by_path = [(_compile(r.path, "/"), r) for r in self.rules]
        self._ignored = [re.compile(p) for p in self.ignored]

    def __hash__(self) -> int:
        return hash((self.rules, self.ignored))

    def __eq__(self, other) -> bool:
        return isinstance(other, NameTable) and (self.rules, self.ignored) == (other.rules, other.ignored)

    def is_ignored(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self._ignored)

    def to_path(self, name: str) -> tuple[str, NameRule] | None:
        """``(parameter path, rule)`` for a tensor name, or ``None`` if no rule matches."""
        for pattern, rule in self._by_name:
            match = pattern.fullmatch(name)
            if match:
                return rule.path.format(**match.groupdict()), rule
        return None

    def to_name(self, path: str) -> tuple[str, NameRule] | None:
        """``(tensor name, rule)`` for an unrolled parameter path, or ``None``."""
        for pattern, rule in self._by_path:
            match = pattern.fullmatch(path)
            if match:
                return rule.name.format(**match.groupdict()), rule
        return None


def to_model(array, rule: NameRule, config: Any):
    """A stored tensor in the parameter's layout."""
    if rule.transpose:
        array = array.T
    if rule.convert is not None:
        array = rule.convert(array, config, True)
    return array


def to_file(array, rule: NameRule, config: Any):
    """A parameter in the stored tensor's layout (inverse of :func:`to_model`)."""
    if rule.convert is not None:
        array = rule.convert(array, config, False)
    return array.T if rule.transpose else array


class CheckpointNames(NamedTuple):
    """A family's checkpoint formats.

    Attributes:
        hf: the Hugging Face safetensors :class:`NameTable` (or None).
        hf_model_types: ``config.json`` ``model_type`` values this family reads.
        from_hf_config: ``(config_dict, **overrides) -> config``.
        to_hf_config: ``config -> config_dict``.
        gguf: the GGUF :class:`NameTable` (or None).
        gguf_architectures: ``general.architecture`` values this family reads.
        from_gguf_metadata: ``(metadata dict, tensor names, **overrides) -> config``.
        hf_for_config: ``config -> NameTable``, when the Hugging Face names depend on the
            config (BERT's ``bert.`` prefix in a ``*ForSequenceClassification`` checkpoint);
            :attr:`jpeft.models.Model.names` then gives that table as ``hf``.
    """

    hf: NameTable | None = None
    hf_model_types: tuple[str, ...] = ()
    from_hf_config: Callable[..., Any] | None = None
    to_hf_config: Callable[[Any], dict] | None = None
    gguf: NameTable | None = None
    gguf_architectures: tuple[str, ...] = ()
    from_gguf_metadata: Callable[..., Any] | None = None
    hf_for_config: Callable[[Any], NameTable] | None = None
