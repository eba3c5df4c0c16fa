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
import math
from collections.abc import Iterator
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
        if top_k > logits_BxV.shape[-1]:
            raise ValueError(f"top_k={top_k} is more than the vocabulary's {logits_BxV.shape[-1]} tokens; lower it "
                             "(or leave it out to sample from every token)")
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV / temperature, axis=-1).astype(jnp.int32)


class _DecodeState(NamedTuple):
    step: jax.Array
    tokens_BxN: jax.Array
    done_B: jax.Array
    cache: dict
    key: jax.Array


def _prefill(params, prompt_BxT, prompt_mask_BxT, key, *, model, max_len, temperature, top_k):
    """The prompt (after any virtual tokens) into a fresh cache of ``max_len`` slots; the first new token."""
    cache = model.init_cache(prompt_BxT.shape[0], max_len)
    hidden_BxTxD, cache = model.forward(params, prompt_BxT, attention_mask_BxT=prompt_mask_BxT, cache=cache,
                                        return_hidden=True, prepend_virtual=True)
    key, sub = jax.random.split(key)
    return pick_token(model.head(params, hidden_BxTxD[:, -1]), sub, temperature, top_k), cache, key


def _decode_step(params, last_B, cache, key, *, model, temperature, top_k):
    """One token per row after ``last_B``, reading and extending the cache."""
    hidden_Bx1xD, cache = model.forward(params, last_B[:, None], cache=cache, return_hidden=True,
                                        prepend_virtual=False)
    key, sub = jax.random.split(key)
    return pick_token(model.head(params, hidden_Bx1xD[:, 0]), sub, temperature, top_k), cache, key


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "eos_ids", "pad_id"))
def _generate(params, prompt_BxT, prompt_mask_BxT, key, *, model, max_new_tokens, temperature, top_k, eos_ids,
              pad_id):
    b, t = prompt_BxT.shape
    is_eos = lambda tok_B: jnp.isin(tok_B, jnp.asarray(eos_ids or (-1,), jnp.int32))
    first_B, cache, key = _prefill(params, prompt_BxT, prompt_mask_BxT, key, model=model,
                                   max_len=model.virtual_tokens(params) + t + max_new_tokens,
                                   temperature=temperature, top_k=top_k)
    tokens_BxN = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
    state = _DecodeState(jnp.int32(1), tokens_BxN, is_eos(first_B), cache, key)

    def keep_going(s: _DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

    def decode_one(s: _DecodeState):
        last_B = jax.lax.dynamic_slice_in_dim(s.tokens_BxN, s.step - 1, 1, axis=1)[:, 0]
        next_B, cache, key = _decode_step(params, last_B, s.cache, s.key, model=model, temperature=temperature,
                                          top_k=top_k)
        next_B = jnp.where(s.done_B, pad_id, next_B)
        tokens_BxN = jax.lax.dynamic_update_slice_in_dim(s.tokens_BxN, next_B[:, None], s.step, axis=1)
        return _DecodeState(s.step + 1, tokens_BxN, s.done_B | is_eos(next_B), cache, key)

    return jax.lax.while_loop(keep_going, decode_one, state).tokens_BxN


def check_can_generate(model: Any) -> None:
    """Raises ``ValueError`` when ``model`` cannot write text: it needs a language-model head and a key/value cache.

    Example:
        >>> from jpeft.models import bert
        >>> check_can_generate(bert.model(bert.BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                                               num_layers=1, num_heads=2)))
        Traceback (most recent call last):
        ...
        ValueError: the 'bert' model cannot generate text: it has no language-model head and no key/value cache ...
    """
    missing = [what for what, field in (("language-model head", model.family.head),
                                        ("key/value cache", model.family.init_cache)) if field is None]
    if missing:
        raise ValueError(f"the {model.name!r} model cannot generate text: it has no {' and no '.join(missing)} "
                         "(an encoder-only model reads text, it does not write it); generate with a decoder "
                         "(Llama) or an encoder-decoder (T5)")


def _checked(model, params, prompt_BxT, prompt_mask_BxT, max_new_tokens, key, temperature, top_k, eos_id):
    """The arguments of :func:`generate` and :func:`stream`, checked and normalised."""
    check_can_generate(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if len(np.shape(prompt_BxT)) != 2 or np.shape(prompt_BxT)[1] < 1:
        raise ValueError(f"the prompt must be (batch, length) with at least one token, got shape "
                         f"{np.shape(prompt_BxT)}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}.")
    virtual = model.virtual_tokens(params)
    if virtual and model.max_positions is not None:
        kv_cache.check_room(model.max_positions, virtual, prompt_BxT.shape[1] + max_new_tokens, None,
                            "prompt and new tokens")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}.")
    if temperature > 0 and key is None:
        raise ValueError("Sampling (temperature > 0) needs a PRNG key.")
    if prompt_mask_BxT is None:
        prompt_mask_BxT = jnp.ones(prompt_BxT.shape, bool)
    eos_ids = None if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
    key = jax.random.key(0) if key is None else key
    return jnp.asarray(prompt_BxT, jnp.int32), jnp.asarray(prompt_mask_BxT, bool), key, eos_ids


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
    prompt_BxT, prompt_mask_BxT, key, eos_ids = _checked(model, params, prompt_BxT, prompt_mask_BxT,
                                                         max_new_tokens, key, temperature, top_k, eos_id)
    return _generate(params, prompt_BxT, prompt_mask_BxT, key, model=model, max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_k=top_k, eos_ids=eos_ids, pad_id=int(pad_id))


_prefill_jit = jax.jit(_prefill, static_argnames=("model", "max_len", "temperature", "top_k"))
_step_jit = jax.jit(_decode_step, static_argnames=("model", "temperature", "top_k"), donate_argnames=("cache",))


def stream(
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
) -> Iterator[np.ndarray]:
    """:func:`generate` one step at a time: yields each step's new tokens ``(B,)`` as they are made.

    The same computation as :func:`generate` (the same tokens, sampled with the same
    keys), run as a host loop over a jitted prefill and a jitted one-token step (each
    compiled once per shape), so a program can show tokens while the rest are decoded.
    Finished rows yield ``pad_id``; the loop ends when every row is done.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jpeft.models import llama
        >>> model = llama.model(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                                       num_layers=1, num_heads=2))
        >>> params, prompt = model.init(jax.random.key(0)), jnp.ones((2, 3), "int32")
        >>> steps = list(stream(model, params, prompt, max_new_tokens=4))
        >>> bool((np.stack(steps, axis=1) == generate(model, params, prompt, max_new_tokens=4)).all())
        True
    """
    prompt_BxT, prompt_mask_BxT, key, eos_ids = _checked(model, params, prompt_BxT, prompt_mask_BxT,
                                                         max_new_tokens, key, temperature, top_k, eos_id)
    temperature, eos = float(temperature), np.asarray(eos_ids or (), np.int64)
    max_len = model.virtual_tokens(params) + prompt_BxT.shape[1] + int(max_new_tokens)
    token_B, cache, key = _prefill_jit(params, prompt_BxT, prompt_mask_BxT, key, model=model, max_len=max_len,
                                       temperature=temperature, top_k=top_k)
    done_B = np.zeros(prompt_BxT.shape[0], bool)
    for step in range(int(max_new_tokens)):
        if step:  # finished rows are fed pad_id, as generate feeds them
            token_B, cache, key = _step_jit(params, jnp.asarray(out_B, jnp.int32), cache, key, model=model,
                                            temperature=temperature, top_k=top_k)
        out_B = np.where(done_B, pad_id, np.asarray(token_B)).astype(np.int32)
        done_B = done_B | np.isin(out_B, eos)
        yield out_B
        if done_B.all():
            return
