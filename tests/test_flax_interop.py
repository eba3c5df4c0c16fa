"""jpeft's weight methods on Flax models it does not own: small linen and nnx models built from Flax's layers.

The references are Flax's own forward passes: the unmodified model on its own variables (a
fresh adapter must give exactly its output) and on ``method.merge``'s weights (a trained
adapter must match it to float tolerance).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from safetensors.numpy import load_file

import jpeft
import jpeft.checkpoint
from jpeft import quant, tree
from jpeft.interop import InteropError
from jpeft.interop import linen as jl
from jpeft.interop import nnx as jn

V, D, H, K, F = 32, 64, 4, 16, 96
KEY = jax.random.key(0)
IDS = jax.random.randint(jax.random.key(7), (2, 5), 0, V)


def perturb(adapter, scale=0.1):
    """A 'trained' adapter: every leaf moved off its init (B != 0, IA3 scales != 1)."""
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


class LinenNet(nn.Module):
    """Embed (lookups and tied head), DenseGeneral in and out of heads, an Einsum with a (out, in) kernel, Dense."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(V, D, name="embed")
        x = embed(ids)
        q = nn.DenseGeneral((H, K), name="q_proj")(x)                          # kernel (D, H, K)
        o = nn.DenseGeneral(D, axis=(-2, -1), name="o_proj")(jnp.tanh(q))     # kernel (H, K, D): 2 input axes
        up = nn.Einsum((F, D), "btd,fd->btf", name="up",                       # kernel (F, D): out axis first
                       kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None)))(x)
        x = x + o + nn.Dense(D, name="down")(nn.gelu(up))
        return embed.attend(nn.LayerNorm(name="norm")(x))


@pytest.fixture(scope="module")
def linen_model():
    net = LinenNet()
    variables = jax.jit(net.init)(KEY, IDS)
    return net, variables, jl.wrap(net, variables, IDS), jax.jit(net.apply)(variables, IDS)


def test_linen_layouts_come_from_the_layers(linen_model):
    _, _, model, _ = linen_model
    layouts = model.layouts()
    assert {p: (l.kind, l.inputs) for p, l in layouts.items()} == {
        "embed/embedding": ("table", 1), "q_proj/kernel": ("kernel", 1), "o_proj/kernel": ("kernel", 2),
        "up/kernel": ("kernel", 1), "down/kernel": ("kernel", 1)}
    assert model.params["up"]["kernel"].shape == (D, F)        # held as (in, out)
    assert model.tied_tables == {"embed/embedding": "embed/embedding"}
    assert model.original_params(model.params)["up"]["kernel"].shape == (F, D)


def test_linen_lora_fresh_is_exact_and_trained_matches_merge(linen_model):
    net, variables, model, reference = linen_model
    # the embedding is also the output head (attend): ensure_weight_tying adapts both, as merge does
    method = jpeft.lora(rank=4, targets=r".*/(kernel|embedding)", ensure_weight_tying=True, model=model)
    adapter = method.init(jax.random.key(1), model.params)
    assert adapter["o_proj"]["kernel"]["a"].shape == (H, K, 4) and adapter["o_proj"]["kernel"]["b"].shape == (4, D)
    assert adapter["up"]["kernel"]["a"].shape == (D, 4) and adapter["up"]["kernel"]["b"].shape == (4, F)
    fn = jax.jit(model.bind(method))          # one program for the fresh and the trained adapter
    np.testing.assert_array_equal(fn(adapter, model.params, IDS), reference)
    trained = perturb(adapter)
    out = fn(trained, model.params, IDS)
    merged = jax.jit(lambda ad, p: model.call_merged(method, ad, p, IDS))(trained, model.params)
    np.testing.assert_allclose(out, merged, atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(out - reference).max()) > 1e-2


