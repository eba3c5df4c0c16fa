"""LoHa and LoKr: identity at init, float64 numpy references, merge, gradients, layouts, sharding, errors."""

import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import ops, tree
from jpeft.methods.lokr import factor_sizes

D, H = 24, 12           # 24 = 4 x 6, 12 = 3 x 4: LoKr's Kronecker factors are not square
KINDS = ("loha", "lokr")


def build(kind, **kw):
    return {"loha": jpeft.loha, "lokr": jpeft.lokr}[kind](**kw)


def tiny_params(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / 5, jnp.float32)
    return {"q_proj": {"kernel": normal(D, D)}, "up_proj": {"kernel": normal(D, H)}, "norm": {"scale": jnp.ones((D,))}}


def tiny_forward(params, x):
    h = jnp.tanh(ops.linear(x, params["q_proj"]["kernel"])) * params["norm"]["scale"]
    return ops.linear(h, params["up_proj"]["kernel"])


def random_adapter(method, params, seed=1):
    """An adapter of the method's shapes with every factor random (a fresh one has a zero factor, which hides
    mistakes). numpy draws them: compiling random-number kernels is most of a tiny test's time on 2 cores."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(method.init, jax.random.key(0), params)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), shapes)


def init(method, params, seed=0):
    return jax.jit(method.init)(jax.random.key(seed, impl="rbg"), params)  # rbg: cheap to compile


forward = jax.jit(tiny_forward)   # one compiled program per test, not one per op (2 shared CPU cores)
linear = jax.jit(ops.linear)


X = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, D)), jnp.float32)
KERNELS = r".*/kernel"


def numpy_delta(kind, f, scale):
    """float64 ``dW (I, O)`` from one weight's factors, straight from the definitions."""
    f = {k: np.asarray(v, np.float64) for k, v in f.items()}
    if kind == "loha":
        flat = lambda a, b: a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
        return flat(f["a1"], f["b1"]) * flat(f["a2"], f["b2"]) * scale
    w1 = f["w1"] if "w1" in f else f["a1"] @ f["b1"]
    w2 = f["w2"] if "w2" in f else f["a2"] @ f["b2"]
    return np.kron(w1, w2) * scale


