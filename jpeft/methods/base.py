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

``jax.grad``, optax and orbax see the adapter alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class Method(NamedTuple):
    """A PEFT method as a record of pure functions (see the module docstring)."""

    name: str
    init: Callable[..., Any]
    apply: Callable[..., Any]
    merge: Callable[[Any, Any], Any]