@pytest.mark.slow
def test_linen_ia3_qlora_and_dropout_run_through_the_layers(linen_model):
    net, variables, model, reference = linen_model
    ia3 = jpeft.ia3(targets=r"(up|down)/kernel", feedforward=r"down/kernel", model=model)
    ia3_fresh = ia3.init(KEY, model.params)
    assert ia3_fresh["up"]["kernel"]["ia3_l"].shape == (F,) and ia3_fresh["down"]["kernel"]["ia3_l"].shape == (F,)
    targets = r"(q_proj|o_proj|up|down)/kernel"
    qparams = quant.quantize(model.params, targets, block_size=16, model=model)
    assert all(quant.is_quantized(tree.flatten(qparams)[p]) for p in ("q_proj/kernel", "o_proj/kernel", "up/kernel"))
    qlora = jpeft.lora(rank=4, targets=targets, dropout=0.5, model=model)
    assert qlora.merge_blocker(qparams) is not None     # merging would dequantize: apply is the way

    ia3_fn = jax.jit(model.bind(ia3))
    np.testing.assert_array_equal(ia3_fn(ia3_fresh, model.params, IDS), reference)

    @jax.jit
    def run(ia3_trained, q_adapter, qparams):
        return (model.bind(ia3)(ia3_trained, model.params, IDS), model.call_merged(ia3, ia3_trained, model.params, IDS),
                model.bind(qlora)(q_adapter, qparams, IDS),
                model.call_merged(qlora, q_adapter, quant.dequantize(qparams), IDS),
                model.bind(qlora)(q_adapter, qparams, IDS, rng=jax.random.key(5)))

    q_adapter = perturb(qlora.init(jax.random.key(1), qparams))
    out, merged, q_out, q_merged, q_dropped = run(perturb(ia3_fresh), q_adapter, qparams)
    np.testing.assert_allclose(out, merged, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(q_out, q_merged, atol=5e-5, rtol=1e-5)
    assert not np.allclose(q_dropped, q_out)


def test_rules_and_bad_targets_are_clear_errors(linen_model):
    _, _, model, _ = linen_model
    with pytest.raises(tree.RuleError, match=r"o_proj/kernel"):   # an unused rule shows real paths
        jpeft.lora(rank=2, targets=r".*/qproj/kernel", model=model).init(KEY, model.params)
    method = jpeft.lora(rank=2, targets=r"norm/scale|q_proj/kernel")
    bad = {"norm": {"scale": {"a": jnp.zeros((D, 1)), "b": jnp.zeros((1, 1))}}}
    with pytest.raises((InteropError, ValueError)):
        model.bind(method)(bad, model.params, IDS)
    ia3 = jpeft.ia3(targets=r"norm/scale", feedforward=())
    with pytest.raises(ValueError, match="kernel"):
        ia3.init(KEY, model.params)


class _RawAndDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        raw = self.param("kernel", nn.initializers.lecun_normal(), (4, 4))   # a weight of no registered layer
        return nn.Dense(4, name="dense")(x @ raw)


def test_a_target_outside_the_registered_layers_names_the_adaptable_weights():
    net, x = _RawAndDense(), jnp.ones((2, 4))
    model = jl.wrap(net, net.init(KEY, x), x)
    assert sorted(model.layouts()) == ["dense/kernel"]
    method = jpeft.lora(rank=2, targets=r".*kernel", model=model)
    adapter = method.init(KEY, model.params)
    with pytest.raises(InteropError, match=r"adapted 'kernel', which is not a weight of a layer .* dense/kernel"):
        model.bind(method)(adapter, model.params, x)


def test_adapter_factors_inherit_the_kernels_partitioning(linen_model):
    _, _, model, _ = linen_model
    assert model.param_axes()["up"]["kernel"] == (None, "model")     # (in, out) after the transpose
    method = jpeft.lora(rank=4, targets=r"up/kernel", model=model)
    adapter = method.init(KEY, model.params)
    specs = model.adapter_specs(method, adapter)
    P = jax.sharding.PartitionSpec
    assert specs["up"]["kernel"] == {"a": P(None, None), "b": P(None, "model")}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    placed = jax.device_put(adapter, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs))
    assert placed["up"]["kernel"]["b"].sharding.spec == P(None, "model")


# ----------------------------------------------------------------------------- nnx


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.q_proj = nnx.LinearGeneral(D, (H, K), rngs=rngs)
        self.o_proj = nnx.LinearGeneral((H, K), D, axis=(-2, -1), rngs=rngs)
        self.up = nnx.Einsum("btd,fd->btf", (F, D), (F,), rngs=rngs,
                             kernel_metadata={"out_sharding": ("model", None)})
        self.blocks = nnx.List([nnx.Linear(F, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)])

    def __call__(self, ids):
        x = self.embed(ids)
        o = self.o_proj(jnp.tanh(self.q_proj(x)))
        x = x + o + self.blocks[0](nnx.gelu(self.up(x)))
        return self.embed.attend(self.blocks[1](x))


@pytest.fixture(scope="module")
def nnx_model():
    with nnx.use_eager_sharding(False):
        net = NnxNet(nnx.Rngs(0))
    return net, jn.wrap(net, IDS)


