"""The cross-entropy: its one-pass gradient against a float64 reference, and the chunked form against the plain
one (the trainer's answer loss and its gradients, adapter and head)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import losses
from jpeft.models import llama
from train import trainer
from train.tasks.headlines import answer_xent
from train.data import TrainBatch

CONFIG = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, scan_layers=True)
MODEL = llama.model(CONFIG)
PARAMS = MODEL.init(jax.random.key(0), stddev=0.3)
TOKENS = jnp.array([[5, 9, 2, 7, 1, 3, 8], [4, 6, 11, 2, 0, 0, 0]], jnp.int32)
BATCH = TrainBatch(TOKENS, jnp.roll(TOKENS, -1, axis=1), (TOKENS > 0).astype(jnp.int32),
                   jnp.zeros(TOKENS.shape, jnp.float32),
                   jnp.array([[2, 3, 4, 5, 6], [1, 2, -1, -1, -1]], jnp.int32))  # 5 + 2 loss rows


def test_token_xent_and_its_gradient_match_float64():
    logits_NxV = jax.random.normal(jax.random.key(0), (6, 50)) * 4.0
    targets_N = jnp.array([0, 49, 7, 7, 23, 1])
    g_N = jnp.array([1.0, 0.0, 2.0, -0.5, 1.0, 3.0])  # weights per row, as a mask or mean gives them
    loss, grad = jax.value_and_grad(lambda x: jnp.sum(losses.token_xent(x, targets_N) * g_N))(logits_NxV)
    x = np.asarray(logits_NxV, np.float64)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    want = lse - x[np.arange(6), np.asarray(targets_N)]
    want_grad = (np.exp(x - lse[:, None]) - np.eye(50)[np.asarray(targets_N)]) * np.asarray(g_N)[:, None]
    np.testing.assert_allclose(loss, np.sum(want * np.asarray(g_N)), rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_answer_loss_equals_optax_cross_entropy():
    method = jpeft.lora(rank=2, targets=r".*(_proj|lm_head)/kernel")
    adapter = jax.tree.map(lambda x: x + 0.1, method.init(jax.random.key(1), PARAMS))

    def reference(params, model, batch):
        hidden_BxTxD, _ = model.forward(params, batch.tokens_BxT, attention_mask_BxT=batch.attention_mask_BxT,
                                        return_hidden=True)
        valid_BxA = batch.answer_positions_BxA >= 0
        positions_BxA = jnp.maximum(batch.answer_positions_BxA, 0)
        hidden_BxAxD = jnp.take_along_axis(hidden_BxTxD, positions_BxA[:, :, None], axis=1)
        targets_BxA = jnp.take_along_axis(batch.targets_BxT, positions_BxA, axis=1)
        xent_BxA = optax.softmax_cross_entropy_with_integer_labels(model.head(params, hidden_BxAxD), targets_BxA)
        return jnp.sum(jnp.where(valid_BxA, xent_BxA, 0.0)), jnp.sum(valid_BxA).astype(jnp.float32)

    def loss_and_grads(sums):
        loss = trainer.make_loss_fn(method, MODEL, sums)
        return jax.jit(jax.value_and_grad(loss))(adapter, PARAMS, BATCH, jax.random.key(0))

    (want, want_g), (got, got_g) = loss_and_grads(reference), loss_and_grads(answer_xent)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got_g, want_g)


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_answer_loss_equals_plain(chunk):
    method = jpeft.lora(rank=2, targets=r".*(_proj|lm_head)/kernel")
    adapter = jax.tree.map(lambda x: x + 0.1, method.init(jax.random.key(1), PARAMS))

    def loss_and_grads(sums):
        loss = trainer.make_loss_fn(method, MODEL, sums)
        return jax.jit(jax.value_and_grad(loss))(adapter, PARAMS, BATCH, jax.random.key(0))

    (want, want_g) = loss_and_grads(answer_xent)
    (got, got_g) = loss_and_grads(functools.partial(answer_xent, chunk=chunk))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got_g, want_g)


def test_chunks_hold_one_chunk_of_logits():
    """The compiled loss-and-gradient never holds all rows' logits at once (rows x vocab float32)."""
    w_DxV = jnp.zeros((64, 32768))
    h_NxD, t_N, valid_N = jnp.zeros((4096, 64)), jnp.zeros(4096, jnp.int32), jnp.ones(4096, bool)

    def temp_bytes(chunk):
        fn = lambda w, h: losses.xent_sums(lambda x: x @ w, h, t_N, valid_N, chunk=chunk)[0]
        return jax.jit(jax.grad(fn, argnums=(0, 1))).lower(w_DxV, h_NxD).compile().memory_analysis().temp_size_in_bytes

    all_logits = 4096 * 32768 * 4
    assert temp_bytes(None) >= all_logits
    assert temp_bytes(256) < all_logits / 4
