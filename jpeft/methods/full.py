"""Full fine-tuning as a method: the baseline every PEFT method is measured against.

The adapter is a copy of the selected parameters (all of them by default), shaped like
the parameter tree with ``None`` where a parameter is not selected, and ``apply`` puts it
in place of the originals. Pass ``jpeft.tree.without(params, adapter)`` as the frozen
tree to a train step so weights are not held twice.

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
from jpeft.methods import registry
from jpeft.methods.base import Method


def full(targets: tree.Targets = r".*") -> Method:
    """Trains the selected parameters in place (default: every parameter).

    A quantized (or otherwise wrapped) weight cannot be trained in place: selecting one
    is an error that names it.
    """
    rules = tree.as_rules(targets)

    def init_fn(key: jax.Array, params: Any) -> Any:
        del key
        selected, _ = tree.split(params, rules)
        wrapped = sorted(p for p, leaf in tree.flatten(selected).items() if ops.is_wrapper(leaf))
        if wrapped:
            raise ValueError(f"full fine-tuning trains weights in place, but {wrapped[0]!r} is a "
                             f"{type(tree.flatten(selected)[wrapped[0]]).__name__} (a quantized base cannot be "
                             "trained); load the base unquantized, or use LoRA on it (QLoRA)")
        # Copy, so donating the adapter to a train step never frees the base params.
        return jax.tree.map(lambda x: jnp.array(x, copy=True), selected)

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        del rng
        flat_params = tree.flatten(params)
        for path, leaf in tree.flatten(adapter).items():
            if path in flat_params and tuple(flat_params[path].shape) != tuple(leaf.shape):
                raise ValueError(f"adapter leaf {path!r} has shape {tuple(leaf.shape)} but the "
                                 f"parameter has shape {tuple(flat_params[path].shape)}")
        return tree.combine(adapter, params)

    return Method("full", init_fn, apply_fn, apply_fn, label="full fine-tuning")


registry.register("full", full)