def test_nnx_lora_fresh_is_exact_trained_matches_merge_and_the_module_is_untouched(nnx_model):
    net, model = nnx_model
    assert {p: (l.kind, l.inputs) for p, l in model.layouts().items()} == {
        "embed/embedding": ("table", 1), "q_proj/kernel": ("kernel", 1), "o_proj/kernel": ("kernel", 2),
        "up/kernel": ("kernel", 1), "blocks/0/kernel": ("kernel", 1), "blocks/1/kernel": ("kernel", 1)}
    method = jpeft.lora(rank=4, targets=r".*/(kernel|embedding)", ensure_weight_tying=True, model=model)
    adapter = method.init(jax.random.key(1), model.params)
    fn = model.bind(method)
    reference = net(IDS)
    np.testing.assert_array_equal(fn(adapter, model.params, IDS), reference)
    assert isinstance(net.up, nnx.Einsum) and isinstance(net.blocks[0], nnx.Linear)   # user's module unchanged

    @jax.jit
    def run(trained, frozen):
        return fn(trained, frozen, IDS), model.call_merged(method, trained, frozen, IDS)

    out, merged = run(perturb(adapter), model.params)
    np.testing.assert_allclose(out, merged, atol=2e-5, rtol=1e-5)


def test_nnx_partitioning_is_inherited(nnx_model):
    _, model = nnx_model
    assert model.param_axes()["up"]["kernel"] == (None, "model")
    method = jpeft.lora(rank=4, targets=r"(up|blocks/\d)/kernel", model=model)
    adapter = method.init(KEY, model.params)
    assert model.adapter_specs(method, adapter)["up"]["kernel"]["b"] == jax.sharding.PartitionSpec(None, "model")


@pytest.mark.slow
def test_nnx_qlora_matches_its_dequantized_weights(nnx_model):
    _, model = nnx_model
    method = jpeft.lora(rank=4, targets=r"(up|blocks/\d)/kernel", model=model)
    qparams = quant.quantize(model.params, r"(up|blocks/\d)/kernel", block_size=32, model=model)
    trained = perturb(method.init(KEY, qparams))
    np.testing.assert_allclose(model.bind(method)(trained, qparams, IDS),
                               model.call_merged(method, trained, quant.dequantize(qparams), IDS), atol=5e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- saving


class _Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, use_bias=False, name="q_proj")(x) + nn.Dense(D, use_bias=False, name="v_proj")(x)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + _Attn(name="self_attn")(x)


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _Layer(name=f"layers_{i}")(x)
        return x


class HfNamed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Model(name="model")(x)


def test_only_the_adapter_trains_and_it_saves_with_orbax_and_exports_to_peft(tmp_path):
    net = HfNamed()
    x = jax.random.normal(KEY, (4, D))
    model = jl.wrap(net, net.init(KEY, x), x)
    method = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v)_proj/kernel", model=model)
    adapter = method.init(jax.random.key(1), model.params)
    fn, opt = model.bind(method), optax.adam(1e-2)

    @jax.jit
    def step(adapter, state):
        loss, grads = jax.value_and_grad(lambda ad: jnp.mean((fn(ad, model.params, x) - 1.0) ** 2))(adapter)
        updates, state = opt.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss, grads

    state, losses = opt.init(adapter), []
    for _ in range(5):
        adapter, state, loss, grads = step(adapter, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)     # gradients for the adapter only
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

    jpeft.checkpoint.save_adapter(tmp_path / "ckpt", adapter, metadata={"method": "lora"})
    restored, meta = jpeft.checkpoint.restore_adapter(tmp_path / "ckpt", like=jax.eval_shape(lambda: adapter))
    assert meta["method"] == "lora"
    jax.tree.map(np.testing.assert_array_equal, restored, adapter)

    from jpeft.io.peft import save_peft

    save_peft(tmp_path / "peft", model, method, model.params, adapter)
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    assert len(tensors) == 8 and key in tensors
    np.testing.assert_allclose(tensors[key], np.asarray(adapter["model"]["layers_1"]["self_attn"]["v_proj"]["kernel"]["a"]).T)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8


# ----------------------------------------------------------------------------- layers jpeft cannot adapt


