"""AdapterBank: two adapters of different kinds, trained on two tiny tasks, over one frozen base."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.models import llama

CONFIG = llama.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2)
PARAMS = llama.model(CONFIG).init(jax.random.key(0), stddev=0.1)
MODEL = llama.model(CONFIG)


def targets(task, tokens_BxT):
    """Task "const": always predict token 3. Task "copy": predict the previous token."""
    if task == "const":
        return jnp.full(tokens_BxT.shape, 3)
    return jnp.concatenate([jnp.zeros_like(tokens_BxT[:, :1]), tokens_BxT[:, :-1]], axis=1)


def weights(task, tokens_BxT):
    """The copy task has no target at position 0."""
    w_BxT = jnp.ones(tokens_BxT.shape)
    return w_BxT if task == "const" else w_BxT.at[:, 0].set(0)


def batch(key, size=32):
    return jax.random.randint(key, (size, 8), 0, CONFIG.vocab_size)


def train(method, task, steps, lr):
    """``steps`` Adam steps on fresh random batches, in one compiled scan."""
    optimizer = optax.adam(lr)

    def loss_fn(adapter, tokens_BxT):
        logits_BxTxV, _ = llama.forward(method.apply(PARAMS, adapter), CONFIG, tokens_BxT)
        losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets(task, tokens_BxT))
        w_BxT = weights(task, tokens_BxT)
        return jnp.sum(losses_BxT * w_BxT) / jnp.sum(w_BxT)

    @jax.jit
    def run(adapter):
        def step(carry, key):
            adapter, opt_state = carry
            grads = jax.grad(loss_fn)(adapter, batch(key))
            updates, opt_state = optimizer.update(grads, opt_state)
            return (optax.apply_updates(adapter, updates), opt_state), None

        keys = jax.random.split(jax.random.key(2), steps)
        return jax.lax.scan(step, (adapter, optimizer.init(adapter)), keys)[0][0]

    return run(method.init(jax.random.key(1), PARAMS))


@functools.partial(jax.jit, static_argnames="name")
def accuracy(bank, params, tokens_BxT, task_targets_BxT, w_BxT, *, name):
    """Share of weighted positions where adapter ``name`` predicts the target (the bank is a jit argument)."""
    logits_BxTxV, _ = llama.forward(bank.apply(params, name), CONFIG, tokens_BxT)
    hits_BxT = jnp.argmax(logits_BxTxV, axis=-1) == task_targets_BxT
    return jnp.sum(hits_BxT * w_BxT) / jnp.sum(w_BxT)


@pytest.fixture(scope="module")
def bank():
    prompt = jpeft.prompt_tuning(4, init="normal", init_std=0.1, model=MODEL)
    lora = jpeft.lora(rank=8, alpha=16, targets=r".*/kernel")
    return jpeft.AdapterBank({"const": (prompt, train(prompt, "const", steps=60, lr=3e-2)),
                              "copy": (lora, train(lora, "copy", steps=120, lr=1e-2))})


def test_each_adapter_keeps_its_own_task_when_switched(bank):
    tokens = batch(jax.random.key(9), size=64)
    score = lambda name, task: float(accuracy(bank, PARAMS, tokens, targets(task, tokens), weights(task, tokens),
                                              name=name))
    for _ in range(2):  # switch back and forth: nothing is left behind by the other adapter
        assert score("const", "const") > 0.95 and score("copy", "const") < 0.3
        assert score("copy", "copy") > 0.95 and score("const", "copy") < 0.3
    # The base is shared, not copied: every frozen array is the very same object.
    base_ids = {id(x) for x in jax.tree.leaves(PARAMS)}
    for name in bank.names:
        applied = jax.tree.leaves(bank.apply(PARAMS, name))
        assert base_ids <= {id(x) for x in applied}


def test_bank_bookkeeping_and_errors(bank):
    assert bank.names == ("const", "copy") and len(bank) == 2 and "copy" in bank
    assert bank["const"][0].name == "prompt_tuning"
    assert "copy" in repr(bank)
    bank.check(PARAMS)
    merged = bank.merge(PARAMS, "copy")
    assert not any(jpeft.ops.is_wrapper(x) for x in jpeft.tree.flatten(merged).values())
    ia3 = jpeft.ia3()
    bigger = bank.replace("ia3", ia3.init(jax.random.key(0), PARAMS), ia3)
    assert bigger.names == ("const", "copy", "ia3") and bank.names == ("const", "copy")
    assert bigger.replace("ia3", bigger["ia3"][1])["ia3"][0] is ia3
    leaves, treedef = jax.tree.flatten(bank)
    assert jax.tree.unflatten(treedef, leaves).names == bank.names
    with pytest.raises(KeyError, match="holds"):
        bank.apply(PARAMS, "summarize")
    with pytest.raises(TypeError, match="pair"):
        jpeft.AdapterBank({"x": bank["copy"][1]})
    other = llama.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4)
    with pytest.raises(ValueError, match="adapter 'const'"):
        bank.check(llama.model(other).init(jax.random.key(0)))


def test_adapters_of_every_kind_live_in_one_bank():
    methods = {"lora": jpeft.lora(rank=2), "ia3": jpeft.ia3(), "prompt": jpeft.prompt_tuning(2, model=MODEL),
               "prefix": jpeft.prefix_tuning(2, model=MODEL), "p_tuning": jpeft.p_tuning(2, hidden_size=8, model=MODEL),
               "bottleneck": jpeft.bottleneck(4, model=MODEL)}
    bank = jpeft.AdapterBank({n: (m, m.init(jax.random.key(0), PARAMS)) for n, m in methods.items()})
    bank.check(PARAMS)
    tokens = batch(jax.random.key(3), size=2)
    shapes = {n: jax.eval_shape(lambda p, n=n: llama.forward(bank.apply(p, n), CONFIG, tokens)[0], PARAMS).shape
              for n in bank.names}
    assert set(shapes.values()) == {(2, 8, CONFIG.vocab_size)}
    np.testing.assert_array_equal(bank["ia3"][1]["layers_0"]["self_attn"]["k_proj"]["kernel"]["ia3_l"], 1.0)
