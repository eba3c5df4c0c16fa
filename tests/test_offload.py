"""The optimizer state in host memory (pinned_host) between steps: the same training as on the device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import offload, sharding, stack
from jpeft.models import llama
from train import trainer
from train.data import TrainBatch
from train.tasks.headlines import answer_xent

CONFIG = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, scan_layers=True)
MODEL = llama.model(CONFIG)
PARAMS = MODEL.init(jax.random.key(0), stddev=0.3)
TOKENS = jnp.array([[5, 9, 2, 7, 1, 3], [4, 6, 11, 2, 8, 1]], jnp.int32)
BATCH = TrainBatch(TOKENS, jnp.roll(TOKENS, -1, axis=1), jnp.ones_like(TOKENS), jnp.ones(TOKENS.shape, jnp.float32),
                   jnp.tile(jnp.arange(5, dtype=jnp.int32), (2, 1)))

needs_host = pytest.mark.skipif(not offload.host_memory_available(jax.devices()[0]),
                                reason="this jaxlib's CPU client has no pinned_host memory")


def train(offload_optimizer: bool, steps: int = 3, offload_frozen: bool = False, model=MODEL, params=PARAMS):
    method = jpeft.lora(rank=2, targets=r".*_proj/kernel")
    optimizer = optax.adamw(1e-2)
    adapter = method.init(jax.random.key(1), params)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    place = trainer.Placement(mesh, "default", method, model, params, adapter, optimizer, offload_optimizer,
                              offload_frozen)
    frozen, adapter = place.put(params, place.frozen), place.put(adapter, place.adapter)
    opt_state = jax.jit(optimizer.init, out_shardings=place.opt_state)(adapter)
    step = trainer.make_train_step(method, model, optimizer, place.step_shardings(BATCH), sums=answer_xent)
    batch = place.put(BATCH, place.batch_shardings(BATCH))
    for i in range(steps):
        adapter, opt_state, stats = step(adapter, opt_state, frozen, batch, jax.random.key(i))
    if offload_frozen:
        kinds = {path: leaf.sharding.memory_kind for path, leaf in jpeft.tree.flatten(frozen).items()}
        assert {k for p, k in kinds.items() if p.endswith("_proj/kernel")} == {"pinned_host"}
        assert {k for p, k in kinds.items() if not p.endswith("_proj/kernel")} == {"device"}  # norms, embedding
        eval_loss = trainer.make_eval_loss(method, model, answer_xent, frozen_on_host=True)
        want = trainer.make_eval_loss(method, model, answer_xent)(adapter, params, BATCH)
        np.testing.assert_allclose(eval_loss(adapter, frozen, batch), want, rtol=1e-6)
    return adapter, opt_state


@needs_host
def test_offloaded_state_trains_the_same():
    want, want_state = train(False)
    got, got_state = train(True)
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(got_state)}
    assert kinds == {"pinned_host"}
    # The state streams leaf by leaf: the same arithmetic, fused differently (Adam's 1/sqrt(nu) magnifies the
    # last bit of near-zero entries).
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


@needs_host
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("remat", ["none", "layer_input"])
def test_frozen_base_in_host_memory_trains_the_same(scan_layers, remat):
    """Each layer's weights come to the device as the layer runs (and again in its backward pass)."""
    model = llama.model(dataclasses.replace(CONFIG, scan_layers=scan_layers, remat=remat))
    params = PARAMS if scan_layers else stack.unstack_layers(PARAMS)
    want, _ = train(False, model=model, params=params)
    got, _ = train(False, offload_frozen=True, model=model, params=params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)


@pytest.mark.parametrize("policy", ["none", "layer_input", "dots"])
def test_no_layer_keeps_its_fetched_weights_for_the_backward_pass(policy, capsys):
    """The backward pass fetches a layer's weights again: its copy on the device is not a saved residual."""
    x, w = jnp.ones((3, 4)), {"w": jnp.eye(4)}
    body = lambda p, x: jnp.sin(x @ p["w"]) @ p["w"]
    with offload.layers_from_host():
        fetching = stack.remat_layer(body, policy)
    fetched_outside = stack.remat_layer(body, policy)  # the copy made before the layer: kept
    for layer in (fetching, lambda p, x: fetched_outside(offload.to_device(p), x)):
        jax.ad_checkpoint.print_saved_residuals(lambda w: layer(w, x).sum(), w)
    with_fetch, without = capsys.readouterr().out.split("from a constant")[1:]
    assert "device_put" not in with_fetch and "argument w" in with_fetch
    assert "output of device_put" in without


@needs_host
@pytest.mark.parametrize("keep,leafwise", [(True, True), (False, True), (True, False)])
def test_streamed_update_equals_the_whole_update(keep, leafwise):
    """Leaf by leaf, with the whole gradient's norm clipping (active here), as one optax update; or nothing."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": {"c": jnp.ones(5)}}
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32) * 3, params)
    optimizer = optax.chain(jpeft.optim.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    state = optimizer.init(params)
    state = optimizer.update(grads, state, params)[1]  # non-zero moments and count
    want_updates, want_state = optimizer.update(grads, state, params)
    want = optax.apply_updates(params, want_updates)
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    shardings = offload.to_host(jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                             state))
    host_state = jax.device_put(state, shardings)
    step = jax.jit(lambda g, s, p: offload.update_streamed(optimizer, g, s, p, shardings, jnp.asarray(keep),
                                                           leafwise=leafwise),
                   out_shardings=(None, shardings))
    got, got_state = step(grads, host_state, params)
    assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(got_state)} == {"pinned_host"}
    close = lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    jax.tree.map(close, (got, got_state), (want, want_state) if keep else (params, state))


def test_a_device_without_host_memory_is_a_clear_error():
    class NoHost:
        platform = "cpu"

        def addressable_memories(self):
            return []

        def __str__(self):
            return "cpu:0"

    sharding_ = type("OneDevice", (), {"device_set": {NoHost()}})()
    with pytest.raises(offload.HostMemoryError, match="offload_optimizer: false"):
        offload.to_host(sharding_)
    with pytest.raises(offload.HostMemoryError, match="the frozen base cannot .*offload_frozen: false"):
        offload.layer_matrices_to_host({"layers": {"w": sharding_}}, {"layers": {"w": jnp.ones((2, 3, 3))}})


def test_clip_equals_optax():
    grads = {"a": jnp.array([[3.0, -4.0]]), "b": jnp.array([12.0])}
    for max_norm in (1.0, 100.0):
        want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        got, _ = jpeft.optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-7), got, want)
