"""Every attention implementation equals the dense one on CPU: outputs, and loss and gradients through a Llama.

The blockwise form runs here with blocks of 3 keys (so every input spans several blocks and
a partial one), on a left-padded batch, with grouped-query heads, a sliding window, and
prefix and prompt tuning feeding the model (extra keys/values, extra tokens).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import attention
from jpeft.models import llama
from reference import target_xent

CONFIG = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64, scan_layers=True)
MODEL = llama.model(CONFIG)
PARAMS = MODEL.init(jax.random.key(0), stddev=0.3)
TOKENS = jnp.array([[5, 9, 2, 7, 1, 3, 8], [0, 0, 0, 4, 6, 11, 2]], jnp.int32)
MASK = jnp.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]], jnp.int32)
METHODS = {
    "lora": lambda: jpeft.lora(rank=2, targets=r".*/(q|k|v|o)_proj/kernel"),
    "prefix": lambda: jpeft.prefix_tuning(3, init_std=0.5, model=MODEL),
    "prompt": lambda: jpeft.prompt_tuning(3, init="normal", init_std=0.5, model=MODEL),
}


def trained(adapter):
    """The adapter moved away from its initial values (LoRA's B starts at zero)."""
    return jax.tree.map(lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), adapter)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(attention, "DEFAULT_BLOCK", 3)


def test_blockwise_equals_dense_with_an_all_masked_row():
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (2, 5, 6, 8))
    k, v = jax.random.normal(keys[1], (2, 7, 3, 8)), jax.random.normal(keys[2], (2, 7, 3, 8))
    allowed = jax.random.bernoulli(keys[3], 0.5, (2, 5, 7)).at[1, 2].set(False)  # a query that sees nothing

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.cos(attention.attend(q, k, v, allowed, implementation=impl)))

    np.testing.assert_allclose(attention.attend(q, k, v, allowed, implementation="blockwise"),
                               attention.dense(q, k, v, allowed, 8**-0.5), atol=1e-6)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss("blockwise"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("name, window", [("lora", None), ("prefix", None), ("prompt", None), ("lora", 3)])
def test_model_loss_and_gradients_match(name, window):
    method = METHODS[name]()
    adapter = trained(method.init(jax.random.key(2), PARAMS))

    def loss_and_grads(implementation):
        config = dataclasses.replace(CONFIG, attention=implementation, sliding_window=window)
        fn = lambda a: target_xent(method.apply(PARAMS, a), config, TOKENS, MASK)
        return jax.jit(jax.value_and_grad(fn))(adapter)

    (want, want_g), (got, got_g) = loss_and_grads("xla"), loss_and_grads("blockwise")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4), got_g, want_g)


def test_auto_keeps_the_dense_form_on_cpu_for_short_inputs():
    assert attention.resolve("auto", 256, "cpu") == "xla"
    assert attention.resolve("auto", attention.BLOCKWISE_FROM, "cpu") == "blockwise"
    assert attention.resolve("auto", 256, "gpu") == "cudnn"
    with pytest.raises(ValueError, match="blockwise"):
        llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                          attention="flash")


@pytest.mark.slow  # Pallas's interpreter runs the kernel's grid step by step: about a minute on 2 cores
def test_splash_kernel_equals_dense_at_real_positions():
    """The TPU kernel, run by Pallas's interpreter on CPU: prefix rows in front (offset), padding, GQA."""
    from jpeft import splash

    b, t, off, n, kh, h = 2, 128, 128, 4, 2, 128
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = jax.random.normal(keys[1], (b, off + t, kh, h)), jax.random.normal(keys[2], (b, off + t, kh, h))
    valid = jnp.ones((b, off + t), bool).at[1, off:off + 5].set(False)  # row 1: 5 left-padded tokens
    allowed = (jnp.arange(off + t)[None, :] <= jnp.arange(t)[:, None] + off)[None] & valid[:, None, :]
    real = valid[:, off:, None, None]
    weights = jax.random.normal(keys[3], q.shape) * real  # padded positions carry no loss

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    dense = lambda q, k, v: attention.dense(q, k, v, allowed, h**-0.5)
    kernel = lambda q, k, v: splash.attend(q, k, v, attention.MaskStructure(off, valid), h**-0.5, interpret=True)
    np.testing.assert_allclose(jnp.where(real, kernel(q, k, v), 0), jnp.where(real, dense(q, k, v), 0), atol=1e-5)
    grads = lambda fn: jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads(kernel), grads(dense)):
        np.testing.assert_allclose(g, w, atol=1e-5)
