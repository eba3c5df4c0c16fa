"""The key/value cache of a decoder, and the attention masks built around it.

Layout of a cache (a plain dict, so it is a pytree that ``jit`` and ``while_loop`` carry):

* ``index``: scalar int32, the next free slot;
* ``mask``: ``(B, S)`` bool, True where a slot holds a real token (or a virtual one);
* ``positions``: ``(B, S)`` int32, the RoPE position of each slot;
* per layer ``{"k", "v"}`` of shape ``(B, S, K, H)``, under ``layers_{i}``, or with
  stacked layers under ``layers`` with a leading layer axis.

Writing past the end is clamped by ``dynamic_update_slice``: size the cache for the
whole generation (:func:`check_room` refuses inputs that do not fit).

Example:
    >>> init_cache(num_layers=2, stacked=True, batch=1, max_len=5, kv_heads=2, head_dim=4)["layers"]["k"].shape
    (2, 1, 5, 2, 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_cache(*, num_layers: int, stacked: bool, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> dict:
    """An empty cache for ``max_len`` slots (virtual tokens, prompt and generated tokens)."""
    lead = (num_layers,) if stacked else ()
    shape = (*lead, batch, max_len, kv_heads, head_dim)
    kv = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    layers = {"layers": kv()} if stacked else {f"layers_{i}": kv() for i in range(num_layers)}
    return {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch, max_len), bool),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        **layers,
    }


def default_positions(mask_BxT: jax.Array, cache: dict | None) -> jax.Array:
    """Position of each token = number of real tokens before it (so left padding is invisible)."""
    seen_B = 0 if cache is None else jnp.sum(cache["mask"], axis=1, dtype=jnp.int32)
    positions_BxT = jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1
    return jnp.maximum(positions_BxT + jnp.reshape(seen_B, (-1, 1)), 0)


def causal_mask(mask_BxT, positions_BxT, cache: dict | None, sliding_window: int | None = None):
    """``(allowed_BxTxS, new cache metadata)`` for causal, padding-aware (optionally windowed) attention.

    Without a cache ``S == T``; with one, ``S`` is the cache length and the metadata
    (``index``, ``mask``, ``positions``) is the cache's after writing this input.
    """
    t = mask_BxT.shape[1]
    if cache is None:
        index, key_mask_BxS, key_positions_BxS, meta = 0, mask_BxT, positions_BxT, None
    else:
        index = cache["index"]
        put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, index))
        key_mask_BxS = put(cache["mask"], mask_BxT)
        key_positions_BxS = put(cache["positions"], positions_BxT)
        meta = {"index": index + t, "mask": key_mask_BxS, "positions": key_positions_BxS}
    query_slots_T = index + jnp.arange(t)
    key_slots_S = jnp.arange(key_mask_BxS.shape[1])
    causal_TxS = key_slots_S[None, :] <= query_slots_T[:, None]
    allowed_BxTxS = causal_TxS[None] & key_mask_BxS[:, None, :]
    if sliding_window is not None:
        distance_BxTxS = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
        allowed_BxTxS = allowed_BxTxS & (distance_BxTxS < sliding_window)
    return allowed_BxTxS, meta


def write(layer_cache: dict, index, k_BxTxKxH, v_BxTxKxH) -> dict:
    """A layer's cache with this step's keys and values written at ``index``."""
    put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, index, 0, 0))
    return {"k": put(layer_cache["k"], k_BxTxKxH), "v": put(layer_cache["v"], v_BxTxKxH)}


def check_room(max_positions: int, virtual: int, t: int, cache: dict | None, what: str = "input tokens") -> None:
    """Virtual slots plus input must fit the context and the cache: never truncate silently."""
    if virtual + t > max_positions:
        raise ValueError(
            f"{virtual} virtual tokens + {t} {what} = {virtual + t} exceed the model's context "
            f"(max_position_embeddings={max_positions}); shorten the input (nothing is truncated).")
    if cache is not None and cache["mask"].shape[1] < virtual + t:
        raise ValueError(f"the cache holds {cache['mask'].shape[1]} slots but {virtual} virtual tokens + "
                         f"{t} input tokens need {virtual + t}; make a larger cache.")


def layer_keys_values(cache: dict, n: int) -> tuple[jax.Array, jax.Array]:
    """Every layer's first ``n`` cached keys and values as ``(L, n, K*H)`` each (a prefix's layout)."""
    if "layers" in cache:
        names = ["layers"]
    else:
        names = sorted((k for k in cache if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))

    def rows(part: str) -> jax.Array:
        per_layer = []
        for name in names:
            buf = cache[name][part]  # (L?, B=1, S, K, H)
            buf = buf.reshape(-1, *buf.shape[-3:])[:, :n]  # (L or 1, n, K, H) from batch row 0
            per_layer.append(buf.reshape(buf.shape[0], n, -1))
        return jnp.concatenate(per_layer, axis=0)

    return rows("k"), rows("v")
