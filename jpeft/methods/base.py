"""The record every PEFT method is: a name and three pure functions.

``init(key, params) -> adapter``
    The trainable pytree. It works on concrete arrays and on
    ``jax.ShapeDtypeStruct`` leaves, so ``jax.eval_shape(method.init, key, params)``
    gives the adapter's shapes without allocating the model.
``apply(params, adapter, *, rng=None) -> params``
    The parameters the model runs with. Weight methods wrap leaves in
    :class:`jpeft.ops.WeightWrapper` objects that jpeft's models use efficiently.
    ``rng`` switches on training-time randomness (e.g. LoRA dropout).
``merge(params, adapter) -> params``
    Plain arrays with the adapter folded in: zero inference overhead, and the
    generic way to use an adapter with Flax models that jpeft does not own.
``logical_axes(adapter, param_axes) -> adapter_axes`` (optional)
    Logical axis names for every adapter leaf, given the parameters' (e.g.
    :func:`jpeft.models.llama.param_axes`): a tree of tuples shaped like the
    adapter. :mod:`jpeft.sharding` turns them into shardings, so adapters live
    where their weights live. ``None`` means :func:`inherited_axes`.

``jax.grad``, optax and orbax see the adapter alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jpeft import tree

Axes = tuple[str | None, ...]


class Method(NamedTuple):
    """A PEFT method as a record of pure functions (see the module docstring)."""

    name: str
    init: Callable[..., Any]
    apply: Callable[..., Any]
    merge: Callable[[Any, Any], Any]
    logical_axes: Callable[[Any, Any], Any] | None = None


def flatten_axes(axes: Any) -> dict[str, Axes]:
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


def tile_ids(init_ids, n: int, vocab: int) -> list[int]:
    """The token ids of an initialisation text repeated to ``n`` tokens (as Hugging Face PEFT does).

    Example:
        >>> tile_ids([4, 9], 5, vocab=10)
        [4, 9, 4, 9, 4]
    """
    ids = [int(i) for i in init_ids]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"init_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    return (ids * (n // len(ids) + 1))[:n]
