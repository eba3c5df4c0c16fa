"""What a weight is, read from its logical axes: a kernel, an embedding table or a vector.

Methods need to know a weight's role to adapt it: LoRA factors a kernel along its
input and output axes, starts an embedding table's factors the other way round, and
quantization blocks a kernel along its input axis but a table along its rows. jpeft
reads the role from the weight's **logical axes** (the names a model gives every
dimension, the same names sharding uses), never from its path:

* leading axes named in :data:`STACK_AXES` (``"layers"``) index a stack of weights
  (scanned layers): they are batch axes, one independent weight each;
* a table's first remaining axis is in :data:`TABLE_AXES` (``("vocab", "embed")`` is
  the token embedding);
* a vector has one remaining axis (a bias, a norm scale);
* anything else is a kernel ``(*lead, *inputs, *outputs)``; how many axes are inputs
  (contracted with the activation) is the layer's business: a Dense kernel has one, the
  output projection of attention ``(heads, head_dim, embed)`` has two. Models give it
  in their parameter specs; the default is one.

A weight with no logical axes (a plain dict of arrays) gets :func:`default_layout`:
every axis but the last two is a stack axis, then one input and one output axis.

Example:
    >>> layout_of(("layers", "embed", "heads", "head_dim"))
    Layout(kind='kernel', lead=1, inputs=1)
    >>> layout_of(("vocab", "embed")).kind
    'table'
    >>> layout_of(("heads", "head_dim", "embed"), inputs=2).split((4, 8, 32))
    ((), (4, 8), (32,))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from jpeft import tree

STACK_AXES = ("layers",)
"""Logical names of leading axes that stack independent weights (scanned layers)."""

TABLE_AXES = ("vocab",)
"""Logical names of the row axis of lookup tables (embeddings)."""

KINDS = ("kernel", "table", "vector")


class Layout(NamedTuple):
    """The role of one weight: ``kind``, leading stack axes, and a kernel's input axes.

    Attributes:
        kind: ``"kernel"`` (``(*lead, *inputs, *outputs)``), ``"table"``
            (``(*lead, rows, dim)``) or ``"vector"`` (``(*lead, n)``).
        lead: number of leading stack axes.
        inputs: number of input axes of a kernel (a table's rows count as its one input).
    """

    kind: str
    lead: int = 0
    inputs: int = 1

    def split(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(lead, inputs, outputs)`` parts of a weight shape.

        Raises:
            ValueError: when the shape has too few axes for this layout.
        """
        shape = tuple(shape)
        need = self.lead + (1 if self.kind == "vector" else self.inputs + 1)
        if len(shape) < need:
            raise ValueError(f"a {self.kind} with {self.lead} stack axes and {self.inputs} input axes needs at "
                             f"least {need} dims, got shape {shape}")
        if self.kind == "vector":
            return shape[:self.lead], (), shape[self.lead:]
        cut = self.lead + self.inputs
        return shape[:self.lead], shape[self.lead:cut], shape[cut:]


def layout_of(axes: Sequence[str | None], *, inputs: int = 1) -> Layout:
    """The layout that logical ``axes`` describe (see the module docstring).

    Example:
        >>> layout_of(("embed",))
        Layout(kind='vector', lead=0, inputs=1)
        >>> layout_of(("layers", "vocab", "embed"))
        Layout(kind='table', lead=1, inputs=1)
    """
    axes = tuple(axes)
    lead = 0
    while lead < len(axes) and axes[lead] in STACK_AXES:
        lead += 1
    rest = axes[lead:]
    if len(rest) <= 1:
        return Layout("vector", lead)
    if rest[0] in TABLE_AXES:
        return Layout("table", lead)
    if not 1 <= inputs < len(rest):
        raise ValueError(f"a kernel with logical axes {axes} cannot have {inputs} input axes; "
                         f"it has {len(rest)} axes after {lead} stack axes")
    return Layout("kernel", lead, inputs)


def default_layout(shape: Sequence[int]) -> Layout:
    """The layout of a weight nobody described: ``(*stack, in, out)`` kernels, 1-d vectors.

    Example:
        >>> default_layout((3, 16, 8))
        Layout(kind='kernel', lead=1, inputs=1)
    """
    ndim = len(tuple(shape))
    if ndim <= 1:
        return Layout("vector", 0)
    return Layout("kernel", ndim - 2, 1)


def layouts_for(params, *, model=None, axes=None) -> dict[str, Layout]:
    """``{path: Layout}`` for every leaf of ``params``: from ``model`` (its specs), from a logical
    ``axes`` tree (tuples as leaves; it may cover only some paths), or :func:`default_layout`.

    Example:
        >>> import numpy as np
        >>> params = {"embed": {"embedding": np.zeros((10, 4))}, "w": np.zeros((4, 4))}
        >>> layouts_for(params, axes={"embed": {"embedding": ("vocab", "embed")}})["embed/embedding"].kind
        'table'
    """
    known: dict[str, Layout] = {}
    if model is not None:
        known.update(model.layouts())
    if axes is not None:
        flat_axes = flatten_axes(axes)
        known.update({path: layout_of(names) for path, names in flat_axes.items()})
    return {path: known.get(path) or default_layout(leaf.shape) for path, leaf in tree.flatten(params).items()}


def flatten_axes(axes) -> dict[str, tuple]:
    """``{path: axis names}`` for a tree of logical-axes tuples (tuples are leaves here).

    Example:
        >>> flatten_axes({"dense": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}})
        {'dense/bias': ('mlp',), 'dense/kernel': ('embed', 'mlp')}
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    return {tree.path_to_str(keypath): tuple(names) for keypath, names in leaves}


def inherited_axes(adapter: Any, param_axes: Any) -> dict:
    """Default adapter axes: a leaf at a parameter's path takes its axes; others are replicated.

    Right for methods whose adapter leaves replace parameters (full fine-tuning,
    BitFit); a replicated leaf has ``None`` for every dimension.

    Example:
        >>> import jax.numpy as jnp
        >>> adapter = {"dense": {"kernel": jnp.zeros((4, 2))}, "prompt": jnp.zeros((3, 4))}
        >>> inherited_axes(adapter, {"dense": {"kernel": ("embed", "mlp")}})
        {'dense': {'kernel': ('embed', 'mlp')}, 'prompt': (None, None)}
    """
    weight_axes = flatten_axes(param_axes)
    out = {}
    for path, leaf in tree.flatten(adapter).items():
        ndim = len(leaf.shape)
        axes = weight_axes.get(path, (None,) * ndim)
        if len(axes) != ndim:
            raise ValueError(f"adapter leaf {path!r} has shape {tuple(leaf.shape)} but the parameter at "
                             f"that path has logical axes {axes} ({len(axes)} dims)")
        out[path] = axes
    return tree.unflatten(out)
