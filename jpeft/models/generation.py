"""Token generation with a key/value cache, for any decoder :class:`~jpeft.models.model.Model`.

The model must provide ``forward(params, tokens, attention_mask_BxT=, cache=,
return_hidden=True, prepend_virtual=)``, ``head(params, hidden)`` and
``init_cache(batch, max_len)``. Prompts are left-padded; the prompt (after any virtual
tokens of an applied prompt or prefix adapter) is prefilled into the cache, then one
token at a time is decoded inside a jitted ``lax.while_loop`` that stops once every
row has produced an end token.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
    ...                                       num_layers=1, num_heads=2))
    >>> generate(model, model.init(jax.random.key(0)), jnp.ones((2, 3), "int32"), max_new_tokens=4).shape
    (2, 4)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models import kv_cache


def pick_token(logits_BxV, key, temperature: float, top_k: int | None) -> jax.Array:
    """Greedy argmax when ``temperature == 0``, else top-k / temperature sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV / temperature, axis=-1).astype(jnp.int32)


class _DecodeState(NamedTuple):
    step: jax.Array
    tokens_BxN: jax.Array
    done_B: jax.Array
    cache: dict
    key: jax.Array


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "eos_ids", "pad_id"))
def _generate(params, prompt_BxT, prompt_mask_BxT, key, *, model, max_new_tokens, temperature, top_k, eos_ids,
              pad_id):
    b, t = prompt_BxT.shape
    is_eos = lambda tok_B: jnp.isin(tok_B, jnp.asarray(eos_ids or (-1,), jnp.int32))
    cache = model.init_cache(b, model.virtual_tokens(params) + t + max_new_tokens)
    hidden_BxTxD, cache = model.forward(params, prompt_BxT, attention_mask_BxT=prompt_mask_BxT, cache=cache,
                                        return_hidden=True, prepend_virtual=True)
    key, sub = jax.random.split(key)
    first_B = pick_token(model.head(params, hidden_BxTxD[:, -1]), sub, temperature, top_k)
    tokens_BxN = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
    state = _DecodeState(jnp.int32(1), tokens_BxN, is_eos(first_B), cache, key)

    def keep_going(s: _DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

    def decode_one(s: _DecodeState):
        last_Bx1 = jax.lax.dynamic_slice_in_dim(s.tokens_BxN, s.step - 1, 1, axis=1)
        hidden_Bx1xD, cache = model.forward(params, last_Bx1, cache=s.cache, return_hidden=True,
                                            prepend_virtual=False)
        key, sub = jax.random.split(s.key)
        next_B = pick_token(model.head(params, hidden_Bx1xD[:, 0]), sub, temperature, top_k)
        next_B = jnp.where(s.done_B, pad_id, next_B)
        tokens_BxN = jax.lax.dynamic_update_slice_in_dim(s.tokens_BxN, next_B[:, None], s.step, axis=1)
        return _DecodeState(s.step + 1, tokens_BxN, s.done_B | is_eos(next_B), cache, key)

    return jax.lax.while_loop(keep_going, decode_one, state).tokens_BxN


def generate(
    model: Any,
    params: Any,
    prompt_BxT: jax.Array,
    prompt_mask_BxT: jax.Array | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | tuple[int, ...] | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Generate ``max_new_tokens`` new tokens ``(B, N)`` after left-padded prompts.

    Greedy when ``temperature == 0``, otherwise samples (optionally from the ``top_k``
    logits; needs ``key``). After a row's end token (``eos_id``: one id or several) the
    rest of its row is ``pad_id``. ``params`` may carry a prompt or prefix (an applied
    input adapter): its virtual tokens are prefilled ahead of the prompt, and with them
    the whole generation must fit the model's context.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    virtual = model.virtual_tokens(params)
    if virtual and model.max_positions is not None:
        kv_cache.check_room(model.max_positions, virtual, prompt_BxT.shape[1] + max_new_tokens, None,
                            "prompt and new tokens")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if temperature > 0 and key is None:
        raise ValueError("Sampling (temperature > 0) needs a PRNG key.")
    if prompt_mask_BxT is None:
        prompt_mask_BxT = jnp.ones(prompt_BxT.shape, bool)
    eos_ids = None if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
    key = jax.random.key(0) if key is None else key
    return _generate(
        params, jnp.asarray(prompt_BxT, jnp.int32), jnp.asarray(prompt_mask_BxT, bool), key,
        model=model, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
        top_k=top_k, eos_ids=eos_ids, pad_id=int(pad_id),
    )