# ----------------------------------------------------------------------------- init, apply, merge


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_exactly_the_identity(kind):
    params = tiny_params()
    method = build(kind, rank=2, alpha=3, targets=KERNELS)
    adapter = init(method, params, 0)
    np.testing.assert_array_equal(forward(method.apply(params, adapter), X), forward(params, X))
    for a, b in zip(jax.tree.leaves(jax.jit(method.merge)(params, adapter)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # PEFT's init: exactly one factor (LoHa's hada_w2_b, LoKr's lokr_w1) starts at zero, the others do not
    zeros = {n for n, f in adapter["q_proj"]["kernel"].items() if not np.any(np.asarray(f))}
    assert zeros == {"loha": {"a2"}, "lokr": {"w1"}}[kind]


@pytest.mark.parametrize("kind, kw", [("loha", {}), ("lokr", {}), ("lokr", {"decompose_both": True})],
                         ids=["loha", "lokr", "lokr-both"])
def test_apply_and_merge_match_a_float64_reference(kind, kw):
    """Rank 1 everywhere but up_proj (rank 3, alpha 1.5): LoKr's W2 is then one full factor (3 >= max(6, 4) / 2),
    and with decompose_both q_proj's W1 is a1 @ b1 (1 < max(4, 4) / 2)."""
    params = tiny_params()
    targets = [jpeft.Rule(r"up_proj/kernel", rank=3, alpha=1.5), KERNELS]
    method = build(kind, rank=1, alpha=3, targets=targets, **kw)
    adapter = random_adapter(method, params)
    scales = {"q_proj": 3.0, "up_proj": 0.5}
    ref = {name: np.asarray(params[name]["kernel"], np.float64) + numpy_delta(kind, adapter[name]["kernel"], scale)
           for name, scale in scales.items()}
    expected = np.tanh(np.asarray(X, np.float64) @ ref["q_proj"]) @ ref["up_proj"]
    np.testing.assert_allclose(forward(method.apply(params, adapter), X), expected, rtol=1e-4, atol=1e-5)
    merged = jax.jit(method.merge)(params, adapter)
    assert not any(ops.is_wrapper(x) for x in tree.flatten(merged).values())
    for name in scales:
        np.testing.assert_allclose(merged[name]["kernel"], ref[name], rtol=1e-5, atol=1e-6)
    assert np.abs(expected - np.asarray(forward(params, X))).max() > 1e-2   # the update is not negligible
    if kind == "lokr":
        for name, rank in (("q_proj", 1), ("up_proj", 3)):
            shapes = {n: f.shape for n, f in adapter[name]["kernel"].items()}
            assert shapes == factor_sizes(D, params[name]["kernel"].shape[1], rank, kw.get("decompose_both", False), -1)
        assert "w2" in adapter["up_proj"]["kernel"]
        assert ("a1" in adapter["q_proj"]["kernel"]) is kw.get("decompose_both", False)


def _weight_sized(fn, *args, shape) -> list[str]:
    """The primitives in ``fn``'s jaxpr (nested ones too) that make an array of the weight's ``shape``."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.extend(str(eqn.primitive) for v in eqn.outvars if tuple(getattr(v.aval, "shape", ())) == shape)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_lokr_never_forms_the_kronecker_product_nor_a_gradient_for_w():
    w, x = jnp.zeros((96, 160)), jnp.ones((4, 96))   # 96 = 8 x 12, 160 = 10 x 16
    lokr, loha = jpeft.lokr(rank=2, targets=r"w"), jpeft.loha(rank=2, targets=r"w")

    def loss(method):
        return lambda adapter, w, x: jnp.sum(ops.linear(x, method.apply({"w": w}, adapter)["w"]) ** 2)
    lokr_adapter, loha_adapter = (jax.eval_shape(m.init, jax.random.key(0), {"w": w}) for m in (lokr, loha))
    assert _weight_sized(jax.value_and_grad(loss(lokr)), lokr_adapter, w, x, shape=(96, 160)) == []
    # LoHa forms its (full-rank) update in the op, as documented, and differentiates through it
    assert _weight_sized(jax.value_and_grad(loss(loha)), loha_adapter, w, x, shape=(96, 160))


@pytest.mark.parametrize("kind", KINDS)
def test_multi_axis_kernels_flatten_inputs_and_outputs(kind):
    """A kernel (heads, head_dim, embed) used through ops.einsum is the matrix (heads*head_dim, embed)."""
    from jpeft.layout import Layout

    class Model:  # a model that says its kernel has two input axes
        tied_tables = {}

        def layouts(self):
            return {"o/kernel": Layout("kernel", 0, 2)}

    w = tiny_params()["q_proj"]["kernel"][:, :12].reshape(4, 6, 12)
    method = build(kind, rank=2, alpha=2, targets=r"o/kernel", model=Model())
    adapter = random_adapter(method, {"o": {"kernel": w}})
    if kind == "loha":
        assert adapter["o"]["kernel"]["a1"].shape == (4, 6, 2) and adapter["o"]["kernel"]["b1"].shape == (2, 12)
    x = X.reshape(2, 3, 4, 6)
    einsum = jax.jit(ops.einsum, static_argnums=0)
    y = einsum("btnh,nhd->btd", x, method.apply({"o": {"kernel": w}}, adapter)["o"]["kernel"])
    dense = np.asarray(w, np.float64).reshape(24, 12) + numpy_delta(kind, adapter["o"]["kernel"], 1.0)
    np.testing.assert_allclose(y, np.asarray(x, np.float64).reshape(2, 3, 24) @ dense, rtol=1e-4, atol=1e-5)
    if kind == "loha":
        return  # LoHa runs jnp.einsum on the formed weight; LoKr reorders x and its result itself:
    y_t = einsum("btnh,nhd->dbt", x, method.apply({"o": {"kernel": w}}, adapter)["o"]["kernel"])
    np.testing.assert_allclose(y_t, np.transpose(y, (2, 0, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_layers_are_batch_axes(kind):
    w = jnp.stack([tiny_params(i)["up_proj"]["kernel"] for i in range(3)])
    method = build(kind, rank=2, alpha=2, targets=r"layers/kernel")
    adapter = random_adapter(method, {"layers": {"kernel": w}})
    merged = np.asarray(jax.jit(method.merge)({"layers": {"kernel": w}}, adapter)["layers"]["kernel"])
    applied = method.apply({"layers": {"kernel": w}}, adapter)["layers"]["kernel"]
    per_layer = jax.jit(lambda applied, x: jax.lax.map(lambda layer: ops.linear(x, layer), applied))  # as scan does
    np.testing.assert_allclose(per_layer(applied, X), np.einsum("btd,ldh->lbth", X, merged), rtol=1e-4, atol=1e-5)
    for i in range(3):
        own = {n: np.asarray(f)[i] for n, f in adapter["layers"]["kernel"].items()}
        np.testing.assert_allclose(merged[i], np.asarray(w[i]) + numpy_delta(kind, own, 1.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="still has 1 stack axes"):
        ops.linear(X, applied)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_exist_only_for_the_adapter(kind):
    params = tiny_params()
    method = build(kind, rank=2, targets=KERNELS)
    adapter = init(method, params, 0)
    grads = jax.jit(jax.grad(lambda a: jnp.mean(tiny_forward(method.apply(params, a), X) ** 2)))(adapter)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    nonzero = {n for n, g in grads["q_proj"]["kernel"].items() if float(jnp.abs(g).max()) > 0}
    # at init only the zero factor's gradient is nonzero (the others multiply a zero factor)
    assert nonzero == {"loha": {"a2"}, "lokr": {"w1"}}[kind]


def test_loha_step_costs_no_gradient_for_the_frozen_weight():
    """XLA's count: LoHa's step does the work of x @ (W + dW) and its gradient, nothing more for W."""
    from jpeft.analysis import grad_step_cost

    n, d, r = 64, 256, 4
    w, x = jnp.zeros((d, d)), jnp.ones((n, d))
    method = jpeft.loha(rank=r, targets=r"w")
    adapter = jax.eval_shape(method.init, jax.random.key(0), {"w": w})
    cost = grad_step_cost(lambda a, x: jnp.sum(ops.linear(x, method.apply({"w": w}, a)["w"]) ** 2), adapter, x)
    full = grad_step_cost(lambda p, x: jnp.sum((x @ p["w"]) ** 2), {"w": w}, x)
    # the same three n*d*d matmuls as full fine-tuning, plus forming dW and its factor gradients (~ 6 * 2 r d^2)
    assert cost.flops <= full.flops + 2 * 6 * 2 * r * d * d, (cost.flops, full.flops)
    assert cost.flops >= full.flops


# ----------------------------------------------------------------------------- layout, sharding, quantized bases


@pytest.fixture(scope="module")
def llama_model():
    from jpeft.models import llama

    return llama.model(llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                                         num_heads=4, num_kv_heads=2, scan_layers=True))


@pytest.mark.parametrize("kind", KINDS)
def test_logical_axes_and_shardings_follow_the_weights(kind, llama_model):
    from jpeft import sharding

    params = llama_model.abstract_params()
    method = build(kind, rank=4, targets=r".*/(q|v)_proj/kernel|.*/down_proj/kernel", model=llama_model)
    adapter = jax.eval_shape(method.init, jax.random.key(0), params)
    axes = sharding.adapter_axes(method, adapter, llama_model.param_axes())
    flat_axes, flat = jpeft.layout.flatten_axes(axes), tree.flatten(adapter)
    assert set(flat_axes) == set(flat)
    assert all(len(flat_axes[p]) == leaf.ndim for p, leaf in flat.items())
    q_axes = {p.rsplit("/", 1)[1]: a for p, a in flat_axes.items() if "q_proj" in p}
    weight_axes = jpeft.layout.flatten_axes(llama_model.param_axes())
    q = next(a for p, a in weight_axes.items() if p.endswith("q_proj/kernel"))
    assert q[0] == "layers"
    if kind == "loha":
        assert q_axes["a1"] == (*q[:2], "lora_rank") and q_axes["b2"] == (q[0], "lora_rank", q[2])
    else:
        assert all(a[0] == q[0] for a in q_axes.values())   # per-layer factors follow the layer axis
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.load_rules("default")
    specs = sharding.logical_specs(adapter, axes, mesh, rules)
    assert jax.tree.structure(specs) == jax.tree.structure(adapter)
    # the applied tree (wrappers) gets specs too: the base's and its factors'
    applied = method.apply(params, adapter)
    wrapped = sharding.logical_specs(applied, llama_model.param_axes(), mesh, rules)
    leaf = tree.flatten(wrapped)[next(p for p in tree.flatten(applied) if p.endswith("q_proj/kernel"))]
    assert isinstance(leaf, jpeft.LohaWeight if kind == "loha" else jpeft.LokrWeight)
    assert set(leaf.factors) == set(adapter["layers"]["self_attn"]["q_proj"]["kernel"])


def test_quantized_base_runs_unmerged():
    from jpeft import quant

    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)) / 8, jnp.float32)}
    qparams = quant.quantize(params, r"w", "nf4")
    assert "float weight" in jpeft.loha(targets=r"w").merge_blocker(qparams)
    method = jpeft.lokr(rank=2, alpha=2, targets=r"w")
    adapter = random_adapter(method, qparams)
    assert "float weight" in method.merge_blocker(qparams) and method.merge_blocker(params) is None
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 64)), jnp.float32)
    applied = jpeft.for_inference(method, qparams, adapter)["w"]
    assert isinstance(applied.base, quant.QuantizedArray)   # the base stays 4-bit
    dense = np.asarray(ops.as_array(qparams["w"]), np.float64) + numpy_delta("lokr", adapter["w"], 1.0)
    np.testing.assert_allclose(linear(x, applied), np.asarray(x, np.float64) @ dense, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind, kwargs, message", [
    ("loha", {"rank": 0}, "rank must be a positive integer"),
    ("lokr", {"alpha": -1.0}, "alpha must be a finite number > 0"),
    ("lokr", {"decompose_factor": 0}, "decompose_factor must be -1"),
    ("loha", {"targets": jpeft.Rule(r".*", dropout=0.1)}, "unknown LoHa setting"),
])
def test_bad_settings_are_clear_errors(kind, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(kind, **kwargs)


def test_settings_errors_name_the_setting_through_the_registry():
    from jpeft.methods import registry

    with pytest.raises(registry.SettingsMappingError, match="must be -1") as info:
        registry.validate("lokr", {"decompose_factor": -3})
    assert info.value.setting == "decompose_factor"
    assert registry.check_settings("loha", {"rank": 4, "alpha": 8}) == {"rank": 4, "alpha": 8.0}


@pytest.mark.parametrize("kind", KINDS)
def test_targets_that_are_not_kernels_and_foreign_adapters_are_refused(kind):
    params = tiny_params()
    with pytest.raises(ValueError, match="adapts kernels .* 'norm/scale'"):
        jax.eval_shape(build(kind, targets=r".*/(kernel|scale)").init, jax.random.key(0), params)
    method = build(kind, rank=2, targets=KERNELS)
    adapter = jax.eval_shape(method.init, jax.random.key(0), params)
    with pytest.raises(ValueError, match="makes"):
        build(kind, rank=3, targets=KERNELS).apply(params, adapter)
    lora = jax.eval_shape(jpeft.lora(rank=2, targets=KERNELS).init, jax.random.key(0), params)
    with pytest.raises(ValueError, match="another model or with other settings"):
        method.apply(params, lora)
    with pytest.raises(ValueError, match="no factors"):
        build(kind, rank=2, targets=r".*/kernel").apply(params, {"q_proj": adapter["q_proj"]})


def test_per_rule_ranks_and_alphas():
    params = jax.eval_shape(tiny_params)
    method = jpeft.loha(rank=2, alpha=4, targets=[jpeft.Rule(r"up_proj/kernel", rank=3, alpha=1.5), KERNELS])
    adapter = jax.eval_shape(method.init, jax.random.key(0), params)   # nothing allocated
    assert adapter["up_proj"]["kernel"]["a1"].shape == (D, 3) and adapter["q_proj"]["kernel"]["a1"].shape == (D, 2)
    applied = method.apply(params, adapter)
    assert math.isclose(applied["up_proj"]["kernel"].scale, 0.5) and math.isclose(applied["q_proj"]["kernel"].scale, 2)