class _MoeNet(nn.Module):
    """A router-free mixture of experts: a Dense in, an expert einsum ``etd,edf->etf`` (``e`` is neither an input
    nor an output axis of the kernel), a Dense out."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="proj_in")(x)                                               # (T, 8)
        experts = nn.Einsum((3, 8, 6), "etd,edf->etf", use_bias=False, name="experts")
        y = experts(jnp.broadcast_to(h, (3, *h.shape)))                                  # (3, T, 6)
        return nn.Dense(4, name="proj_out")(jnp.tanh(y).sum(0))


def test_a_layer_jpeft_cannot_factor_is_an_error_only_when_targeted():
    net, x = _MoeNet(), jax.random.normal(jax.random.key(2), (5, 4))
    variables = net.init(KEY, x)
    model = jl.wrap(net, variables, x)
    assert model.name == "linen:_MoeNet"
    assert sorted(model.layouts()) == ["proj_in/kernel", "proj_out/kernel"]
    method = jpeft.lora(rank=2, targets=r"proj_(in|out)/kernel", model=model)
    adapter = method.init(KEY, model.params)
    np.testing.assert_array_equal(model.bind(method)(adapter, model.params, x), net.apply(variables, x))
    method = jpeft.lora(rank=2, targets=r"experts/kernel", model=model)
    with pytest.raises(InteropError, match=r"einsum 'etd,edf->etf' uses kernel axes .*'experts/kernel'"):
        model.bind(method)(method.init(KEY, model.params), model.params, x)


def test_the_model_is_named_after_its_class(linen_model, nnx_model):
    assert linen_model[2].name == "linen:LinenNet" and nnx_model[1].name == "nnx:NnxNet"



# ----------------------------------------------------------------------------- nnx's lifted transforms


class _Block(nnx.Module):
    """A Linear, then an Einsum whose kernel is stored (out, in): transposed to (in, out) for the methods."""

    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Einsum("bf,df->bd", (8, 16), (8,), rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(x)))


class _Remat(nnx.Module):
    def __init__(self, rngs):
        self.inp, self.block = nnx.Linear(4, 8, rngs=rngs), _Block(rngs)

    def __call__(self, x):
        return nnx.remat(_Block.__call__)(self.block, self.inp(x))


class _Scanned(nnx.Module):
    """Three blocks made by ``nnx.vmap`` (parameters stacked on a leading axis), run by ``nnx.scan``, then the same
    blocks side by side by ``nnx.vmap``."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Block(rngs)

        self.inp, self.blocks = nnx.Linear(4, 8, rngs=rngs), make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(block, h):
            return block(h)

        h = step(self.blocks, self.inp(x))
        return nnx.vmap(lambda block, h: block(h), in_axes=(0, None))(self.blocks, h).sum(0)


@pytest.mark.parametrize("cls", [_Remat, _Scanned])
def test_nnx_blocks_under_lifted_transforms(cls):
    """Layers called inside nnx.remat / nnx.scan / nnx.vmap: a fresh adapter is the model bit for bit, a trained one
    matches merge, and the gradient is the adapter's alone (stacked blocks get stacked factors)."""
    with nnx.use_eager_sharding(False):
        net = cls(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 4))
    model = jn.wrap(net, x)
    stacked = 1 if cls is _Scanned else 0
    prefix = "blocks" if stacked else "block"
    assert {p: (l.lead, l.inputs) for p, l in model.layouts().items()} == {
        "inp/kernel": (0, 1), f"{prefix}/up/kernel": (stacked, 1), f"{prefix}/down/kernel": (stacked, 1)}
    method = jpeft.lora(rank=2, targets=r".*/kernel", model=model)
    adapter = method.init(KEY, model.params)
    fn = model.bind(method)
    np.testing.assert_array_equal(fn(adapter, model.params, x), net(x))
    trained = perturb(adapter)

    @jax.jit
    def run(trained):
        out, pullback = jax.vjp(lambda a: fn(a, model.params, x), trained)
        return out, pullback(jnp.ones_like(out))[0], model.call_merged(method, trained, model.params, x)

    out, grads, merged = run(trained)
    np.testing.assert_allclose(out, merged, atol=2e-5, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(trained)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if stacked:
        assert grads["blocks"]["down"]["kernel"]["a"].shape == (3, 16, 2)


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        up = nn.Einsum((16, 8), "bd,fd->bf", name="up")(x)                # kernel stored (out, in)
        return x + nn.Dense(8, name="down")(nn.gelu(up)), None


class _LinenScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="inp")(x)
        blocks = nn.scan(nn.remat(_LinenBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return blocks(name="blocks")(h, None)[0]


def test_linen_blocks_under_scan_and_remat():
    """A linen stack run by nn.scan (over nn.remat): per-layer factors on a lead axis, fresh exact, trained = merge."""
    net, x = _LinenScanned(), jax.random.normal(jax.random.key(1), (2, 4))
    variables = net.init(KEY, x)
    model = jl.wrap(net, variables, x)
    assert {p: (l.lead, l.inputs) for p, l in model.layouts().items()} == {
        "inp/kernel": (0, 1), "blocks/up/kernel": (1, 1), "blocks/down/kernel": (1, 1)}
    method = jpeft.lora(rank=2, targets=r".*/kernel", model=model)
    adapter = method.init(KEY, model.params)
    fn = model.bind(method)
    np.testing.assert_array_equal(fn(adapter, model.params, x), net.apply(variables, x))
    trained = perturb(adapter)
    out, merged = jax.jit(lambda a: (fn(a, model.params, x), model.call_merged(method, a, model.params, x)))(trained)
    np.testing.assert_allclose(out, merged, atol=2e-5, rtol=1e-5)
