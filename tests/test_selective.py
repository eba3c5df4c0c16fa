"""Selective fine-tuning: BitFit, chosen layers and weight types, on stacked and unrolled layers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import analysis, tree
from jpeft.methods import registry
from jpeft.models import llama
from jpeft import stack
from reference import numpy_params

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                           num_kv_heads=2, tie_word_embeddings=True)
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)


@functools.cache
def _models():
    """``(unrolled model, its params, stacked model, the same params stacked)``, made once."""
    unrolled = llama.model(CONFIG)
    params = numpy_params(unrolled, stddev=0.2)
    scanned = llama.model(dataclasses.replace(CONFIG, scan_layers=True))
    layers = [params[f"layers_{i}"] for i in range(CONFIG.num_layers)]
    stacked = {**{k: v for k, v in params.items() if not k.startswith("layers_")},
               "layers": jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *layers)}  # numpy: no compile
    return unrolled, params, scanned, stacked


def _loss(model, method, frozen):
    def loss(adapter):
        logits, _ = model.forward(method.apply(frozen, adapter), TOKENS)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], TOKENS[:, 1:]).mean()
    return loss


def _nbytes(x) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(x))


def test_rules_match_per_layer_paths_whether_layers_are_stacked_or_not():
    unrolled, params, scanned, stacked = _models()
    want = {f"layers_{i}/self_attn/{p}_proj/kernel" for i in (0, 2) for p in "qk"}
    for model, p in ((unrolled, params), (scanned, stacked)):
        method = jpeft.selective(r".*/self_attn/(q|k)_proj/kernel", layers=[0, -1], model=model)
        adapter = method.init(None, p)
        assert set(tree.flatten(adapter)) == want
        np.testing.assert_array_equal(adapter["layers_2"]["self_attn"]["q_proj"]["kernel"],
                                      params["layers_2"]["self_attn"]["q_proj"]["kernel"])
        # Only the chosen slices: 2 layers x (q 32x32 + k 32x16) floats, not the stacks.
        assert _nbytes(adapter) == 2 * (32 * 32 + 32 * 16) * 4
    top = jpeft.selective(top_layers=1, model=scanned).init(None, stacked)
    assert {p.split("/")[0] for p in tree.flatten(top)} == {"layers_2"}
    assert len(tree.flatten(top)) == 9  # 7 kernels + 2 norms: the final norm is outside the layers
    report = jpeft.param_report(stacked, top)
    assert report.total == sum(x.size for x in jax.tree.leaves(stacked))  # slices replace, they do not add
    assert report.trainable == sum(x.size for x in jax.tree.leaves(params["layers_2"]))


def test_stacked_selection_gets_the_gradients_of_the_unrolled_model_for_its_slices_only():
    unrolled, params, scanned, stacked = _models()
    targets = r".*/(self_attn/o_proj/kernel|mlp/.*|post_attention_layernorm/scale)"
    sel_s = jpeft.selective(targets, layers=[0, 2], model=scanned)  # segments: [0, 1) own, [1, 2) not, [2, 3) own
    adapter = jax.tree.map(lambda x: x + 0.05, sel_s.init(None, stacked))  # trained away from the base
    loss_s, grads_s = jax.jit(jax.value_and_grad(_loss(scanned, sel_s, stacked)))(adapter)
    # Reference: full fine-tuning of the same leaves of the unrolled model (no stack, no segments).
    ref = jpeft.full([f"layers_{i}/{p}" for i in (0, 2) for p in ("self_attn/o_proj/kernel", "mlp/.*",
                                                                   "post_attention_layernorm/scale")])
    ref_adapter = jax.tree.map(lambda x: x + 0.05, ref.init(None, params))
    ref_loss = jax.value_and_grad(_loss(unrolled, ref, tree.without(params, ref_adapter)))
    loss_u, grads_u = jax.jit(ref_loss)(ref_adapter)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    assert jax.tree.structure(grads_s) == jax.tree.structure(adapter)
    assert set(tree.flatten(grads_s)) == set(tree.flatten(grads_u))
    for path, g in tree.flatten(grads_s).items():
        np.testing.assert_allclose(g, tree.flatten(grads_u)[path], rtol=2e-3, atol=1e-6)
    state = optax.adam(1e-3).init(adapter)
    assert _nbytes(state) == 2 * _nbytes(adapter) + 4  # mu, nu and the count: slices only
    assert _nbytes(adapter) == 2 * (32 * 32 + 3 * 32 * 64 + 32) * 4  # o, the MLP and a norm of 2 of the 3 layers
    # merge writes the slices into the stacks (numpy reference).
    merged = sel_s.merge(stacked, adapter)
    want = np.array(stacked["layers"]["mlp"]["up_proj"]["kernel"])
    want[[0, 2]] = np.stack([adapter[f"layers_{i}"]["mlp"]["up_proj"]["kernel"] for i in (0, 2)])
    np.testing.assert_array_equal(merged["layers"]["mlp"]["up_proj"]["kernel"], want)


def test_segments_scan_like_one_scan_with_per_layer_inputs():
    """stack.scan over Segments equals lax.scan over the stack with the owned rows written in: the carry, the
    per-layer inputs (a KV cache's role) and the stacked outputs, and the owned rows' gradients."""
    shared = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.arange(4.0)}
    xs = jnp.arange(8.0).reshape(4, 2)

    def fn(c, p, x):
        return c * 0.5 + jnp.sum(p["w"] ** 2) + p["b"] + jnp.sum(x), c + x

    def segmented(own_w):
        parts = ((0, 2, {"w": None, "b": None}), (2, 4, {"w": own_w, "b": None}))
        return stack.scan(fn, 1.0, stack.Segments(shared, parts), xs)

    def reference(own_w):
        return jax.lax.scan(lambda c, i: fn(c, *i), 1.0, ({**shared, "w": shared["w"].at[2:].set(own_w)}, xs))

    own_w = shared["w"][2:] + 1.0
    for got, want in zip(jax.tree.leaves(segmented(own_w)), jax.tree.leaves(reference(own_w))):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda o: segmented(o)[0])(own_w), jax.grad(lambda o: reference(o)[0])(own_w),
                               rtol=1e-6)


def test_selecting_stack_slices_copies_no_stack():
    """XLA's memory analysis of a train step on a scanned model: scratch memory far below the stack's size.

    A copy of the stack (writing the trained slices into it, or a scan saving each layer's row for the
    backward pass: 1.1 times the stack here without stack.py's remat policy) would take at least the
    stack's bytes. Training the top layer's weights and every layer's norm scales (a backward pass through
    all layers, which holds a layer's rows or two at a time) takes about a quarter of it.
    """
    model = llama.model(dataclasses.replace(CONFIG, hidden_size=256, intermediate_size=512, num_layers=8,
                                            scan_layers=True))
    params = model.abstract_params()
    stack_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["layers"]))
    method = jpeft.selective(r"layers_7/.*|.*_layernorm/scale", model=model)
    adapter = jax.eval_shape(method.init, None, params)
    assert sum(x.size for x in jax.tree.leaves(adapter)) < stack_bytes / 4 / 7  # the slices only (1/8 + norms)
    cost = analysis.grad_step_cost(lambda a, frozen: _loss(model, method, frozen)(a), adapter, params)
    assert cost.temp_bytes < stack_bytes / 3, (cost.temp_bytes, stack_bytes)


def test_bitfit_trains_biases_or_the_norm_scales_of_models_without_them():
    smol = llama.model(llama.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                         num_heads=9, num_kv_heads=3, tie_word_embeddings=True, scan_layers=True))
    abstract = smol.abstract_params()
    adapter = jax.eval_shape(lambda p: jpeft.bitfit(model=smol).init(None, p), abstract)
    paths = set(tree.flatten(adapter))
    assert paths == {f"layers_{i}/{n}_layernorm/scale" for i in range(30) for n in ("input", "post_attention")} | {
        "norm/scale"}
    assert sum(x.size for x in jax.tree.leaves(adapter)) == 35_136  # the README's count for SmolLM2-135M
    assert jpeft.bitfit(model=smol).label == "bitfit (norm scales: no biases)"

    qwen = llama.model(dataclasses.replace(CONFIG, attention_bias=True, scan_layers=True))
    params = qwen.abstract_params()
    biases = {f"layers_{i}/self_attn/{p}_proj/bias" for i in range(3) for p in "qkv"}
    assert set(tree.flatten(jax.eval_shape(jpeft.bitfit(model=qwen).init, None, params))) == biases
    both = set(tree.flatten(jax.eval_shape(jpeft.bitfit(norms="always", model=qwen).init, None, params)))
    assert both == biases | {f"layers_{i}/{n}_layernorm/scale" for i in range(3)
                             for n in ("input", "post_attention")} | {"norm/scale"}
    with pytest.raises(ValueError, match="no bias vectors .*norms='never'"):
        jpeft.bitfit(norms="never", model=smol).init(None, abstract)


def test_selection_errors_name_the_setting():
    _, params, scanned, stacked = _models()
    with pytest.raises(registry.SettingsMappingError, match="must be a positive integer") as info:
        registry.validate("selective", {"top_layers": 0})
    assert info.value.setting == "top_layers"
    with pytest.raises(registry.SettingsMappingError, match="cannot be given together with top_layers"):
        registry.validate("selective", {"top_layers": 1, "layers": [0]})
    with pytest.raises(registry.SettingsMappingError, match="'x' is a str, it needs a list or null"):
        registry.check_settings("selective", {"layers": "x"})
    with pytest.raises(registry.SettingsMappingError, match="'all' must be one of 'auto', 'always', 'never'"):
        registry.check_settings("bitfit", {"norms": "all"})
    with pytest.raises(jpeft.errors.SettingError, match=r"layers has index 3 outside the model's 3 layers"):
        jpeft.selective(layers=[3], model=scanned).init(None, stacked)
    with pytest.raises(jpeft.errors.SettingError, match="top_layers is more than the model's 3 layers"):
        jpeft.selective(top_layers=4, model=scanned).init(None, stacked)
    with pytest.raises(jpeft.RuleError, match=r"'.\*/q_porj/kernel'.* matched no parameter"):
        jpeft.selective(r".*/q_porj/kernel", model=scanned).init(None, stacked)
    with pytest.raises(ValueError, match="select no weight inside layers"):
        jpeft.selective(r"norm/scale", top_layers=1, model=scanned).init(None, stacked)
    with pytest.raises(ValueError, match="not a parameter of this model|no parameter of this model"):
        jpeft.selective(model=scanned).apply(stacked, {"layers_9": {"w": jnp.zeros(2)}})


def test_adapter_axes_drop_the_stack_axis():
    _, _, scanned, stacked = _models()
    adapter = jpeft.selective(top_layers=1, model=scanned).init(None, stacked)
    method = jpeft.selective(top_layers=1, model=scanned)
    axes = method.logical_axes(adapter, scanned.param_axes())
    assert axes["layers_2"]["self_attn"]["k_proj"]["kernel"] == ("embed", "kv_heads")
    assert axes["layers_2"]["input_layernorm"]["scale"] == ("norm",)
