"""Deterministic cost figures for a train step, from XLA's compiled analysis.

Wall-clock timings are noisy on shared machines; FLOPs and bytes from the
compiled program are not. These helpers compile ``value_and_grad`` of a loss with
respect to the adapter alone, which is the step a PEFT method trains with.

Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda adapter, x: jnp.sum((x @ adapter["w"]) ** 2)
    >>> cost = grad_step_cost(loss, {"w": jnp.ones((4, 4))}, jnp.ones((2, 4)))
    >>> cost.flops > 0
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class StepCost:
    """FLOPs of a compiled step and its peak temporary memory."""

    flops: float
    bytes_accessed: float
    temp_bytes: int
    argument_bytes: int


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree)


def grad_step_cost(loss_fn: Callable[..., jax.Array], adapter: Any, *args: Any) -> StepCost:
    """Compiles ``jax.value_and_grad(loss_fn)(adapter, *args)`` and reads its cost.

    Arguments may be arrays or ``jax.ShapeDtypeStruct`` (nothing is allocated).

    XLA's cost analysis counts the body of a loop once: for a model whose layers run
    in ``jax.lax.scan`` (``scan_layers=True``) the figure covers one layer, not all of
    them. Measure an unrolled model (its layers' FLOPs are identical), or compile it with
    1 and 2 layers and extrapolate, as ``benchmarks/step_time.py`` does.
    """
    step = jax.jit(jax.value_and_grad(loss_fn))
    compiled = step.lower(_abstract(adapter), *map(_abstract, args)).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
        cost = cost[0]
    memory = compiled.memory_analysis()
    return StepCost(
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
        argument_bytes=int(getattr(memory, "argument_size_in_bytes", 0)),
    )
