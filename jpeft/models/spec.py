"""Parameter specs: every weight's shape, logical axes and initializer, before any array exists.

A model family describes its parameters as a tree of :class:`ParamSpec` (the same
nesting as the parameters). From it come the random parameters (:func:`init_params`),
their shapes without allocation (:func:`abstract_params`), the logical axes that
sharding and the methods read (:func:`param_axes`), and each weight's role
(:func:`layouts`, see :mod:`jpeft.layout`).

Example:
    >>> import jax
    >>> specs = {"dense": {"kernel": ParamSpec((4, 8), ("embed", "mlp")),
    ...                    "bias": ParamSpec((8,), ("mlp",), "zeros")}}
    >>> param_axes(specs)["dense"]["kernel"]
    ('embed', 'mlp')
    >>> init_params(specs, jax.random.key(0))["dense"]["bias"].tolist()
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    >>> layouts(specs)["dense/kernel"]
    Layout(kind='kernel', lead=0, inputs=1)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.layout import Layout, layout_of

INITS = ("normal", "zeros", "ones")


class ParamSpec(NamedTuple):
    """One parameter: shape, logical axis names, initializer, and a kernel's number of input axes."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"
    inputs: int = 1

    @property
    def layout(self) -> Layout:
        return layout_of(self.axes, inputs=self.inputs)

    def stacked(self, n: int, axis: str = "layers") -> "ParamSpec":
        """This spec with a leading stack axis of length ``n`` (scanned layers)."""
        return self._replace(shape=(n, *self.shape), axes=(axis, *self.axes))


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn, specs: Any) -> Any:
    """``fn(spec)`` for every spec, keeping the tree."""
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def param_axes(specs: Any) -> Any:
    """Logical axes of every parameter: the specs' tree with tuples as leaves.

    Tuples are pytree nodes, so map over it with ``is_leaf=lambda x: isinstance(x, tuple)``.
    """
    return map_specs(lambda s: tuple(s.axes), specs)


def layouts(specs: Any) -> dict[str, Layout]:
    """``{path: Layout}`` for every parameter."""
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    return {tree.path_to_str(keypath): spec.layout for keypath, spec in flat}


def abstract_params(specs: Any, dtype=jnp.float32) -> Any:
    """``jax.ShapeDtypeStruct`` leaves: the parameters' shapes without allocating them."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), specs)


def init_params(specs: Any, key: jax.Array, dtype=jnp.float32, *, stddev: float = 0.02) -> Any:
    """Random parameters: ``normal(0, stddev)`` for ``"normal"`` specs, zeros and ones otherwise.

    Works under ``jax.eval_shape`` (shapes without allocating).
    """
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(dtype)

    def make(spec: ParamSpec, k: jax.Array) -> jax.Array:
        if spec.init not in INITS:
            raise ValueError(f"unknown initializer {spec.init!r}; known: {INITS}")
        if spec.init == "normal":
            return (stddev * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
        fill = jnp.ones if spec.init == "ones" else jnp.zeros
        return fill(spec.shape, dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])
