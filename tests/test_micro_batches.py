"""Gradient accumulation (``train.micro_batches``): the same loss, gradients and update as the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.models import llama
from train import config as config_lib
from train import trainer
from train.config import ConfigError
from train.data import TrainBatch
from train.tasks.headlines import answer_xent

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, scan_layers=True)
MODEL = llama.model(CONFIG)
PARAMS = MODEL.init(jax.random.key(0), stddev=0.3)


def batch_of(rows: int, seq: int = 7, seed: int = 0) -> TrainBatch:
    """Rows of different lengths and answer sizes: the micro-batches hold different numbers of loss positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 64, (rows, seq)).astype(np.int32)
    lengths = rng.integers(3, seq + 1, rows)
    attention = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    answers = rng.integers(1, 3, rows)
    loss = ((np.arange(seq)[None] >= lengths[:, None] - 1 - answers[:, None]) & (attention == 1)
            & (np.arange(seq)[None] < lengths[:, None] - 1)).astype(np.float32)
    positions = np.full((rows, 3), -1, np.int32)
    for r in range(rows):
        where = np.flatnonzero(loss[r])
        positions[r, :len(where)] = where
    return TrainBatch(jnp.asarray(tokens), jnp.asarray(np.roll(tokens, -1, 1)), jnp.asarray(attention),
                      jnp.asarray(loss), jnp.asarray(positions))


def test_micro_batches_interleave_rows():
    parts = trainer.micro_batches_of({"x": jnp.arange(12).reshape(6, 2)}, 3)["x"]
    assert parts.shape == (3, 2, 2)
    np.testing.assert_array_equal(parts[1], [[2, 3], [8, 9]])  # rows 1 and 4
    with pytest.raises(ValueError, match="multiple of train.micro_batches"):
        trainer.micro_batches_of(jnp.arange(5), 2)


@pytest.mark.parametrize("method, parts", [
    (jpeft.lora(rank=2, alpha=4, targets=r".*_proj/kernel"), 2),
    (jpeft.adalora(init_r=4, target_r=2, total_step=10, targets=r".*(q|v)_proj/kernel"), 4),
], ids=["lora in 2", "adalora (with a penalty) in 4"])
def test_accumulated_loss_and_grads_equal_the_whole_batch(method, parts):
    adapter = method.init(jax.random.key(1), PARAMS)
    adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), adapter)
    batch, rng = batch_of(8), jax.random.key(2)
    whole = jax.jit(trainer.make_loss_and_grad(method, MODEL, answer_xent))(adapter, PARAMS, batch, rng)
    for unroll in (False, True):
        got = jax.jit(trainer.make_loss_and_grad(method, MODEL, answer_xent, parts, unroll))(adapter, PARAMS,
                                                                                           batch, rng)
        np.testing.assert_allclose(got[0], whole[0], rtol=1e-6)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7), got[1], whole[1])
    # Against a float64 reference of the same mean: every loss position of the batch weighs the same.
    with jax.enable_x64():
        f64 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, t)
        loss64 = trainer.make_loss_fn(method, MODEL, answer_xent)(f64(adapter), f64(PARAMS), f64(batch), rng)
    np.testing.assert_allclose(float(whole[0]), float(loss64), rtol=1e-5)


def test_train_step_with_micro_batches_makes_the_same_update():
    method = jpeft.lora(rank=2, alpha=4, targets=r".*_proj/kernel")
    cfg = config_lib.from_dict({}).train
    optimizer, _ = trainer.make_optimizer(cfg)
    adapter = method.init(jax.random.key(1), PARAMS)
    batch = batch_of(8, seed=1)
    results = []
    for parts in (1, 4):
        step = trainer.make_train_step(method, MODEL, optimizer, sums=answer_xent, micro_batches=parts)
        new, _, stats = step(jax.tree.map(jnp.copy, adapter), optimizer.init(adapter), PARAMS, batch,
                             jax.random.key(0))
        results.append((new, float(stats["loss"])))
    (want, want_loss), (got, got_loss) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


def test_micro_batches_must_divide_the_batch():
    with pytest.raises(ConfigError, match="train.micro_batches.*must divide train.batch_size"):
        config_lib.apply_overrides(config_lib.from_dict({}), ["train.batch_size=8", "train.micro_batches=3"])
