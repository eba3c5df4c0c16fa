"""DoRA: a LoRA update split into direction and magnitude (Liu et al., 2024), as ``jpeft.lora(use_dora=True)``.

Each adapted kernel ``W`` gets, besides LoRA's ``A`` and ``B``, a trainable magnitude
``m`` with one entry per output feature. The weight the model runs with is

    ``W' = (m / n) * (W + s * A @ B)``,  ``n = ||W + s * A @ B||`` over the input axes, per output feature

(Hugging Face PEFT's ``use_dora=True``; in torch's ``(out, in)`` orientation ``n`` is the
norm of each row). ``m`` starts at ``n`` (with ``B = 0`` that is ``||W||``), so a fresh
adapter changes nothing. As the paper's section 4.3 suggests and PEFT does, ``n`` is a
constant in the backward pass (``jax.lax.stop_gradient``).

:class:`DoraWeight` computes ``(m / n) * (x @ W + s * (x @ A) @ B)``: the output of
LoRA's own op, scaled per output feature. ``n`` needs ``W + s * A @ B``, which is formed
one weight at a time inside the op (a quantized ``W`` is dequantized there) and gets no
gradient, so no full-size gradient for ``W`` exists; the extra cost per weight is the
``in x out x r`` product ``A @ B`` (``benchmarks/lora_cost.py`` prints the FLOPs against
LoRA's step). With LoRA dropout on (``rng`` given to ``apply``) the base output is
computed again on the dropped-out input, as PEFT does:
``x @ W + (m/n - 1) * (d(x) @ W) + (m/n) * s * (d(x) @ A) @ B``.

Embedding tables are not adapted with DoRA (a clear error at ``init``).

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.arange(12.0).reshape(4, 3)}}
    >>> method = jpeft.lora(rank=2, targets=r".*/kernel", use_dora=True)
    >>> adapter = method.init(jax.random.key(0), params)
    >>> adapter["dense"]["kernel"]["m"].shape       # one magnitude per output feature
    (3,)
    >>> bool(jnp.allclose(method.merge(params, adapter)["dense"]["kernel"], params["dense"]["kernel"]))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import ops
from jpeft.methods.lora_weight import LoraWeight


def column_norm(weight: jax.Array, lead: int, inputs: int) -> jax.Array:
    """``||W||`` over a kernel's input axes: ``(*lead, *out)`` for ``W (*lead, *in, *out)``, in float32.

    Example:
        >>> column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), lead=0, inputs=1)
        Array([5., 1.], dtype=float32)
    """
    w = weight.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(lead, lead + inputs))))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoraWeight(ops.WeightWrapper):
    """A kernel with a DoRA update: LoRA's ``lora`` (a :class:`jpeft.LoraWeight`) and magnitude ``m (*lead, *out)``.

    Not a ``LoraWeight`` subclass on purpose: code that handles LoRA updates
    (combination, mixed batches) must not take a DoRA update for one.
    """

    lora: Any
    m: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.lora.shape

    @property
    def dtype(self):
        return self.lora.dtype

    @property
    def lead(self) -> int:
        return self.lora.lead

    @property
    def inputs(self) -> int:
        return self.lora.inputs

    def weight_norm(self) -> jax.Array:
        """``n = ||W + s A @ B||`` per output feature, ``(*lead, *out)`` float32, with no gradient."""
        full = ops.as_array(self.lora.base, jnp.float32) + self.lora.scale * self.lora.delta()
        return jax.lax.stop_gradient(column_norm(full, self.lead, self.inputs))

    def factor(self) -> jax.Array:
        """``m / n``, ``(*lead, *out)`` float32."""
        return self.m.astype(jnp.float32) / self.weight_norm()

    def _scaled(self, g: jax.Array, x: jax.Array, y: jax.Array, subscripts: str | None) -> jax.Array:
        """``y = x @ W`` plus the DoRA update, ``g = m / n`` laid out like ``y``'s output axes."""
        lora = self.lora
        if lora.dropout_key is None or lora.dropout_rate == 0.0:
            return g * (y + lora.update(x, subscripts))
        x_d = lora._dropout(x)  # PEFT: the base output again on the dropped-out input
        dropped = ops.linear(x_d, lora.base) if subscripts is None else ops.einsum(subscripts, x_d, lora.base)
        return y + (g - 1) * dropped + g * lora.update(x_d, subscripts)

    def linear(self, x: jax.Array) -> jax.Array:
        y = ops.linear(x, self.lora.base)
        g = self.factor()
        g = g.reshape(*g.shape[:self.lead], *(1,) * (y.ndim - g.ndim), *g.shape[self.lead:])
        return self._scaled(g.astype(y.dtype), x, y, None)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        if self.lead:
            raise ValueError("a stacked DoRA weight is used one layer at a time (scan slices the stack)")
        _, _, w_out, out = ops.split_subscripts(subscripts, self.inputs)
        kept = "".join(c for c in out if c in w_out)
        g = jnp.einsum(f"{w_out}->{kept}", self.factor())  # the output axes in the result's order
        g = g.reshape([g.shape[kept.index(c)] if c in kept else 1 for c in out])
        y = ops.einsum(subscripts, x, self.lora.base)
        return self._scaled(g.astype(y.dtype), x, y, subscripts)

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        raise TypeError("DoRA adapts kernels, not embedding tables")

    def attend(self, x: jax.Array) -> jax.Array:
        raise TypeError("DoRA adapts kernels, not embedding tables (nor a tied output head)")

    def materialize(self, dtype=None) -> jax.Array:
        """``(m / n) * (W + s A @ B)``, the merged weight (exact: the same ``n`` as the op)."""
        full = self.lora.materialize(jnp.float32)
        g = self.factor()
        g = g.reshape(*g.shape[:self.lead], *(1,) * self.inputs, *g.shape[self.lead:])
        return (g * full).astype(dtype or self.dtype)


def init_magnitude(weight, lead: int, inputs: int, a, b, scale: float, dtype) -> Any:
    """DoRA's starting magnitude ``||W + s A @ B||`` (``||W||`` when ``B = 0``); shapes only for abstract weights."""
    def norm(w, a_, b_):
        return DoraWeight(LoraWeight(base=w, a=a_, b=b_, scale=scale), jnp.zeros(())).weight_norm().astype(dtype)

    if isinstance(weight, jax.ShapeDtypeStruct):
        return jax.eval_shape(norm, weight, a, b)
    return norm(weight, a, b)
