"""Attention behind one interface: the dense form, a blockwise (online-softmax) form, cuDNN, Pallas splash.

Every implementation computes the same grouped-query attention as :func:`dense`::

    out[b, t, n] = sum_s softmax_s(q[b, t, n] . k[b, s, n // G] * scale, where allowed[b, t, s]) v[b, s, n // G]

with scores and softmax in float32, and a query that may see no key getting the
uniform average of all keys (finite, never NaN). They differ in what they keep:

* ``"xla"``: scores ``(B, N, T, S)`` formed whole; the fastest on CPU for short inputs;
* ``"blockwise"``: keys in blocks with a running max and sum (flash attention's
  recurrence), and a custom backward pass that recomputes each block: memory grows with
  ``T x block`` instead of ``T x S``, on any backend;
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only);
* ``"splash"``: the Pallas splash-attention kernel that ships with JAX
  (``jax.experimental.pallas.ops.tpu``), TPU only; it needs the mask's structure
  (causal with an offset, padding) and lengths in 128-wide tiles, and falls back to
  ``"blockwise"`` otherwise (:mod:`jpeft.splash`).

``"auto"`` picks by backend: cuDNN on GPU, blockwise on TPU, and on CPU the dense form up
to :data:`BLOCKWISE_FROM` keys (its compiled step is the one measured so far), blockwise
beyond.

Example:
    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 4, 4, 8)); kv = jnp.ones((1, 4, 2, 8)); allowed = jnp.tril(jnp.ones((1, 4, 4), bool))
    >>> bool(jnp.allclose(attend(q, kv, kv, allowed, implementation="blockwise", block=2),
    ...                   attend(q, kv, kv, allowed, implementation="xla")))
    True
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
BLOCKWISE_FROM = 2048  # "auto" on CPU: the dense form below this many keys
DEFAULT_BLOCK = 512
_MASKED = float(jnp.finfo(jnp.float32).min)  # a masked key: counts in an all-masked row (uniform average)


class MaskStructure(NamedTuple):
    """What a kernel that cannot read a dense mask needs to rebuild it (causal self-attention with padding).

    ``allowed[b, t, s] = (s <= t + offset) & key_valid[b, s]``, where the first ``offset``
    keys have no queries (prefix tuning's rows). ``None`` where the mask is anything else
    (a cache, a sliding window, an encoder).
    """

    offset: int
    key_valid_BxS: jax.Array


def check_implementation(name: str) -> str:
    """``name`` if it is an implementation, else a ValueError that lists them."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    return name


def resolve(implementation: str, num_keys: int, backend: str | None = None) -> str:
    """The implementation ``"auto"`` stands for on ``backend`` (default: JAX's default backend).

    Example:
        >>> resolve("auto", 256, "cpu"), resolve("auto", 8192, "cpu"), resolve("auto", 256, "tpu")
        ('xla', 'blockwise', 'blockwise')
    """
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend == "gpu":
        return "cudnn"
    if backend == "tpu":
        return "blockwise"
    return "xla" if num_keys < BLOCKWISE_FROM else "blockwise"


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, *, implementation: str = "auto",
           scale: float | None = None, block: int | None = None, structure: MaskStructure | None = None):
    """Grouped-query attention ``(B, T, N, H)`` by the chosen implementation (see the module docstring).

    ``allowed_BxTxS``: True where query t may attend to key s. ``scale`` defaults to
    ``H**-0.5``. ``block``: keys per block of the blockwise form (default :data:`DEFAULT_BLOCK`).
    ``structure``: the mask as causal + padding, for ``"splash"``.
    """
    scale = q_BxTxNxH.shape[-1] ** -0.5 if scale is None else scale
    kind = resolve(implementation, k_BxSxKxH.shape[1])
    if kind == "xla":
        return dense(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, scale)
    if kind == "cudnn":
        mask_Bx1xTxS = allowed_BxTxS[:, None]
        out = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, scale=scale,
                                           implementation="cudnn")
        return out.astype(q_BxTxNxH.dtype)
    if kind == "splash" and structure is not None:
        from jpeft import splash  # Pallas TPU kernels, imported only where used

        if splash.supported(q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]):
            return splash.attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, structure, scale)
    return blockwise(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, scale, block or DEFAULT_BLOCK)


def dense(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, scale: float) -> jax.Array:
    """The reference form: all scores at once, float32 softmax.

    Two layouts of the same products, chosen by the platform the step is compiled for
    (``jax.lax.platform_dependent``, not the host's backend: the TPU planner compiles on a
    CPU host). On CPU the heads move in front of the positions once, before both products
    (the layout its batched matmul reads): fewer layout copies in the forward and backward
    passes. Elsewhere the products are written over the ``(B, T, N, H)`` layout and the
    compiler lays them out: XLA's TPU cost model prices the head-major form's transposes, and
    its estimated step grows with them.
    """
    products = functools.partial(_dense_products, scale=scale)
    return jax.lax.platform_dependent(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS,
                                      cpu=functools.partial(products, heads_first=True),
                                      default=functools.partial(products, heads_first=False))


