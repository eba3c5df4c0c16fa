"""Full fine-tuning as a method: the baseline every PEFT method is measured against.

The adapter is a copy of the selected parameters (all of them by default), and
``apply`` puts it in place of the originals. Pass ``jpeft.tree.without(params,
adapter)`` as the frozen tree to a train step so weights are not held twice.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    >>> method = jpeft.full()
    >>> adapter = method.init(jax.random.key(0), params)
    >>> sorted(jpeft.tree.flatten(adapter))
    ['dense/bias', 'dense/kernel']
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft import ops, tree
from jpeft.methods.base import Method


def full(targets: tree.Targets = r".*") -> Method:
    """Trains the selected parameters in place (default: every parameter)."""
    rules = tree.as_rules(targets)

    def init_fn(key: jax.Array, params: Any) -> dict:
        del key
        selected, _ = tree.split(params, rules)
        # Copy, so donating the adapter to a train step never frees the base params.
        return jax.tree_util.tree_map(lambda x: jnp.array(ops.as_array(x), copy=True), selected)

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> dict:
        del rng
        flat_params = tree.flatten(params)
        for path, leaf in tree.flatten(adapter).items():
            if path in flat_params and tuple(flat_params[path].shape) != tuple(leaf.shape):
                raise ValueError(f"adapter leaf {path!r} has shape {tuple(leaf.shape)} but the "
                                 f"parameter has shape {tuple(flat_params[path].shape)}")
        return tree.combine(params, adapter)

    def merge_fn(params: Any, adapter: Any) -> dict:
        return apply_fn(params, adapter)

    return Method("full", init_fn, apply_fn, merge_fn)
