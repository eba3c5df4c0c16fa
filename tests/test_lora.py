"""LoRA: identity at init, merge, gradients, errors, and Hugging Face PEFT as the reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import ops, tree

V, D, H = 11, 6, 5


def tiny_forward(params, ids):
    """A model that uses its weights only through jpeft.ops, like jpeft's own models."""
    h = ops.embed(ids, params["embed"]["embedding"])
    h = ops.linear(h, params["q_proj"]["kernel"], params["q_proj"]["bias"])
    return ops.linear(jnp.tanh(h), params["up_proj"]["kernel"])


def tiny_params(key=0):
    k = jax.random.split(jax.random.key(key), 4)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (V, D))},
        "q_proj": {"kernel": jax.random.normal(k[1], (D, D)), "bias": jax.random.normal(k[2], (D,))},
        "up_proj": {"kernel": jax.random.normal(k[3], (D, H))},
    }


def randomize(adapter, seed=1):
    """Gives every factor random values (a fresh adapter has B == 0, which hides bugs)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


IDS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 10]])
ALL = r".*/(kernel|embedding)"


def test_fresh_adapter_is_exactly_the_identity():
    params = tiny_params()
    method = jpeft.lora(rank=3, alpha=6, targets=ALL)
    adapter = method.init(jax.random.key(0), params)
    np.testing.assert_array_equal(tiny_forward(method.apply(params, adapter), IDS),
                                  tiny_forward(params, IDS))
    merged = method.merge(params, adapter)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_matches_unmerged_outputs(use_rslora):
    params = tiny_params()
    method = jpeft.lora(rank=3, alpha=6, targets=ALL, use_rslora=use_rslora)
    adapter = randomize(method.init(jax.random.key(0), params))
    unmerged = tiny_forward(method.apply(params, adapter), IDS)
    merged_params = method.merge(params, adapter)
    assert not any(ops.is_wrapper(x) for x in tree.flatten(merged_params).values())
    np.testing.assert_allclose(tiny_forward(merged_params, IDS), unmerged, rtol=1e-5, atol=1e-5)
    assert not np.allclose(unmerged, tiny_forward(params, IDS))


def test_gradients_exist_only_for_the_adapter_and_are_nonzero():
    params = tiny_params()
    method = jpeft.lora(rank=2, alpha=2, targets=r".*/kernel")
    adapter = method.init(jax.random.key(0), params)

    def loss(adapter):
        return jnp.mean(tiny_forward(method.apply(params, adapter), IDS) ** 2)

    grads = jax.grad(loss)(adapter)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapter)
    # B starts at zero, so dL/dA is zero at init but dL/dB is not.
    assert all(float(jnp.abs(g["b"]).max()) > 0 for g in
               [grads["q_proj"]["kernel"], grads["up_proj"]["kernel"]])


def test_init_distributions_follow_peft():
    params = {"w": {"kernel": jnp.zeros((400, 300))}}
    kaiming = jpeft.lora(rank=16, targets=r".*").init(jax.random.key(0), params)["w"]["kernel"]
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) on a (r, in) weight
    assert float(jnp.abs(kaiming["a"]).max()) <= bound
    np.testing.assert_allclose(float(jnp.std(kaiming["a"])), bound / math.sqrt(3), rtol=0.02)
    gauss = jpeft.lora(rank=16, init="gaussian", targets=r".*").init(jax.random.key(0), params)
    np.testing.assert_allclose(float(jnp.std(gauss["w"]["kernel"]["a"])), 1 / 16, rtol=0.02)
    assert float(jnp.abs(gauss["w"]["kernel"]["b"]).max()) == 0.0


def test_init_works_on_shape_dtype_structs():
    params = tiny_params()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    method = jpeft.lora(rank=2, targets=r".*/kernel")
    adapter = method.init(jax.random.key(0), abstract)
    shapes = jax.eval_shape(method.init, jax.random.key(0), abstract)
    assert jax.tree_util.tree_map(lambda x: x.shape, adapter) == \
        jax.tree_util.tree_map(lambda x: x.shape, shapes)


def test_per_rule_ranks_and_scales():
    params = tiny_params()
    method = jpeft.lora(rank=2, alpha=4, targets=[jpeft.Rule(r"q_proj/kernel", rank=4, alpha=2),
                                                 r"up_proj/kernel"])
    adapter = method.init(jax.random.key(0), params)
    assert adapter["q_proj"]["kernel"]["a"].shape == (D, 4)
    assert adapter["up_proj"]["kernel"]["a"].shape == (D, 2)
    applied = method.apply(params, adapter)
    assert applied["q_proj"]["kernel"].scale == 0.5
    assert applied["up_proj"]["kernel"].scale == 2.0


def test_stacked_layers_are_batch_axes():
    w = jax.random.normal(jax.random.key(0), (3, D, H))
    method = jpeft.lora(rank=2, targets=r".*")
    adapter = randomize(method.init(jax.random.key(0), {"k": w}))
    assert adapter["k"]["a"].shape == (3, D, 2)
    merged = method.merge({"k": w}, adapter)["k"]
    for layer in range(3):
        expect = w[layer] + 8.0 * adapter["k"]["a"][layer] @ adapter["k"]["b"][layer]
        np.testing.assert_allclose(merged[layer], expect, rtol=1e-5, atol=1e-5)
    x = jnp.ones((3, 4, D))
    np.testing.assert_allclose(ops.linear(x, method.apply({"k": w}, adapter)["k"]),
                               x @ merged, rtol=1e-4, atol=1e-4)


def test_dropout_is_active_only_with_an_rng():
    params = tiny_params()
    method = jpeft.lora(rank=2, targets=r".*/kernel", dropout=0.5)
    adapter = randomize(method.init(jax.random.key(0), params))
    plain = tiny_forward(method.apply(params, adapter), IDS)
    dropped = tiny_forward(method.apply(params, adapter, rng=jax.random.key(3)), IDS)
    assert not np.allclose(plain, dropped)
    again = tiny_forward(method.apply(params, adapter, rng=jax.random.key(3)), IDS)
    np.testing.assert_array_equal(dropped, again)


def test_lora_is_clean_under_strict_dtype_promotion_in_bfloat16():
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tiny_params())
    method = jpeft.lora(rank=2, targets=r".*/kernel")
    adapter = randomize(method.init(jax.random.key(0), params))
    with jax.numpy_dtype_promotion("strict"):
        h = ops.linear(jnp.ones((2, D), jnp.bfloat16), method.apply(params, adapter)["q_proj"]["kernel"])
    assert h.dtype == jnp.bfloat16
    assert method.merge(params, adapter)["q_proj"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=2.5), "rank must be a positive integer"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(init="orthogonal"), "init must be one of"),
    (dict(targets=jpeft.Rule(".*", ranks=2)), "unknown LoRA setting"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jpeft.lora(**{"targets": ".*", **kwargs})


def test_bad_targets_are_clear_errors():
    params = tiny_params()
    with pytest.raises(jpeft.RuleError, match="o_proj"):
        jpeft.lora(targets=r".*/o_proj/kernel").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="at least 2 dims"):
        jpeft.lora(rank=1, targets=r".*/bias").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="larger than the weight"):
        jpeft.lora(rank=6, targets=r"up_proj/kernel").init(jax.random.key(0), params)


def test_adapter_for_another_model_is_rejected():
    method = jpeft.lora(rank=2, targets=r".*/kernel")
    adapter = method.init(jax.random.key(0), tiny_params())
    bigger = tiny_params()
    bigger["up_proj"]["kernel"] = jnp.ones((D, H + 1))
    with pytest.raises(ValueError, match="made for another model"):
        method.apply(bigger, adapter)
    with pytest.raises(ValueError, match="targeted weights with no adapter"):
        method.apply(tiny_params(), {"q_proj": adapter["q_proj"]})


# --- Hugging Face PEFT as the reference -------------------------------------------------------


def test_lora_linear_gradients_equal_the_plain_formula():
    """The low-rank term's own backward pass (no transposed activations) gives autodiff's gradients."""
    from jpeft.methods.lora_weight import LoraWeight

    keys = jax.random.split(jax.random.key(0), 5)
    x_BxTxI = jax.random.normal(keys[0], (2, 5, 6))
    w_IxO, a_IxR, b_RxO = (jax.random.normal(k, s) for k, s in zip(keys[1:4], ((6, 7), (6, 3), (3, 7))))
    dy_BxTxO = jax.random.normal(keys[4], (2, 5, 7))

    def ours(x, a, b):
        return jnp.sum(LoraWeight(w_IxO, a, b, scale=2.5).linear(x) * dy_BxTxO)

    def plain(x, a, b):
        return jnp.sum((x @ w_IxO + 2.5 * (x @ a) @ b) * dy_BxTxO)

    got = jax.grad(ours, argnums=(0, 1, 2))(x_BxTxI, a_IxR, b_RxO)
    want = jax.grad(plain, argnums=(0, 1, 2))(x_BxTxI, a_IxR, b_RxO)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
