"""LoKr: a Kronecker-product update, ``dW = kron(W1, W2) * alpha / r`` (LyCORIS; Hugging Face PEFT's ``LoKrConfig``).

A kernel seen as the matrix ``(I, O)`` (input axes flattened, then output axes) has its
sizes factored as PEFT's ``factorization(dim, decompose_factor)`` does (:func:`factorization`):
``I = in_m * in_n``, ``O = out_l * out_k``. Flax-oriented, ``W1`` is ``(in_m, out_l)`` and
``W2`` is ``(in_n, out_k)``, and ``dW = kron(W1, W2) * alpha / r`` (the transpose of PEFT's
``kron(lokr_w1, lokr_w2)``, ``(O, I)``). As in PEFT:

* ``W2`` is low-rank, ``a2 (in_n, r) @ b2 (r, out_k)`` (``lokr_w2_b``, ``lokr_w2_a``
  transposed), when ``r < max(in_n, out_k) / 2``; otherwise it is one full factor ``w2``;
* ``W1`` is one full factor ``w1`` unless ``decompose_both`` and ``r < max(in_m, out_l) / 2``,
  when it is ``a1 (in_m, r) @ b1 (r, out_l)``;
* the scale is ``alpha / r`` in every case, also when both factors are full (PEFT
  0.21's ``scaling``; LyCORIS itself uses 1 there);
* init: ``w1`` (or ``b1``, PEFT's ``lokr_w1_a``) starts at zero, the others
  ``kaiming_uniform(a=sqrt(5))``, so a fresh adapter changes nothing.

``apply`` never forms ``dW``: ``x @ kron(W1, W2)`` is two small contractions over ``x``
reshaped to ``(..., in_m, in_n)``: ``y[u, v] = sum_pq x[p, q] W1[p, u] W2[q, v]``, flattened
``u * out_k + v`` (:meth:`LokrWeight._apply`). Only kernels are adapted (PEFT's LoKr has
no embedding layer); PEFT's ``rank_dropout`` / ``module_dropout`` are not implemented.

Example:
    >>> factorization(576), factorization(192), factorization(128, 4)
    ((24, 24), (12, 16), (4, 32))
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((64, 32))}}
    >>> adapter = jpeft.lokr(rank=2, targets=r".*/kernel").init(jax.random.key(0), params)
    >>> {k: v.shape for k, v in sorted(adapter["dense"]["kernel"].items())}
    {'a2': (8, 2), 'b2': (2, 8), 'w1': (8, 4)}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.errors import SettingError
from jpeft.methods import delta, registry
from jpeft.methods.base import Method


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension``, chosen exactly as Hugging Face PEFT's LoKr ``factorization``.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)``
    as it is. Otherwise the pair climbs through the divisors ``m`` of ``dimension`` from 1
    while ``m < n`` and ``m`` does not exceed ``factor`` (``-1``: no limit, so the pair
    closest to the square root), and the smaller number comes first.

    Example:
        >>> factorization(256), factorization(127), factorization(128, 3)
        ((16, 16), (1, 127), (2, 64))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        bigger = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if bigger > limit:
            break
        m, n = bigger, dimension // bigger
    return (n, m) if m > n else (m, n)


def factor_sizes(in_size: int, out_size: int, rank: int, decompose_both: bool, decompose_factor: int) -> delta.Shapes:
    """The factors of one ``(I, O)`` kernel: ``w1`` or ``a1``/``b1``, and ``w2`` or ``a2``/``b2`` (Flax-oriented).

    Example:
        >>> factor_sizes(576, 192, 8, False, -1)
        {'w1': (24, 12), 'a2': (24, 8), 'b2': (8, 16)}
    """
    in_m, in_n = factorization(in_size, decompose_factor)
    out_l, out_k = factorization(out_size, decompose_factor)
    shapes: delta.Shapes = {}
    if decompose_both and rank < max(in_m, out_l) / 2:
        shapes["a1"], shapes["b1"] = (in_m, rank), (rank, out_l)
    else:
        shapes["w1"] = (in_m, out_l)
    if rank < max(in_n, out_k) / 2:
        shapes["a2"], shapes["b2"] = (in_n, rank), (rank, out_k)
    else:
        shapes["w2"] = (in_n, out_k)
    return shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LokrWeight(delta.DeltaWeight):
    """A weight plus its LoKr update; ops run ``x @ W + s * x @ kron(W1, W2)`` without forming the product.

    ``decompose_both`` / ``decompose_factor`` are the method's settings that made the
    factors (the PEFT export writes them).
    """

    decompose_both: bool = dataclasses.field(default=False, metadata=dict(static=True))
    decompose_factor: int = dataclasses.field(default=-1, metadata=dict(static=True))

    @staticmethod
    def _pair(factors: dict, dtype) -> tuple[jax.Array, Any]:
        """``W1`` (formed: it is small) and ``W2`` as a full matrix or an ``(a2, b2)`` pair."""
        f = {k: v.astype(dtype) for k, v in factors.items()}
        w1 = f["w1"] if "w1" in f else f["a1"] @ f["b1"]
        return w1, (f["w2"] if "w2" in f else (f["a2"], f["b2"]))

    def _dense(self, factors: dict) -> jax.Array:
        w1, w2 = self._pair(factors, jnp.float32)
        return jnp.kron(w1, w2 if not isinstance(w2, tuple) else w2[0] @ w2[1])

    def _apply(self, x_NxI: jax.Array) -> jax.Array:
        w1_MxL, w2 = self._pair(self.factors, x_NxI.dtype)
        x_NxMxN = x_NxI.reshape(*x_NxI.shape[:-1], w1_MxL.shape[0], -1)
        h_NxMxK = x_NxMxN @ w2 if not isinstance(w2, tuple) else (x_NxMxN @ w2[0]) @ w2[1]
        y_NxLxK = jnp.einsum("...pv,pu->...uv", h_NxMxK, w1_MxL)
        return y_NxLxK.reshape(*x_NxI.shape[:-1], -1)

    @staticmethod
    def factor_axes(name: str, in_axes: tuple, out_axes: tuple) -> tuple:
        """Kronecker factors mix the weight's dimensions: replicated (they are small); rank axes as LoRA's."""
        return {"a": (None, delta.RANK_AXIS), "b": (delta.RANK_AXIS, None)}.get(name[0], (None, None))


def _init(key: jax.Array, shapes: delta.Shapes, in_size: int, out_size: int, rank: int, dtype) -> dict:
    keys = dict(zip(("a1", "w2", "a2", "b2"), jax.random.split(key, 4)))
    out = {}
    for name, shape in shapes.items():
        if name in ("w1", "b1"):                       # lokr_w1 / lokr_w1_a: zero
            out[name] = jnp.zeros(shape, dtype)
        elif name == "b2":                             # lokr_w2_a (out_k, r): fan-in r
            out[name] = delta.kaiming_uniform(keys[name], shape, rank, dtype)
        else:                                          # lokr_w1_b, lokr_w2_b, lokr_w2: fan-in in_m / in_n
            out[name] = delta.kaiming_uniform(keys[name], shape, shape[-2], dtype)
    return out


def _kind(decompose_both: bool, decompose_factor: int) -> delta.DeltaKind:
    def shapes(d_in: tuple, d_out: tuple, rank: int) -> delta.Shapes:
        import math

        return factor_sizes(math.prod(d_in), math.prod(d_out), rank, decompose_both, decompose_factor)

    return delta.DeltaKind("lokr", "LoKr", shapes, _init, LokrWeight, lambda r: f"lokr r={r}",
                           options=(("decompose_both", decompose_both), ("decompose_factor", decompose_factor)))


def lokr(
    rank: int = 8,
    alpha: float = 8.0,
    targets: tree.Targets = r".*/(q|k|v|o)_proj/kernel",
    *,
    decompose_both: bool = False,
    decompose_factor: int = -1,
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """Builds a LoKr method (defaults: Hugging Face PEFT's ``LoKrConfig``, ``r=8, alpha=8``).

    Args:
        rank: rank ``r`` of the low-rank Kronecker factor(s) (a :class:`jpeft.Rule` may override it).
        alpha: scale numerator, ``alpha / r`` (a rule may override it).
        targets: which kernels to adapt (regexes, predicates or :class:`jpeft.Rule` objects).
        decompose_both: also make ``W1`` low-rank when ``r < max(in_m, out_l) / 2`` (PEFT's option).
        decompose_factor: the size one factor of each dimension aims at (``-1``: near the
            square root); PEFT's ``decompose_factor``.
        dtype: dtype of the trainable factors.
        model: the :class:`jpeft.models.Model` whose parameters are adapted.

    Returns:
        A :class:`jpeft.Method`; its adapter holds ``w1`` or ``a1``/``b1`` and ``w2`` or
        ``a2``/``b2`` per kernel (see :func:`factor_sizes`).
    """

    if not isinstance(decompose_both, bool):
        raise SettingError("decompose_both", decompose_both, "must be true or false", what="LoKr")
    if isinstance(decompose_factor, bool) or not isinstance(decompose_factor, int) or \
            not (decompose_factor == -1 or decompose_factor > 0):
        raise SettingError("decompose_factor", decompose_factor, "must be -1 (near the square root) or a positive "
                           "integer", what="LoKr")
    method = delta.delta_method(_kind(decompose_both, decompose_factor), rank, alpha, targets, dtype=dtype,
                                model=model)
    return method._replace(label=f"lokr r={rank}" + (" both" if decompose_both else "")
                           + (f" factor={decompose_factor}" if decompose_factor != -1 else ""))


registry.register("lokr", lokr)