def _dense_products(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, *, scale: float, heads_first: bool):
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)
    if heads_first:
        q_BxKxGxTxH = q_BxTxKxGxH.transpose(0, 2, 3, 1, 4)
        k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
        scores_BxKxGxTxS = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_BxKxSxH,
                                      preferred_element_type=jnp.float32) * scale
    else:
        scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                                      preferred_element_type=jnp.float32) * scale
    scores_BxKxGxTxS = jnp.where(allowed_BxTxS[:, None, None], scores_BxKxGxTxS, _MASKED)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    if heads_first:
        out_BxKxGxTxH = jnp.einsum("bkgts,bksh->bkgth", probs_BxKxGxTxS, v_BxKxSxH)
        return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


# ----------------------------------------------------------------------------- blockwise


def blockwise(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, scale: float, block: int = DEFAULT_BLOCK):
    """Attention over key blocks of ``block`` with an online softmax; the backward pass recomputes each block.

    Keeps ``(B, N, T, block)`` scores at a time, and for the backward pass only the output
    and each query's log-sum-exp.
    """
    b, t, n, h = q_BxTxNxH.shape
    s, k = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    block = max(1, min(block, s))
    pad = -s % block
    if pad:  # padded keys score -inf: they never count, not even in an all-masked row
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_BxSxKxH, v_BxSxKxH = widen(k_BxSxKxH), widen(v_BxSxKxH)
        allowed_BxTxS = jnp.pad(allowed_BxTxS, ((0, 0), (0, 0), (0, pad)))
    key_real_S = jnp.arange(s + pad) < s
    q_BxKxGxTxH = q_BxTxNxH.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    out_BxKxGxTxH = _flash(q_BxKxGxTxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS, key_real_S, scale, block)
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _blocks(x, block: int, axis: int):
    """``x`` split along ``axis`` into a leading axis of blocks."""
    shape = x.shape
    x = x.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _block_scores(q_BxKxGxTxH, k_BxCxKxH, allowed_BxTxC, real_C, scale):
    scores = jnp.einsum("bkgth,bckh->bkgtc", q_BxKxGxTxH, k_BxCxKxH, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed_BxTxC[:, None, None], scores, _MASKED)
    return jnp.where(real_C, scores, -jnp.inf)


def _forward(q, k, v, allowed, real, scale, block):
    b, kh, g, t, h = q.shape
    init = (jnp.full((b, kh, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, h), jnp.float32))

    def step(carry, xs):
        m_old, l_old, acc_old = carry
        k_c, v_c, allowed_c, real_c = xs
        scores = _block_scores(q, k_c, allowed_c, real_c, scale)
        m_new = jnp.maximum(m_old, scores.max(-1))
        correction = jnp.exp(m_old - m_new)
        p = jnp.exp(scores - m_new[..., None])
        l_new = l_old * correction + p.sum(-1)
        acc_new = acc_old * correction[..., None] + jnp.einsum(
            "bkgtc,bckh->bkgth", p.astype(v.dtype), v_c, preferred_element_type=jnp.float32)
        return (m_new, l_new, acc_new), None

    xs = (_blocks(k, block, 1), _blocks(v, block, 1), _blocks(allowed, block, 2), _blocks(real, block, 0))
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    out = (acc / l[..., None]).astype(q.dtype)
    return out, (m, l)  # not m + log(l): in an all-masked row m is float32's min, which absorbs log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, allowed, real, scale, block):
    return _forward(q, k, v, allowed, real, scale, block)[0]


def _flash_fwd(q, k, v, allowed, real, scale, block):
    out, (m, l) = _forward(q, k, v, allowed, real, scale, block)
    return out, (q, k, v, allowed, real, out, m, l)


def _flash_bwd(scale, block, residuals, dout):
    q, k, v, allowed, real, out, m, l = residuals
    dout32 = dout.astype(jnp.float32)
    delta = jnp.sum(dout32 * out.astype(jnp.float32), axis=-1)  # (B, K, G, T)

    def step(dq, xs):
        k_c, v_c, allowed_c, real_c = xs
        p = jnp.exp(_block_scores(q, k_c, allowed_c, real_c, scale) - m[..., None]) / l[..., None]  # (B,K,G,T,C)
        dv_c = jnp.einsum("bkgtc,bkgth->bckh", p, dout32)
        dp = jnp.einsum("bkgth,bckh->bkgtc", dout32, v_c.astype(jnp.float32))
        ds = jnp.where(allowed_c[:, None, None], p * (dp - delta[..., None]) * scale, 0.0)  # masked: constant
        dq = dq + jnp.einsum("bkgtc,bckh->bkgth", ds, k_c.astype(jnp.float32))
        dk_c = jnp.einsum("bkgtc,bkgth->bckh", ds, q.astype(jnp.float32))
        return dq, (dk_c, dv_c)

    xs = (_blocks(k, block, 1), _blocks(v, block, 1), _blocks(allowed, block, 2), _blocks(real, block, 0))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), xs)
    unblock = lambda x_NxBxCxKxH: jnp.moveaxis(x_NxBxCxKxH, 0, 1).reshape(k.shape)
    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
