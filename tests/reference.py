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


def target_xent(params, config, tokens, mask, target=5):
    """Mean cross-entropy of always predicting ``target`` at the real positions: a toy task."""
    import optax

    logits, _ = llama.forward(params, config, tokens, attention_mask_BxT=mask)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(tokens.shape, target))
    return jnp.sum(losses * mask) / jnp.sum(mask)


def adam_steps(loss_fn, adapter, *, steps=12, lr=3e-2):
    """``steps`` of Adam on ``loss_fn(adapter)``: ``(losses, gradients)``, one entry per step."""
    import optax

    optimizer = optax.adam(lr)

    @jax.jit
    def step(adapter, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapter)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(adapter, updates), opt_state, loss, grads

    opt_state, losses, all_grads = optimizer.init(adapter), [], []
    for _ in range(steps):
        adapter, opt_state, loss, grads = step(adapter, opt_state)
        losses.append(float(loss))
        all_grads.append(grads)
    return losses, all_grads


def numpy_params(model, seed=0, stddev=0.02):
    """Random parameters of ``model`` drawn with numpy: ``normal(0, stddev)`` weights, vectors (norm scales,
    biases) ``1 + normal(0, stddev)``.

    No jax.random call, so nothing is compiled (an eager ``model.init`` compiles a sampler per shape,
    seconds each on a busy CPU).
    """
    import numpy as np

    from jpeft import tree
    from jpeft.methods.base import flatten_axes

    rng = np.random.default_rng(seed)
    axes = flatten_axes(model.param_axes())
    out = {}
    for path, leaf in tree.flatten(model.abstract_params()).items():
        vector = len([n for n in axes[path] if n != "layers"]) == 1
        values = stddev * rng.standard_normal(leaf.shape) + (1.0 if vector else 0.0)
        out[path] = jnp.asarray(values, leaf.dtype)
    return tree.unflatten(out)


# ----------------------------------------------------------------------------- a tiny PyTorch Llama (the peer)


def save_torch_llama(folder, *, hidden_size=64, intermediate_size=128, seed=0):
    """A random ``transformers`` Llama (vocab 40, 2 layers, 4 query / 2 key-value heads) saved to ``folder``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def torch_llama(folder):
    """The ``transformers`` Llama saved in ``folder`` (eager attention, eval mode): a fresh copy for each use."""
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
