"""The leaf LoRA puts in place of an adapted weight: the frozen base plus its two factors.

jpeft's ops (:mod:`jpeft.ops`) run it as ``x @ W + s * ((x @ A) @ B)`` without forming
``W + s * A @ B``; :mod:`jpeft.methods.lora` builds it, DoRA (:mod:`jpeft.methods.dora`) and
the PiSSA / OLoRA inits (:mod:`jpeft.methods.lora_init`) build on it.

Example:
    >>> import jax.numpy as jnp
    >>> w = LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=2.0)
    >>> w.materialize().tolist() == jnp.ones((4, 3)).tolist()
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import ops


def _letters(n: int, start: int = 0) -> str:
    return "abcdefghijklmnopqrstuvw"[start:start + n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x_NxI, a_IxR, b_RxO, scale: float) -> jax.Array:
    """``s * (x @ A) @ B`` over any leading axes of ``x``, whose backward pass contracts them in place.

    The derivative JAX derives for ``A`` multiplies the transposed input ``x^T (dy B^T)``, for
    which XLA's CPU matmul copies ``x`` transposed (an activation-sized copy per adapted
    weight); here it is ``((dy B^T)^T x)^T``: only rank-sized arrays are transposed.
    """
    return ((x_NxI @ a_IxR) * scale) @ b_RxO


def _low_rank_fwd(x_NxI, a_IxR, b_RxO, scale):
    h_NxR = (x_NxI @ a_IxR) * scale
    return h_NxR @ b_RxO, (x_NxI, a_IxR, b_RxO, h_NxR)


def _low_rank_bwd(scale, residuals, dy_NxO):
    x_NxI, a_IxR, b_RxO, h_NxR = residuals
    dh_NxR = jnp.einsum("...o,ro->...r", dy_NxO, b_RxO) * scale
    db_RxO = jnp.einsum("...r,...o->ro", h_NxR, dy_NxO)
    da_IxR = jnp.einsum("...r,...i->ri", dh_NxR, x_NxI).T
    dx_NxI = jnp.einsum("...r,ir->...i", dh_NxR, a_IxR)
    return dx_NxI, da_IxR, db_RxO


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight(ops.OverBase):
    """A weight plus its low-rank update, used by :mod:`jpeft.ops` without merging.

    ``base`` may itself be a wrapper (e.g. a quantized weight: that is QLoRA). The
    factors' shapes say the weight's layout: ``a (*lead, *in, r)``, ``b (*lead, r, *out)``.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    dropout_rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    tie_output: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def lead(self) -> int:
        """Leading stack axes (shrinks when ``scan`` slices a layer off)."""
        return self.a.ndim + self.b.ndim - len(self.shape) - 2

    @property
    def inputs(self) -> int:
        return self.a.ndim - 1 - self.lead

    def _dropout(self, x: jax.Array) -> jax.Array:
        if self.dropout_key is None or self.dropout_rate == 0.0:
            return x
        keep = 1.0 - self.dropout_rate
        mask = jax.random.bernoulli(self.dropout_key, keep, x.shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)

    def update(self, x: jax.Array, subscripts: str | None = None) -> jax.Array:
        """The low-rank term ``s * (x @ A) @ B`` alone (no dropout), for ``linear`` or an ``einsum``.

        ``s`` multiplies the rank-``r`` intermediate, not the output: the same product, but
        the backward pass then scales ``(.., r)`` values instead of the ``(.., out)`` gradient.
        """
        if subscripts is None:
            a, b = self.a.astype(x.dtype), self.b.astype(x.dtype)
            if a.ndim == 2 and b.ndim == 2:
                return _low_rank(x, a, b, self.scale)
            return ((x @ a) * self.scale) @ b
        x_sub, w_in, w_out, out = ops.split_subscripts(subscripts, self.inputs)
        r = ops.free_letter(subscripts)
        kept = "".join(c for c in x_sub if c not in w_in)
        h = jnp.einsum(f"{x_sub},{w_in}{r}->{kept}{r}", x, self.a.astype(x.dtype)) * self.scale
        return jnp.einsum(f"{kept}{r},{r}{w_out}->{out}", h, self.b.astype(x.dtype))

    def linear(self, x: jax.Array) -> jax.Array:
        return ops.linear(x, self.base) + self.update(self._dropout(x))

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        return ops.einsum(subscripts, x, self.base) + self.update(self._dropout(x), subscripts)

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        rows = ops.embed(ids, self.base, dtype)
        delta = jnp.take(self.a, ids, axis=0).astype(dtype) @ self.b.astype(dtype)
        return rows + self.scale * delta

    def attend(self, x: jax.Array) -> jax.Array:
        """A table used as the tied output head: the delta only with ``tie_output`` (see the module docstring)."""
        y = ops.attend(x, self.base)
        if not self.tie_output:
            return y
        # x @ (W + s A B).T  =  x @ W.T + s (x @ B.T) @ A.T
        return y + ((x @ self.b.astype(x.dtype).T) * self.scale) @ self.a.astype(x.dtype).T

    def delta(self) -> jax.Array:
        """``A @ B`` contracted over the rank, float32, of the weight's shape."""
        lead, n_in = self.lead, self.inputs
        n_out = self.b.ndim - lead - 1
        lead_s, in_s, out_s = _letters(lead), _letters(n_in, lead), _letters(n_out, lead + n_in)
        return jnp.einsum(f"{lead_s}{in_s}z,{lead_s}z{out_s}->{lead_s}{in_s}{out_s}",
                          self.a.astype(jnp.float32), self.b.astype(jnp.float32))

    def materialize(self, dtype=None) -> jax.Array:
        base = ops.as_array(self.base, jnp.float32)
        return (base + self.scale * self.delta()).astype(dtype or self.dtype)
