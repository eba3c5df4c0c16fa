"""DoRA (``jpeft.lora(use_dora=True)``): float64 numpy, Hugging Face PEFT (torch) and XLA's cost analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import ops, quant, tree
from jpeft.analysis import grad_step_cost
from jpeft.errors import CheckpointError
from jpeft.layout import Layout
from jpeft.methods.dora import DoraWeight
from jpeft.models import llama
import reference

X = np.random.default_rng(0).standard_normal((2, 3, 6)).astype(np.float32)


def randomize(adapter, seed=1, std=0.3):
    """Random values for every leaf (a fresh adapter has B == 0 and m == ||W||, which hides bugs)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + std * rng.standard_normal(x.shape), x.dtype), adapter)


def dora_reference(x, w, a, b, m, scale, inputs=1):
    """float64: ``(m / n) * (x W + s x A B)``, ``n`` the norm of ``W + s A B`` over the input axes."""
    x, w, a, b, m = (np.asarray(t, np.float64) for t in (x, w, a, b, m))
    d_in = w.shape[:inputs]
    w2 = w.reshape(int(np.prod(d_in)), -1)
    full = w2 + scale * a.reshape(w2.shape[0], -1) @ b.reshape(b.shape[0], -1)
    n = np.linalg.norm(full, axis=0)
    y = x.reshape(*x.shape[:x.ndim - inputs], -1) @ full * (m.reshape(-1) / n)
    return y.reshape(*x.shape[:x.ndim - inputs], *w.shape[inputs:])


class Kernels:
    """A stand-in model that says each kernel's input axes (what a model's logical axes give)."""

    tied_tables = {}

    def __init__(self, layouts):
        self._layouts = layouts

    def layouts(self):
        return self._layouts


def test_fresh_adapter_is_exactly_the_identity_and_merge_is_exact():
    params = {"q": {"kernel": jnp.asarray(np.random.default_rng(1).standard_normal((6, 5)), jnp.float32)}}
    method = jpeft.lora(rank=2, alpha=4, targets=r".*/kernel", use_dora=True)
    adapter = method.init(jax.random.key(0), params)
    np.testing.assert_array_equal(ops.linear(X, method.apply(params, adapter)["q"]["kernel"]), X @ params["q"]["kernel"])
    np.testing.assert_array_equal(method.merge(params, adapter)["q"]["kernel"], params["q"]["kernel"])
    np.testing.assert_allclose(adapter["q"]["kernel"]["m"], np.linalg.norm(params["q"]["kernel"], axis=0), rtol=1e-6)


@pytest.mark.parametrize("shape, inputs, subscripts", [
    ((6, 5), 1, None),
    ((6, 2, 3), 1, "btd,dnh->btnh"),      # (embed, heads, head_dim): one input axis, two output axes
    ((2, 3, 5), 2, "btnh,nhd->btd"),      # (heads, head_dim, embed): two input axes
], ids=["linear", "einsum-out2", "einsum-in2"])
def test_apply_and_merge_match_float64(shape, inputs, subscripts):
    w = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
    model = Kernels({"w": Layout("kernel", 0, inputs)})
    method = jpeft.lora(rank=2, alpha=3, targets=r"w", use_dora=True, model=model)
    adapter = randomize(method.init(jax.random.key(0), {"w": w}))["w"]
    x = X if inputs == 1 else X.reshape(2, 3, 2, 3)
    def run(adapter, w):
        wrapped = method.apply({"w": w}, {"w": adapter})["w"]
        return ops.linear(x, wrapped) if subscripts is None else ops.einsum(subscripts, x, wrapped)
    y = jax.jit(run)(adapter, w)
    expected = dora_reference(x, w, adapter["a"], adapter["b"], adapter["m"], 1.5, inputs)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    merged = method.merge({"w": w}, {"w": adapter})["w"]
    y_merged = x @ merged if subscripts is None else jnp.einsum(subscripts, x, merged)
    np.testing.assert_allclose(y_merged, y, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, dora_reference(x, w, adapter["a"], adapter["b"] * 0, adapter["m"], 1.5, inputs))


