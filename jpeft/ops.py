"""The few ops through which jpeft's own models use a weight.

Every weight use in :mod:`jpeft.models` goes through :func:`linear`, :func:`einsum`,
:func:`embed` or :func:`attend`. Each op dispatches on the leaf it is given:

* a plain array is used as it is;
* a :class:`WeightWrapper` (a LoRA-wrapped weight, a quantized weight, ...) runs
  its own version of the op, so that e.g. LoRA computes ``x @ W + s * (x @ A) @ B``
  without ever forming ``W + s * A @ B``.

This is what lets one copy of the model code run frozen, LoRA, quantized and
merged weights.

Example:
    >>> import jax.numpy as jnp
    >>> from jpeft import ops
    >>> ops.linear(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    >>> ops.einsum("btd,dnh->btnh", jnp.ones((1, 2, 3)), jnp.ones((3, 4, 5))).shape
    (1, 2, 4, 5)
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp


class WeightWrapper(abc.ABC):
    """A pytree leaf-like object that stands in for a weight array.

    Subclasses are registered pytree nodes (dataclasses) and implement the ops
    they support. ``materialize`` must always work: it is the generic fallback
    used by ``merge`` and by models that do not go through :mod:`jpeft.ops`.
    """

    @abc.abstractmethod
    def materialize(self, dtype=None) -> jax.Array:
        """The plain weight array this wrapper stands for."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight this wrapper stands for."""

    def linear(self, x: jax.Array) -> jax.Array:
        """``x @ W`` for a kernel ``W`` of shape ``(in, out)``."""
        return x @ self.materialize(x.dtype)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        """``jnp.einsum(subscripts, x, W)``: a multi-axis kernel (DenseGeneral, Einsum layers)."""
        return jnp.einsum(subscripts, x, self.materialize(x.dtype))

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        """Rows ``W[ids]`` of an embedding table ``W`` of shape ``(vocab, dim)``."""
        return jnp.take(self.materialize(dtype), ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """``x @ W.T`` for an embedding table used as a tied output projection."""
        return x @ self.materialize(x.dtype).T

    def add_bias(self, y: jax.Array) -> jax.Array:
        """``y + b`` for a bias ``b`` this wrapper stands for (a per-row bias overrides it)."""
        return y + self.materialize(y.dtype)

    def partition_specs(self, axes: tuple, spec_for) -> Any:
        """This wrapper with a ``PartitionSpec`` in place of each array it holds.

        ``axes`` are the logical axes of the weight it stands for; ``spec_for(axes,
        shape, what, strict=True)`` turns logical axes into a spec on the current mesh
        (see :func:`jpeft.sharding.logical_specs`). Wrappers that hold frozen data (a
        quantized weight) say how their arrays follow the weight's axes; others cannot
        be sharded before ``apply``.
        """
        raise NotImplementedError(f"cannot shard a {type(self).__name__}; shard the frozen parameters and the "
                                  "adapter separately, before method.apply")



class OverBase(WeightWrapper):
    """A wrapper that adds to a frozen weight held in its field ``base`` (an array or another wrapper).

    It stands for a weight of the base's shape and dtype (LoRA, DoRA's inner LoRA, LoHa,
    LoKr, IA3, and their per-row forms).
    """

    base: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return getattr(self.base, "dtype", jnp.float32)


def is_wrapper(leaf) -> bool:
    """True for leaves that are jpeft weight wrappers rather than arrays."""
    return isinstance(leaf, WeightWrapper)


def linear(x: jax.Array, kernel, bias=None) -> jax.Array:
    """Dense layer ``x @ kernel + bias`` with ``kernel`` of shape ``(in, out)``.

    The kernel is cast to ``x.dtype`` (the compute dtype) before the matmul.
    """
    if is_wrapper(kernel):
        y = kernel.linear(x)
    else:
        y = x @ kernel.astype(x.dtype)
    if is_wrapper(bias):
        y = bias.add_bias(y)
    elif bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def einsum(subscripts: str, x: jax.Array, kernel) -> jax.Array:
    """``jnp.einsum(subscripts, x, kernel)`` in ``x``'s dtype, for kernels with several input or output axes.

    The kernel's subscripts list its input axes (contracted with ``x``) first, then its
    output axes, as a Flax ``DenseGeneral`` kernel is laid out.
    """
    if is_wrapper(kernel):
        return kernel.einsum(subscripts, x)
    return jnp.einsum(subscripts, x, kernel.astype(x.dtype))


def embed(ids: jax.Array, table, dtype=jnp.float32) -> jax.Array:
    """Look up rows of an embedding table of shape ``(vocab, dim)`` in ``dtype``."""
    if is_wrapper(table):
        return table.embed(ids, dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def attend(x: jax.Array, table) -> jax.Array:
    """Project ``x`` onto an embedding table: ``x @ table.T`` (tied output head)."""
    if is_wrapper(table):
        return table.attend(x)
    return x @ table.astype(x.dtype).T


def as_array(leaf, dtype=None) -> jax.Array:
    """A plain array for any leaf (materializing wrappers), optionally cast."""
    if is_wrapper(leaf):
        return leaf.materialize(dtype)
    return leaf if dtype is None else leaf.astype(dtype)


def split_subscripts(subscripts: str, kernel_inputs: int) -> tuple[str, str, str, str]:
    """``(x, kernel inputs, kernel outputs, result)`` subscripts of a two-operand einsum.

    Example:
        >>> split_subscripts("btd,dnh->btnh", 1)
        ('btd', 'd', 'nh', 'btnh')
    """
    operands, _, out = subscripts.replace(" ", "").partition("->")
    x, _, w = operands.partition(",")
    if not out or not w or not 0 < kernel_inputs < len(w):
        raise ValueError(f"einsum {subscripts!r}: expected 'x,kernel->out' with {kernel_inputs} kernel input axes")
    return x, w[:kernel_inputs], w[kernel_inputs:], out


def free_letter(*used: str) -> str:
    """An einsum letter that none of ``used`` contains."""
    taken = set("".join(used))
    return next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in taken)
