"""Reference computations shared by several test modules."""

import jax
import jax.numpy as jnp

from jpeft.models import llama

_forward = jax.jit(llama.forward)


def greedy_without_cache(params, config, tokens, mask, steps):
    """Reference decoding: re-run the full forward over the whole sequence for every new token.

    The sequence lives in a fixed-width buffer whose unused tail is masked out (causal
    attention never looks at it), so the forward compiles once.
    """
    b, t = tokens.shape
    tokens = jnp.concatenate([tokens, jnp.zeros((b, steps), jnp.int32)], axis=1)
    mask = jnp.concatenate([mask, jnp.zeros((b, steps), mask.dtype)], axis=1)
    for i in range(steps):
        logits, _ = _forward(params, config, tokens, attention_mask_BxT=mask)
        nxt = jnp.argmax(logits[:, t + i - 1], axis=-1).astype(jnp.int32)
        tokens, mask = tokens.at[:, t + i].set(nxt), mask.at[:, t + i].set(1)
    return tokens[:, t:]
