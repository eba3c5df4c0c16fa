"""jpeft on a third-party Flax model: Google DeepMind's ``gemma`` library's linen Transformer (PyPI ``gemma==2.0.0``).

Gemma's layers are its own (``gemma.layers.Einsum``, ``gemma.modules.Embedder``), so the test
registers them the way a user would (a plan and a computation through jpeft's ops each), and
nothing of Gemma's code is edited. Its kernels are not in jpeft's ``(*in, *out)`` order
(``q_einsum`` is ``(heads, embed, head_dim)`` for ``"BTD,NDH->BTNH"``, the gating kernel
``(2, embed, hidden)``), which is what this model checks besides a library it did not write.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from gemma import layers as gemma_layers
from gemma import modules as gemma_modules
from gemma import transformer as gemma_transformer

import jpeft
from jpeft import quant, tree
from jpeft.analysis import grad_step_cost
from jpeft.interop import Contraction, Table
from jpeft.interop import linen as jl
from jpeft.interop.core import count_bits

KERNELS = r"layer_\d+/(attn/\w+_einsum/w|mlp/(gating_einsum|linear))"


def _encode(module, weights, ids):
    rows = weights.embed("input_embedding", ids, weights["input_embedding"].dtype)
    return rows * jnp.sqrt(module.embed_dim).astype(rows.dtype)


jl.register(gemma_layers.Einsum, "__call__",
            plan=lambda m, eqn, x: {m.weight_name: Contraction(eqn, x.ndim)},
            run=lambda m, w, eqn, x: w.einsum(m.weight_name, eqn, x))
jl.register(gemma_modules.Embedder, "encode", plan=lambda m, ids: {"input_embedding": Table()}, run=_encode)
jl.register(gemma_modules.Embedder, "decode", plan=lambda m, x: {"input_embedding": Table(head=True)},
            run=lambda m, w, x: w.attend("input_embedding", x))


def gemma(width: int, hidden: int, vocab: int, head_dim: int, kv_heads: int = 2, layers: int = 2):
    config = gemma_transformer.TransformerConfig(
        num_layers=layers, num_embed=vocab, embed_dim=width, hidden_dim=hidden, num_heads=4, head_dim=head_dim,
        num_kv_heads=kv_heads, final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=(gemma_modules.AttentionType.GLOBAL,) * layers, max_cache_length=None)
    return gemma_transformer.Transformer(config)


def inputs(batch: int, length: int, vocab: int):
    tokens = jax.random.randint(jax.random.key(4), (batch, length), 1, vocab)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return tokens, positions, None, gemma_transformer.make_causal_attn_mask(tokens != 0)


@pytest.fixture(scope="module")
def small():
    net = gemma(64, 128, 64, 16, layers=1)
    args = inputs(2, 6, 64)
    variables = jax.jit(net.init)(jax.random.key(0), *args)
    return net, variables, args, jl.wrap(net, variables, *args)


def perturb(adapter):
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_gemma_kernels_are_factored_along_their_real_axes(small):
    _, _, _, model = small
    layouts = model.layouts()
    assert layouts["layer_0/attn/attn_vec_einsum/w"].inputs == 2           # (heads, head_dim) -> embed
    assert model.params["layer_0"]["attn"]["q_einsum"]["w"].shape == (64, 4, 16)   # (embed, heads, head_dim)
    assert model.params["layer_0"]["attn"]["kv_einsum"]["w"].shape == (64, 2, 2, 16)
    method = jpeft.lora(rank=4, targets=KERNELS, model=model)
    adapter = method.init(jax.random.key(1), model.params)
    assert adapter["layer_0"]["attn"]["kv_einsum"]["w"]["a"].shape == (64, 4)
    assert adapter["layer_0"]["attn"]["kv_einsum"]["w"]["b"].shape == (4, 2, 2, 16)
    assert adapter["layer_0"]["mlp"]["gating_einsum"]["b"].shape == (4, 2, 128)


def test_gemma_lora_fresh_is_exact_trained_matches_merge(small):
    net, variables, args, model = small
    method = jpeft.lora(rank=4, targets=KERNELS, model=model)
    adapter = method.init(jax.random.key(1), model.params)
    fn = jax.jit(model.bind(method))          # one program for the fresh and the trained adapter
    reference, _ = jax.jit(net.apply)(variables, *args)
    np.testing.assert_array_equal(fn(adapter, model.params, *args)[0], reference)
    trained = perturb(adapter)
    merged, _ = jax.jit(lambda ad, p: model.call_merged(method, ad, p, *args))(trained, model.params)
    out = fn(trained, model.params, *args)[0]
    np.testing.assert_allclose(out, merged, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(out - reference).max()) > 1e-2


# ----------------------------------------------------------------------------- cost and memory at a larger size


def _large():
    net = gemma(256, 768, 512, 64)
    args = inputs(4, 32, 512)
    variables = jax.eval_shape(net.init, jax.random.key(0), *args)   # shapes only: nothing allocated
    return net, args, jl.wrap(net, variables, *args)


def test_gemma_nf4_base_is_at_most_4_2_bits_per_parameter():
    _, _, model = _large()
    quantized = jax.eval_shape(lambda p: quant.quantize(p, KERNELS, model=model), model.params)
    kernels = {p: leaf for p, leaf in tree.flatten(quantized).items() if quant.is_quantized(leaf)}
    assert len(kernels) == 10 and all(leaf.double_quant and leaf.format == "nf4" for leaf in kernels.values())
    bits = count_bits(kernels)
    print(f"nf4_bits_per_param={bits:.3f}")
    assert bits <= 4.2


@pytest.mark.slow
def test_gemma_lora_step_costs_at_most_072_of_full_finetuning_and_qlora_runs_in_4bit():
    net, args, model = _large()
    tokens = jax.ShapeDtypeStruct(args[0].shape, jnp.int32)

    def loss_for(method):
        fn = model.bind(method)

        def loss(adapter, frozen, tokens_BxT):
            logits, _ = fn(adapter, frozen, tokens_BxT, *args[1:])
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_BxT[:, 1:]).mean()
        return loss

    def full_loss(params, tokens_BxT):   # full fine-tuning: every weight of the unmodified model trains
        logits, _ = net.apply({"params": params}, tokens_BxT, *args[1:])
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_BxT[:, 1:]).mean()

    key = jax.random.key(0)
    lora = jpeft.lora(rank=8, targets=KERNELS, model=model)
    lora_cost = grad_step_cost(loss_for(lora), jax.eval_shape(lora.init, key, model.params), model.params, tokens)
    full_cost = grad_step_cost(full_loss, model.original_params(model.params), tokens)
    ratio = lora_cost.flops / full_cost.flops
    print(f"gemma lora_over_full_flops={ratio:.3f}")
    assert 0.5 < ratio <= 0.72

    # QLoRA on real arrays: the frozen kernels stay NF4 on the device, and a step runs
    model = jl.wrap(net, net.init(key, *args), *args)
    qparams = jax.device_put(quant.quantize(model.params, KERNELS, model=model))
    kernels = {p: leaf for p, leaf in tree.flatten(qparams).items() if quant.is_quantized(leaf)}
    device_bits = 8 * sum(x.nbytes for leaf in kernels.values() for x in jax.tree.leaves(leaf)) / sum(
        leaf.size for leaf in kernels.values())
    print(f"nf4_device_bits_per_param={device_bits:.3f}")
    assert device_bits <= 4.2
    adapter = perturb(lora.init(key, qparams))
    loss, grads = jax.jit(jax.value_and_grad(loss_for(lora)))(adapter, qparams, args[0])
    assert np.isfinite(float(loss)) and jax.tree.structure(grads) == jax.tree.structure(adapter)
