"""Transformer building blocks shared by jpeft's models: norms, rotary embeddings, attention.

Pure functions of arrays; weights come in already through :mod:`jpeft.ops` where they
are matrices. Computations that are sensitive to precision (norms, RoPE, softmax) run
in float32 and return the input's dtype.

Example:
    >>> import jax.numpy as jnp
    >>> rms_norm(jnp.full((1, 4), 2.0), jnp.ones(4), 0.0).tolist()
    [[1.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import attention, ops

ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rms_norm(x_BxTxD: jax.Array, scale_D, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in ``x``'s dtype."""
    x32_BxTxD = x_BxTxD.astype(jnp.float32)
    variance_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
    normed_BxTxD = x32_BxTxD * jax.lax.rsqrt(variance_BxTx1 + eps)
    return (normed_BxTxD * ops.as_array(scale_D, jnp.float32)).astype(x_BxTxD.dtype)


def check_rope_scaling(scaling: dict) -> None:
    """Raises ValueError unless ``scaling`` is a supported ``rope_scaling`` dict (or empty)."""
    if not scaling:
        return
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_KEYS:
        raise ValueError(f"Unsupported rope_scaling {scaling!r}: rope_type must be one of {tuple(ROPE_KEYS)} "
                         "(or no scaling).")
    missing = [k for k in ROPE_KEYS[rope_type] if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing {missing}.")


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Per-pair RoPE inverse frequencies ``(head_dim // 2,)`` in float32, with ``scaling`` applied.

    Example:
        >>> rope_inverse_frequencies(4, 10000.0).tolist()
        [1.0, 0.009999999776482582]
    """
    exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    scaling = dict(scaling or {})
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1 RoPE: slow down low frequencies by ``factor``, blend the middle band."""
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    blend = (old_len / wavelength - low) / (high - low)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    long_waves = wavelength > old_len / low
    short_waves = wavelength < old_len / high
    return np.where(long_waves, inv_freq / factor, np.where(short_waves, inv_freq, blended))


def rope_tables(inv_freq_H2: np.ndarray, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 ``(cos, sin)`` tables of shape ``(B, T, head_dim)`` (halves repeated, HF layout).

    Example:
        >>> rope_tables(rope_inverse_frequencies(4, 1e4), jnp.zeros((1, 3), "int32"))[0].shape
        (1, 3, 4)
    """
    angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_H2)
    angles_BxTxH = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)
    return jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """Rotate query/key heads ("rotate_half" convention: pairs are (i, i + H/2)).

    Example:
        >>> x = jnp.ones((1, 1, 1, 4))
        >>> apply_rope(x, jnp.ones((1, 1, 4)), jnp.zeros((1, 1, 4))).tolist()
        [[[[1.0, 1.0, 1.0, 1.0]]]]
    """
    x32_BxTxNxH = x_BxTxNxH.astype(jnp.float32)
    first, second = jnp.split(x32_BxTxNxH, 2, axis=-1)
    rotated_BxTxNxH = jnp.concatenate([-second, first], axis=-1)
    out = x32_BxTxNxH * cos_BxTxH[:, :, None] + rotated_BxTxNxH * sin_BxTxH[:, :, None]
    return out.astype(x_BxTxNxH.dtype)


def dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, scale: float | None = None,
                          implementation: str = "auto", structure: attention.MaskStructure | None = None) -> jax.Array:
    """Grouped-query attention; scores and softmax in float32. Returns ``(B, T, N, H)``.

    ``allowed_BxTxS`` is True where query t may attend to key s. A query with no allowed
    key gets a uniform (finite) average instead of NaN. ``scale`` defaults to ``H**-0.5``.
    ``implementation``: one of :data:`jpeft.attention.IMPLEMENTATIONS` (``"auto"`` keeps the
    dense form on CPU for short inputs); ``structure``: the mask as causal + padding, for kernels
    that need it (:class:`jpeft.attention.MaskStructure`).

    Example:
        >>> q = jnp.ones((1, 2, 4, 8)); kv = jnp.ones((1, 3, 2, 8))
        >>> dot_product_attention(q, kv, kv, jnp.ones((1, 2, 3), bool)).shape
        (1, 2, 4, 8)
    """
    return attention.attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, implementation=implementation,
                            scale=scale, structure=structure)


def with_rows(rows_NxKH: jax.Array, new_BxTxKxH: jax.Array) -> jax.Array:
    """``new`` keys (or values) with ``n`` extra rows in front: ``(B, n + T, K, H)`` (prefix tuning)."""
    b, _, k, h = new_BxTxKxH.shape
    rows_NxKxH = rows_NxKH.reshape(-1, k, h).astype(new_BxTxKxH.dtype)
    rows_BxNxKxH = jnp.broadcast_to(rows_NxKxH[None], (b, *rows_NxKxH.shape))
    return jnp.concatenate([rows_BxNxKxH, new_BxTxKxH], axis=1)
