"""LoRA initialisations that take the adapter from the base weight: PiSSA and OLoRA.

Hugging Face PEFT's ``init_lora_weights="pissa"`` / ``"pissa_niter_K"`` / ``"olora"``, as
``jpeft.lora(init=...)``. Both start the factors at a rank-``r`` piece of the weight ``W``
and take that piece out of the base, so a fresh adapter leaves the model unchanged:

* **PiSSA** (Meng et al., 2024): the top-``r`` singular triplets ``W = U S V^T``:
  ``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) V_r^T`` (so ``s * A @ B = U_r S_r V_r^T``).
  ``pissa_niter_K`` uses a randomized SVD with ``K`` subspace iterations (PEFT's
  ``torch.svd_lowrank`` with ``q = r``): faster on large weights, approximate.
* **OLoRA** (Büyükakyüz, 2024): the reduced QR decomposition of ``W^T`` (torch's
  ``(out, in)`` weight) ``= Q R``: ``A = R_r^T`` and ``B = Q_r^T`` (not divided by ``s``).

Both read a kernel ``(*lead, *in, *out)`` as the matrix ``(prod(in), prod(out))``, one per
stacked layer. The base that goes with the fresh adapter is ``W - s * A @ B``
(:func:`residual`); ``jpeft.lora``'s ``rebase`` returns it (see :class:`jpeft.Method`),
and :func:`jpeft.methods.lora.as_plain_lora` turns a trained adapter back into a LoRA adapter for the
*original* weights: rank ``2r``, ``A' = [A, A0]``, ``B' = [B; -B0]`` (PEFT's
``path_initial_model_for_weight_conversion``).

Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> w = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)
    >>> a, b = factors(w, "pissa", rank=2, scale=2.0, lead=0, inputs=1)
    >>> a.shape, b.shape
    ((6, 2), (2, 4))
    >>> s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    >>> bool(np.allclose(np.linalg.svd(np.asarray(2.0 * a @ b), compute_uv=False)[:2], s[:2], rtol=1e-5))
    True
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp

from jpeft.methods.lora_weight import LoraWeight
from jpeft.quant.array import is_quantized
from jpeft.quant.quantize import quantize_array

BASE_CHANGING = re.compile(r"pissa|pissa_niter_[1-9][0-9]*|olora")
"""The ``init`` values whose adapter is taken out of the base weight."""


def changes_base(init: str) -> bool:
    """Whether ``init`` takes its factors out of the base weight (so the base must be rebased).

    Example:
        >>> changes_base("pissa_niter_4"), changes_base("kaiming")
        (True, False)
    """
    return BASE_CHANGING.fullmatch(init) is not None


def _matrix_factors(w: jax.Array, init: str, rank: int, scale: float, key: jax.Array | None):
    """``(A (in, r), B (r, out))`` of one float32 matrix ``w (in, out)``."""
    if init == "olora":
        q, r_ = jnp.linalg.qr(w.T)            # torch's weight (out, in) = Q R
        return r_[:rank].T, q[:, :rank].T     # A = R_r^T (in, r), B = Q_r^T (r, out)
    if init == "pissa":
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    else:
        u, s, vt = _randomized_svd(w, rank, int(init.rsplit("_", 1)[1]), key)
    root = jnp.sqrt(s / scale)
    return u * root[None, :], root[:, None] * vt


def _randomized_svd(w: jax.Array, rank: int, niter: int, key: jax.Array):
    """Top-``rank`` SVD by subspace iteration from a random start (Halko et al., 2011; torch's ``svd_lowrank``)."""
    q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], rank), w.dtype))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    u_small, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u_small, s, vt


def factors(weight: jax.Array, init: str, *, rank: int, scale: float, lead: int, inputs: int,
            key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The starting ``(A (*lead, *in, r), B (*lead, r, *out))`` of a float kernel for a base-changing ``init``."""
    if not changes_base(init):
        raise ValueError(f"init {init!r} does not take its factors from the weight")
    return _factors(weight, key if key is not None else jax.random.key(0), init, rank, float(scale), lead, inputs)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _factors(weight, key, init: str, rank: int, scale: float, lead: int, inputs: int):
    """:func:`factors`, compiled once per weight shape (one program, not one per op)."""
    shape = tuple(weight.shape)
    lead_shape, d_in, d_out = shape[:lead], shape[lead:lead + inputs], shape[lead + inputs:]
    mats = weight.astype(jnp.float32).reshape(-1, math.prod(d_in), math.prod(d_out))
    keys = jax.random.split(key, mats.shape[0])
    a, b = jax.vmap(lambda m, k: _matrix_factors(m, init, rank, scale, k))(mats, keys)
    return a.reshape(*lead_shape, *d_in, rank), b.reshape(*lead_shape, rank, *d_out)


def residual(weight: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``W - s * A @ B`` in ``weight``'s dtype (computed in float32): the base for the fresh factors.

    A quantized ``weight`` (QLoRA) gives a residual quantized again in its own format, block
    size and axis: the point of PiSSA on a 4-bit base, whose residual has lost the top
    singular values and so quantizes with less error than ``W`` did.
    """
    if is_quantized(weight):
        return quantize_array(residual(weight.materialize(), a, b, scale), weight.format,
                              block_size=weight.block_size, axis=weight.axis, double_quant=weight.double_quant)

    delta = LoraWeight(base=weight, a=a, b=b, scale=scale).delta()
    return (weight.astype(jnp.float32) - scale * delta).astype(weight.dtype)
