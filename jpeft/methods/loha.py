"""LoHa: a Hadamard product of two low-rank updates, ``dW = (A1 @ B1) * (A2 @ B2) * alpha / r`` (FedPara; LyCORIS).

As Hugging Face PEFT's ``LoHaConfig``: per kernel four factors of rank ``r``, scale
``alpha / r``. Flax-oriented (a kernel ``(*in, *out)`` is ``(I, O)``): ``a1``, ``a2``
are ``(*in, r)`` and ``b1``, ``b2`` are ``(r, *out)``; PEFT's ``hada_w1_a`` ``(O, r)`` is
``b1`` transposed, ``hada_w1_b`` ``(r, I)`` is ``a1`` transposed, and so on. Init follows
PEFT's default: every factor ``kaiming_uniform(a=sqrt(5))`` (``U(+-1/sqrt(fan_in))``)
except ``a2`` (``hada_w2_b``), which starts at zero, so a fresh adapter changes nothing.

**Cost.** The elementwise product of two rank-``r`` matrices has rank up to ``r**2``: a
LoHa update is full-size in general, so ``apply`` forms ``dW`` inside each op, one
weight at a time (as PEFT does), and runs ``x @ (W + dW)``. Its gradient is a full-size
matrix per adapted weight, like full fine-tuning's for those weights (``W`` itself gets
none); the trainable parameters and optimizer state stay small (``4 r`` per pair of
dimensions). ``benchmarks/lora_cost.py`` prints the compiled FLOPs against LoRA's.

Only kernels are adapted (PEFT's LoHa has no embedding layer); PEFT's ``rank_dropout``
and ``module_dropout`` are not implemented (jpeft trains LoHa without them).

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
    >>> method = jpeft.loha(rank=2, alpha=4, targets=r".*/kernel")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> {k: v.shape for k, v in sorted(adapter["dense"]["kernel"].items())}
    {'a1': (4, 2), 'a2': (4, 2), 'b1': (2, 3), 'b2': (2, 3)}
    >>> bool((method.merge(params, adapter)["dense"]["kernel"] == 1).all())   # a2 == 0
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.methods import delta, registry
from jpeft.methods.base import Method


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LohaWeight(delta.DeltaWeight):
    """A weight plus its LoHa update; ops run ``x @ (W + s * dW)`` (``dW`` formed per weight, in the op)."""

    def _dense(self, factors: dict) -> jax.Array:
        def product(a, b):
            a_IxR = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
            b_RxO = b.reshape(b.shape[0], -1).astype(jnp.float32)
            return a_IxR @ b_RxO
        return product(factors["a1"], factors["b1"]) * product(factors["a2"], factors["b2"])

    factor_axes = staticmethod(delta.low_rank_axes)


def _factor_shapes(d_in: tuple, d_out: tuple, rank: int) -> delta.Shapes:
    return {"a1": (*d_in, rank), "b1": (rank, *d_out), "a2": (*d_in, rank), "b2": (rank, *d_out)}


def _init(key: jax.Array, shapes: delta.Shapes, in_size: int, out_size: int, rank: int, dtype) -> dict:
    k_a1, k_b1, k_b2 = jax.random.split(key, 3)
    return {"a1": delta.kaiming_uniform(k_a1, shapes["a1"], in_size, dtype),   # hada_w1_b (r, I)
            "b1": delta.kaiming_uniform(k_b1, shapes["b1"], rank, dtype),      # hada_w1_a (O, r)
            "a2": jnp.zeros(shapes["a2"], dtype),                              # hada_w2_b: zero
            "b2": delta.kaiming_uniform(k_b2, shapes["b2"], rank, dtype)}      # hada_w2_a (O, r)


KIND = delta.DeltaKind("loha", "LoHa", _factor_shapes, _init, LohaWeight, lambda r: f"loha r={r}")


def loha(
    rank: int = 8,
    alpha: float = 8.0,
    targets: tree.Targets = r".*/(q|k|v|o)_proj/kernel",
    *,
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """Builds a LoHa method (defaults: Hugging Face PEFT's ``LoHaConfig``, ``r=8, alpha=8``).

    Args:
        rank: rank ``r`` of each of the two products (a :class:`jpeft.Rule` may override it).
        alpha: scale numerator: ``dW = (A1 B1) * (A2 B2) * alpha / r`` (a rule may override it).
        targets: which kernels to adapt (regexes fullmatched against ``/``-joined paths,
            predicates, or :class:`jpeft.Rule` objects with ``rank`` / ``alpha``).
        dtype: dtype of the trainable factors.
        model: the :class:`jpeft.models.Model` whose parameters are adapted (roles from
            logical axes: a kernel's input and output axes).

    Returns:
        A :class:`jpeft.Method`; its adapter holds ``{"a1", "b1", "a2", "b2"}`` per kernel.
    """
    return delta.delta_method(KIND, rank, alpha, targets, dtype=dtype, model=model)


registry.register("loha", loha)