def test_stacked_layers_and_dropout_follow_peft():
    w = jnp.asarray(np.random.default_rng(3).standard_normal((3, 6, 5)), jnp.float32)
    method = jpeft.lora(rank=2, targets=r".*", use_dora=True, dropout=0.5)
    adapter = randomize(method.init(jax.random.key(0), {"k": w}))
    assert adapter["k"]["m"].shape == (3, 5)
    x = np.broadcast_to(X[:1, :1], (3, 4, 6))  # one row batch per layer
    y = jax.jit(lambda a: ops.linear(x, method.apply({"k": w}, a)["k"]))(adapter)
    for i in range(3):
        np.testing.assert_allclose(y[i], dora_reference(x[i], w[i], adapter["k"]["a"][i], adapter["k"]["b"][i],
                                                        adapter["k"]["m"][i], 8.0), rtol=1e-5, atol=1e-5)
    # With dropout PEFT runs the base again on the dropped-out input: x W + (g - 1) d(x) W + g s d(x) A B.
    lw = jpeft.LoraWeight(base=w[0], a=adapter["k"]["a"][0], b=adapter["k"]["b"][0], scale=8.0,
                          dropout_key=jax.random.key(5), dropout_rate=0.5)
    y, keep = jax.jit(lambda d: (ops.linear(X, d), jax.random.bernoulli(d.lora.dropout_key, 0.5, X.shape)))(
        DoraWeight(lw, adapter["k"]["m"][0]))  # the mask LoRA's dropout draws from its key
    x_d = np.where(keep, X / 0.5, 0.0)
    w64, a64, b64 = (np.asarray(t, np.float64) for t in (w[0], lw.a, lw.b))
    g = np.asarray(adapter["k"]["m"][0], np.float64) / np.linalg.norm(w64 + 8.0 * a64 @ b64, axis=0)
    expected = X @ w64 + (g - 1) * (x_d @ w64) + g * 8.0 * (x_d @ a64 @ b64)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def test_gradients_only_for_the_adapter_and_no_full_size_weight_gradient():
    """XLA's compiled FLOPs: DoRA's step costs LoRA's plus far less than one full-size weight gradient."""
    params = {"layer": {"kernel": jax.ShapeDtypeStruct((3, 256, 512), jnp.float32)}}  # 3 stacked layers
    x = jax.ShapeDtypeStruct((3, 512, 256), jnp.float32)                             # 512 tokens per layer

    def cost(method):
        def loss(adapter, frozen, x):
            return jnp.mean(ops.linear(x, method.apply(frozen, adapter)["layer"]["kernel"]) ** 2)
        adapter = jax.eval_shape(method.init, jax.random.key(0), params)
        return grad_step_cost(loss, adapter, params, x).flops, loss, adapter

    lora_flops, _, _ = cost(jpeft.lora(rank=8, targets=r".*"))
    dora_flops, loss, adapter = cost(jpeft.lora(rank=8, targets=r".*", use_dora=True))
    full_flops, _, _ = cost(jpeft.full())
    weight_grad = 2 * 3 * 512 * 256 * 512  # dW = x^T dy for every layer
    print(f"dora_over_lora_flops={dora_flops / lora_flops:.3f}")
    assert full_flops > lora_flops + 0.75 * weight_grad  # the measurement sees a weight gradient
    assert lora_flops < dora_flops < lora_flops + 0.1 * weight_grad
    grads = jax.eval_shape(jax.grad(loss), adapter, params, x)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapter)


def test_a_4bit_base_is_dequantized_inside():
    w = jnp.asarray(np.random.default_rng(4).standard_normal((64, 8)), jnp.float32)
    q = jax.jit(lambda w: quant.quantize({"w": w}, r"w", "nf4"))(w)
    method = jpeft.lora(rank=2, targets=r"w", use_dora=True)
    fresh = jax.jit(method.init)(jax.random.key(0), q)
    dense = np.asarray(jax.jit(quant.dequantize)(q)["w"], np.float64)
    np.testing.assert_allclose(fresh["w"]["m"], np.linalg.norm(dense, axis=0), rtol=1e-5)  # the dequantized weight's
    adapter = randomize(fresh)
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    y = jax.jit(lambda a, q: ops.linear(x, method.apply(q, a)["w"]))(adapter, q)
    np.testing.assert_allclose(y, dora_reference(x, dense, adapter["w"]["a"], adapter["w"]["b"], adapter["w"]["m"],
                                                 8.0), rtol=1e-4, atol=1e-4)
    assert method.merge_blocker(q) is not None


def test_bad_settings_and_adapters_are_clear_errors():
    with pytest.raises(ValueError, match="use_dora must be true or false"):
        jpeft.lora(targets=".*", use_dora="yes")
    with pytest.raises(ValueError, match="embedding table; DoRA adapts kernels only"):
        model = llama.model(CONFIG)
        jpeft.dora(targets=r"embed_tokens/embedding", model=model).init(jax.random.key(0), model.abstract_params())
    params = {"w": jnp.ones((4, 3))}
    plain = jpeft.lora(rank=2, targets="w").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="lacks 'm'"):
        jpeft.dora(rank=2, targets="w").apply(params, plain)
    with pytest.raises(ValueError, match="build it with use_dora=False"):
        jpeft.lora(rank=2, targets="w").apply(params, jpeft.dora(rank=2, targets="w").init(jax.random.key(0), params))
    assert jpeft.registry.check_settings("dora", {"rank": 4}) == {"rank": 4}


def test_the_magnitude_takes_the_weights_leading_and_output_axes():
    from jpeft.methods.lora import logical_axes

    adapter = {"q": {"kernel": {"a": jnp.zeros((3, 8, 2)), "b": jnp.zeros((3, 2, 4, 5)), "m": jnp.zeros((3, 4, 5))}}}
    axes = logical_axes(adapter, {"q": {"kernel": ("layers", "embed", "heads", "head_dim")}})["q"]["kernel"]
    assert axes == {"a": ("layers", "embed", "lora_rank"), "b": ("layers", "lora_rank", "heads", "head_dim"),
                    "m": ("layers", "heads", "head_dim")}


# ----------------------------------------------------------------------------- Hugging Face PEFT, both ways
