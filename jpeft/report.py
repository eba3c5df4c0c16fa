"""Counting parameters: how much of a model an adapter trains.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((10, 10))}
    >>> adapter = {"w": {"a": jnp.ones((10, 1)), "b": jnp.ones((1, 10))}}
    >>> param_report(params, adapter).trainable
    20
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jpeft import stack
from jpeft import tree


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Trainable and total parameter counts and bytes."""

    trainable: int
    total: int
    trainable_bytes: int
    frozen_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || adapter bytes: {self.trainable_bytes:,} || "
            f"frozen bytes: {self.frozen_bytes:,}"
        )


def param_report(params: Any, adapter: Any) -> ParamReport:
    """Counts parameters of a frozen tree and the adapter trained on top of it.

    An adapter leaf at the same path as a parameter replaces it (full fine-tuning,
    BitFit), and so does one at ``layers_{i}/...`` over a stacked parameter (a trained
    layer's slice); any other adapter leaf adds to the model (LoRA factors, prompts).
    """
    flat_params = tree.flatten(params)
    flat_adapter = tree.flatten(adapter)
    trainable = sum(tree.leaf_size(v) for v in flat_adapter.values())
    frozen = {p: v for p, v in flat_params.items() if p not in flat_adapter}

    def replaces(path: str) -> bool:
        source, layer = stack.stacked_path(path)
        return path in flat_params or (layer is not None and source in flat_params)

    added = sum(tree.leaf_size(v) for p, v in flat_adapter.items() if not replaces(p))
    total = sum(tree.leaf_size(v) for v in flat_params.values()) + added
    return ParamReport(
        trainable=trainable,
        total=total,
        trainable_bytes=sum(tree.leaf_bytes(v) for v in flat_adapter.values()),
        frozen_bytes=sum(tree.leaf_bytes(v) for v in frozen.values()),
    )
