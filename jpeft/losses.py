"""Cross-entropy over a large vocabulary without forming every row's logits at once.

A language model's loss projects hidden states onto the vocabulary: ``(rows, V)`` float32
logits, 4 GiB for 8 x 2048 rows of Llama 3's 128,256 tokens, plus as much again for their
gradient. :func:`xent_sums` takes the rows that carry loss and projects them ``chunk`` rows
at a time inside a rematerialized scan: forward and backward hold one chunk's logits, and
the head's gradient is accumulated chunk by chunk. ``chunk=None`` is the plain form.

Example:
    >>> import jax, jax.numpy as jnp
    >>> w_DxV = jax.random.normal(jax.random.key(0), (4, 10))
    >>> h_NxD = jax.random.normal(jax.random.key(1), (5, 4)); t_N = jnp.arange(5)
    >>> plain = xent_sums(lambda h: h @ w_DxV, h_NxD, t_N, jnp.ones(5, bool))
    >>> chunked = xent_sums(lambda h: h @ w_DxV, h_NxD, t_N, jnp.ones(5, bool), chunk=2)
    >>> bool(jnp.allclose(plain[0], chunked[0])), float(chunked[1])
    (True, 5.0)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_xent(logits_NxV: jax.Array, targets_N: jax.Array) -> jax.Array:
    """Per-row cross-entropy ``logsumexp(logits) - logits[target]`` in float32, with a one-pass gradient.

    The gradient ``softmax(logits) - onehot(target)`` is formed in one elementwise pass over
    the logits (the generic derivative of the target lookup scatters into a zero-filled
    ``(N, V)`` array and adds it, three more passes over the largest array of the step).

    Example:
        >>> import jax.numpy as jnp
        >>> [round(float(x), 4) for x in token_xent(jnp.array([[0.0, 0.0], [2.0, 0.0]]), jnp.array([0, 1]))]
        [0.6931, 2.1269]
    """
    return _token_xent_fwd(logits_NxV, targets_N)[0]


def _token_xent_fwd(logits_NxV, targets_N):
    logits_NxV = logits_NxV.astype(jnp.float32)
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    target_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
    return lse_N - target_N, (logits_NxV, lse_N, targets_N)


def _token_xent_bwd(residuals, g_N):
    logits_NxV, lse_N, targets_N = residuals
    is_target_NxV = jnp.arange(logits_NxV.shape[-1])[None, :] == targets_N[:, None]
    grad_NxV = (jnp.exp(logits_NxV - lse_N[:, None]) - is_target_NxV) * g_N[:, None]
    return grad_NxV, None


token_xent.defvjp(_token_xent_fwd, _token_xent_bwd)


def _losses(head: Callable, hidden_NxD, targets_N) -> jax.Array:
    """Per-row ``logsumexp(logits) - logits[target]`` in float32."""
    return token_xent(head(hidden_NxD), targets_N)


def xent_sums(head: Callable, hidden_NxD, targets_N, valid_N, *, chunk: int | None = None):
    """``(sum of the valid rows' cross-entropies, number of valid rows)``.

    ``head(hidden_CxD) -> logits_CxV`` (any closure over the output weights, quantized or
    adapted). ``chunk``: rows projected at a time (``None``: all at once). Rows past a
    multiple of ``chunk`` are padded and count nothing.
    """
    count = jnp.sum(valid_N).astype(jnp.float32)
    if chunk is None or chunk >= hidden_NxD.shape[0]:
        return jnp.sum(jnp.where(valid_N, _losses(head, hidden_NxD, targets_N), 0.0)), count
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    n = hidden_NxD.shape[0]
    pad = -n % chunk
    hidden_NxD = jnp.pad(hidden_NxD, ((0, pad), (0, 0)))
    targets_N, valid_N = jnp.pad(targets_N, (0, pad)), jnp.pad(valid_N, (0, pad))
    split = lambda x: x.reshape(-1, chunk, *x.shape[1:])

    @jax.checkpoint  # the backward pass projects each chunk again instead of keeping its logits
    def chunk_sum(hidden_CxD, targets_C, valid_C):
        return jnp.sum(jnp.where(valid_C, _losses(head, hidden_CxD, targets_C), 0.0))

    def body(total, xs):
        return total + chunk_sum(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(hidden_NxD), split(targets_N), split(valid_N)))
    return total, count
