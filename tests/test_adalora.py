"""AdaLoRA in the library: a fresh adapter changes nothing, merge equals apply (float64 reference), gradients
reach the adapter only, multi-axis kernels, settings errors, and the optimizer-wrapping hook."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import lifecycle
from jpeft.methods.base import Training
from jpeft import ops, tree
from jpeft.errors import SettingError
from jpeft.methods import adalora as adalora_lib
from jpeft.models import llama
import reference

CONFIG = llama.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=32, tie_word_embeddings=True, scan_layers=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 7)))


@pytest.fixture(scope="module")
def setup():
    model = llama.model(CONFIG)
    params = reference.numpy_params(model)
    method = jpeft.adalora(init_r=4, target_r=2, alpha=6, model=model, total_step=10,
                           targets=r".*/(q|v)_proj/kernel|.*/mlp/down_proj/kernel")
    return model, params, method


def random_adapter(method, params, seed, std=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32),
                        jax.eval_shape(method.init, jax.random.key(0), params))


def test_fresh_adapter_changes_nothing(setup):
    """Exactly (e starts at zero). merge == apply on the model is checked against PEFT's outputs in
    tests/test_peft_adalora.py; here against a float64 reference per kernel."""
    model, params, method = setup
    forward = jax.jit(lambda p: model.forward(p, TOKENS)[0])
    fresh = method.init(jax.random.key(1), params)
    assert not any(np.any(np.asarray(f["e"])) for f in adalora_lib.modules(fresh).values())
    np.testing.assert_array_equal(np.asarray(forward(method.apply(params, fresh))), np.asarray(forward(params)))
    adapter = random_adapter(method, params, 0)
    f = adalora_lib.modules(adapter)["layers/self_attn/q_proj/kernel"]
    a, e, b = (np.asarray(f[n], np.float64) for n in ("a", "e", "b"))
    want = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"], np.float64) + \
        np.einsum("lir,lr,lro->lio", a, e, b) * 6 / (4 + 1e-5)
    np.testing.assert_allclose(np.asarray(method.merge(params, adapter)["layers"]["self_attn"]["q_proj"]["kernel"]),
                               want, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_adapter_only(setup):
    model, params, method = setup
    fresh = method.init(jax.random.key(1), params)

    def loss(adapter):
        return reference.target_xent(method.apply(params, adapter), CONFIG, TOKENS, jnp.ones(TOKENS.shape)) \
            + method.training.penalty(adapter)

    grads = jax.jit(jax.grad(loss))(fresh)
    assert jax.tree.structure(grads) == jax.tree.structure(fresh)
    flat = tree.flatten(grads)
    assert all(np.abs(np.asarray(flat[p])).max() > 0 for p in flat if p.endswith("/e"))   # e gets the loss's
    assert all(np.abs(np.asarray(flat[p])).max() > 0 for p in flat if p[-1] in "ab")      # a, b the penalty's


class AxesModel:
    """A model that says how many input axes its kernels have."""
    tied_tables = {}

    def __init__(self, layouts):
        self._layouts = layouts

    def layouts(self):
        return self._layouts


@pytest.mark.parametrize("inputs, shape, subscripts, x_shape", [
    (2, (4, 6, 12), "btnh,nhd->btd", (2, 3, 4, 6)),     # (heads, head_dim, embed): two input axes
    (1, (6, 2, 3), "ni,ihd->nhd", (5, 6)),              # (embed, heads, head_dim): two output axes
])
def test_multi_axis_kernels_apply_without_forming_and_equal_merge(inputs, shape, subscripts, x_shape):
    from jpeft.layout import Layout

    rng = np.random.default_rng(1)
    params = {"o": {"kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32)}}
    method = jpeft.adalora(init_r=3, target_r=1, alpha=4, targets=r"o/kernel",
                           model=AxesModel({"o/kernel": Layout("kernel", 0, inputs)}))
    adapter = random_adapter(method, params, 2)
    d_in, d_out = shape[:inputs], shape[inputs:]
    assert {n: v.shape for n, v in adapter["o"]["kernel"].items()} == {"a": (*d_in, 3), "e": (3,), "b": (3, *d_out)}
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    y = ops.einsum(subscripts, x, method.apply(params, adapter)["o"]["kernel"])
    merged = method.merge(params, adapter)["o"]["kernel"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.einsum(subscripts, x, merged)), rtol=1e-4, atol=1e-5)
    f = {n: np.asarray(v, np.float64) for n, v in adapter["o"]["kernel"].items()}
    delta = (f["a"].reshape(-1, 3) * f["e"]) @ f["b"].reshape(3, -1) * 4 / (3 + 1e-5)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(params["o"]["kernel"], np.float64) + delta.reshape(shape),
                               rtol=1e-5, atol=1e-6)


def test_bad_settings_are_named():
    with pytest.raises(SettingError, match="target_r"):
        jpeft.adalora(init_r=4, target_r=6)
    with pytest.raises(SettingError, match="beta1"):
        jpeft.adalora(beta1=1.0)
    with pytest.raises(SettingError, match="no budgeting phase"):
        jpeft.adalora(tinit=5, tfinal=5, total_step=10)
    params = {"embed": {"embedding": jnp.zeros((10, 4))}, "dense": {"kernel": jnp.zeros((4, 4))}}
    method = jpeft.adalora(init_r=2, target_r=1, targets=r".*/kernel")
    with pytest.raises(ValueError, match="total_step=N"):
        lifecycle.optimizer(method, optax.sgd(0.1))


def test_the_lifecycle_wraps_the_optimizer_with_the_method_s():
    params = {"w": jnp.ones(2)}
    halve = jpeft.full()._replace(training=Training(optimizer=lambda inner: optax.chain(inner, optax.scale(0.5))))
    wrapped = lifecycle.optimizer(halve, optax.sgd(1.0))
    assert wrapped.update(params, wrapped.init(params))[0]["w"].tolist() == [-0.5, -0.5]
    broken = jpeft.full()._replace(training=Training(optimizer=lambda inner: None))
    with pytest.raises(TypeError, match="must return an optax GradientTransformation"):
        lifecycle.optimizer(broken, optax.sgd(1.0))


def test_budget_table_is_peft_s_schedule():
    """The budget by step in Python numbers (PEFT's budget_schedule), not float32 on the device."""
    schedule = adalora_lib.Schedule(target_r=8, tinit=8, tfinal=8, deltaT=1, beta1=0.85, beta2=0.85, total_step=40)
    init, target = 12 * 120, 8 * 120
    assert schedule.budget(8, init, target) == (init, False)
    assert schedule.budget(9, init, target) == (int(480 * (1 - 1 / 24) ** 3 + 960), True)
    assert schedule.budget(32, init, target) == (target, True)
    assert schedule.budget(33, init, target) == (target, True)
