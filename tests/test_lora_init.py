"""PiSSA and OLoRA inits of LoRA: float64 numpy SVD / QR, the rebased base, and Hugging Face PEFT's conversion."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jpeft
from jpeft import quant, tree
from jpeft.errors import CheckpointError
from jpeft.layout import Layout
from jpeft.methods import lora_init
import reference

RNG = np.random.default_rng(0)


def aligned(got, want, axis):
    """``got`` with each rank component's sign flipped to match ``want`` (SVD / QR signs are arbitrary)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    signs = np.sign(np.sum(got * want, axis=axis, keepdims=True))
    return got * signs, signs


class Kernels:
    """A stand-in model that says each kernel's input axes."""

    tied_tables = {}

    def __init__(self, layouts):
        self._layouts = layouts

    def layouts(self):
        return self._layouts


@pytest.mark.parametrize("shape, inputs", [((12, 8), 1), ((3, 12, 8), 1), ((3, 4, 8), 2)],
                         ids=["matrix", "stacked", "two-input-axes"])
def test_pissa_factors_are_the_top_singular_triplets_in_float64(shape, inputs):
    w = jnp.asarray(RNG.standard_normal(shape), jnp.float32)
    lead = len(shape) - inputs - 1 if inputs == 1 else 0
    model = Kernels({"w": Layout("kernel", lead, inputs)})
    method = jpeft.lora(rank=3, alpha=6, targets="w", init="pissa", model=model)
    adapter = method.init(jax.random.key(0), {"w": w})
    a, b = (np.asarray(adapter["w"][k], np.float64).reshape(-1, *adapter["w"][k].shape[lead:]) for k in "ab")
    for i, w_i in enumerate(np.asarray(w, np.float64).reshape(-1, *shape[lead:])):
        mat = w_i.reshape(int(np.prod(shape[lead:lead + inputs])), -1)
        u, s, vt = np.linalg.svd(mat, full_matrices=False)
        a_i, b_i = a[i].reshape(mat.shape[0], 3), b[i].reshape(3, mat.shape[1])
        a_i, signs = aligned(a_i, u[:, :3] * np.sqrt(s[:3] / 2.0), axis=0)  # scale s = 6 / 3
        np.testing.assert_allclose(a_i, u[:, :3] * np.sqrt(s[:3] / 2.0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b_i * signs.T, np.sqrt(s[:3] / 2.0)[:, None] * vt[:3], rtol=1e-4, atol=1e-5)
    rebased = method.training.rebase.base({"w": w}, adapter)
    residual = np.asarray(rebased["w"], np.float64).reshape(-1, *shape[lead:])
    for i, w_i in enumerate(np.asarray(w, np.float64).reshape(-1, *shape[lead:])):
        mat = w_i.reshape(int(np.prod(shape[lead:lead + inputs])), -1)
        u, s, vt = np.linalg.svd(mat, full_matrices=False)
        np.testing.assert_allclose(residual[i].reshape(mat.shape), (u[:, 3:] * s[3:]) @ vt[3:], atol=1e-5)


def test_olora_factors_are_the_qr_of_the_torch_weight_in_float64():
    w = jnp.asarray(RNG.standard_normal((12, 8)), jnp.float32)
    adapter = jpeft.lora(rank=3, alpha=6, targets="w", init="olora").init(jax.random.key(0), {"w": w})
    q, r = np.linalg.qr(np.asarray(w, np.float64).T)   # torch's (out, in) weight = Q R
    b, signs = aligned(adapter["w"]["b"], q[:, :3].T, axis=1)
    np.testing.assert_allclose(b, q[:, :3].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(adapter["w"]["a"]) * signs.T, r[:3].T, rtol=1e-4, atol=1e-5)


def test_pissa_niter_approximates_the_svd():
    u, _ = np.linalg.qr(RNG.standard_normal((40, 40)))
    v, _ = np.linalg.qr(RNG.standard_normal((30, 30)))
    s = 2.0 ** -np.arange(30)
    w = jnp.asarray((u[:, :30] * s) @ v.T, jnp.float32)
    adapter = jpeft.lora(rank=4, alpha=4, targets="w", init="pissa_niter_4").init(jax.random.key(0), {"w": w})
    top = (u[:, :4] * s[:4]) @ v[:, :4].T
    np.testing.assert_allclose(np.asarray(adapter["w"]["a"] @ adapter["w"]["b"]), top, atol=1e-4)


def test_fresh_adapter_over_the_rebased_base_is_the_model():
    from jpeft.models import llama
    from reference import numpy_params

    model = llama.model(llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32, scan_layers=True))
    params = numpy_params(model, stddev=0.1)
    tokens = jnp.asarray(RNG.integers(0, 64, (2, 8)))
    logits = jax.jit(lambda p: model.forward(p, tokens)[0])
    expected = logits(params)
    method = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v)_proj/kernel", init="pissa", model=model)
    adapter = method.init(jax.random.key(1), params)
    frozen = method.training.rebase.base(params, adapter)  # OLoRA's rebase: the PEFT test below
    assert not np.allclose(frozen["layers"]["self_attn"]["q_proj"]["kernel"],
                           params["layers"]["self_attn"]["q_proj"]["kernel"], atol=1e-3)

    np.testing.assert_allclose(logits(method.apply(frozen, adapter)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits(method.merge(frozen, adapter)), expected, rtol=1e-5, atol=1e-5)


def test_only_the_adapter_gets_gradients_and_both_factors_move():
    w = jnp.asarray(RNG.standard_normal((3, 8, 6)), jnp.float32)
    method = jpeft.lora(rank=2, targets="w", init="pissa")
    adapter = method.init(jax.random.key(0), {"w": w})
    frozen = method.training.rebase.base({"w": w}, adapter)
    x = jnp.asarray(RNG.standard_normal((3, 4, 8)), jnp.float32)
    grads = jax.grad(lambda a: jnp.sum(jpeft.ops.linear(x, method.apply(frozen, a)["w"]) ** 3))(adapter)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapter)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))  # B != 0: A moves at once


def test_bad_inits_and_bases_are_clear_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        jpeft.lora(targets=".*", init="pissa_niter_0")
    w = jnp.asarray(RNG.standard_normal((64, 8)), jnp.float32)
    plain = jpeft.lora(rank=2, targets="w")
    already_adapted = plain.apply({"w": w}, plain.init(jax.random.key(0), {"w": w}))  # a LoraWeight leaf
    with pytest.raises(ValueError, match="give it a plain or quantized weight"):
        jpeft.lora(rank=2, targets="w", init="pissa").init(jax.random.key(0), already_adapted)
    with pytest.raises(ValueError, match="embedding table; init='pissa' adapts kernels only"):
        jpeft.lora(rank=2, targets="w", init="pissa", model=Kernels({"w": Layout("table")})).init(
            jax.random.key(0), {"w": w})
    assert jpeft.lora(targets=".*").training.rebase is None
    assert jpeft.lora(targets=".*", init="olora").training.rebase is not None
    abstract = jax.eval_shape(jpeft.lora(rank=2, targets="w", init="pissa").init, jax.random.key(0), {"w": w})
    assert abstract["w"]["a"].shape == (64, 2)


def test_pissa_on_a_4bit_base_quantizes_the_residual_again():
    """QLoRA + PiSSA: factors from the dequantized weight, the residual re-quantized in the same format."""
    low_rank = RNG.standard_normal((128, 4)) @ RNG.standard_normal((4, 32)) * 3.0
    w = jnp.asarray(low_rank + 0.1 * RNG.standard_normal((128, 32)), jnp.float32)
    q = quant.quantize({"w": w}, "w", "nf4")["w"]
    method = jpeft.lora(rank=4, alpha=8, targets="w", init="pissa")
    adapter = method.init(jax.random.key(0), {"w": q})
    from_float = method.init(jax.random.key(0), {"w": q.materialize()})
    jax.tree.map(np.testing.assert_array_equal, adapter, from_float)  # the SVD of the 4-bit weight's values
    residual = method.training.rebase.base({"w": q}, adapter)["w"]
    assert quant.is_quantized(residual)
    assert (residual.format, residual.block_size, residual.axis, residual.double_quant) == \
        (q.format, q.block_size, q.axis, q.double_quant)
    deq64 = np.asarray(q.materialize(), np.float64)
    a64, b64 = (np.asarray(adapter["w"][k], np.float64) for k in ("a", "b"))
    residual64 = deq64 - 2.0 * a64 @ b64  # alpha / rank = 2
    rebuilt = np.asarray(residual.materialize(), np.float64) + 2.0 * a64 @ b64  # fresh adapter over the new base
    # The residual lost the top singular values, so it quantizes with less error than W did: the
    # fresh model is closer to the 4-bit model than the 4-bit model is to W.
    residual_error = np.linalg.norm(rebuilt - deq64)
    assert residual_error < 0.5 * np.linalg.norm(deq64 - np.asarray(w, np.float64))
    assert np.linalg.norm(np.asarray(residual.materialize(), np.float64) - residual64) == pytest.approx(
        residual_error, rel=1e-5)
    x = jnp.asarray(RNG.standard_normal((5, 128)), jnp.float32)
    out = jpeft.ops.linear(x, method.apply({"w": residual}, adapter)["w"])
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(x, np.float64) @ rebuilt, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- Hugging Face PEFT
