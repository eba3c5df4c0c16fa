"""Prefix tuning on T5: rows in the encoder's self-attention, the decoder's self-attention and
the decoder's cross-attention (Li & Liang's encoder-decoder setting), checked against
``transformers``' T5 with the same rows in its caches and against running a text before the
source."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.errors import SettingError
from jpeft.io.hf import load_hf
from jpeft.models import t5
from t5_reference import SOURCE, SOURCE_MASK, jpeft_logits, torch_folder  # noqa: F401

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DECODER = np.array([[0, 3, 17, 4, 9], [0, 12, 2, 2, 5]])


def _random_like(shapes, seed, scale):
    """Random arrays of ``shapes`` (norm scales 1): a jitted init of a T5 compiles for seconds."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones(x.shape, x.dtype) if "scale" in jax.tree_util.keystr(path)
        else jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), shapes)


def _torch_heads(rows_NxKH, batch, num_heads, head_dim):
    """jpeft's ``(n, N*H)`` rows as a torch cache entry ``(B, N, n, H)``."""
    rows = np.asarray(rows_NxKH).reshape(-1, num_heads, head_dim).transpose(1, 0, 2)
    return torch.tensor(np.broadcast_to(rows, (batch, *rows.shape)).copy())


@pytest.mark.parametrize("variant", ["v1.1"])
def test_decoder_and_cross_prefixes_match_transformers_with_those_rows_in_its_caches(torch_folder):
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    _, folder, torch_model = torch_folder
    model, params = load_hf(folder)
    n, c = 3, torch_model.config
    method = jpeft.prefix_tuning(num_virtual_tokens=n, init="normal", model=model,
                                 hook_points=("prefix", "cross_prefix"))
    adapter = method.init(jax.random.key(1), params)
    got = jpeft_logits(model, method.apply(params, adapter), decoder=DECODER, decoder_mask=np.ones_like(DECODER))

    b = SOURCE.shape[0]
    heads = lambda rows: _torch_heads(rows, b, c.num_heads, c.d_kv)
    with torch.no_grad():
        hidden = torch_model.encoder(input_ids=torch.tensor(SOURCE),
                                     attention_mask=torch.tensor(SOURCE_MASK)).last_hidden_state
        self_cache, cross_cache = DynamicCache(), DynamicCache()
        for i, block in enumerate(torch_model.decoder.block):
            self_cache.update(heads(adapter["prefix"]["key"][i]), heads(adapter["prefix"]["value"][i]), i)
            attention = block.layer[1].EncDecAttention  # the source's cross keys/values after the prefix rows
            k = attention.k(hidden).view(b, -1, c.num_heads, c.d_kv).transpose(1, 2)
            v = attention.v(hidden).view(b, -1, c.num_heads, c.d_kv).transpose(1, 2)
            cross_cache.update(torch.cat([heads(adapter["cross_prefix"]["key"][i]), k], 2),
                               torch.cat([heads(adapter["cross_prefix"]["value"][i]), v], 2), i)
        cache = EncoderDecoderCache(self_cache, cross_cache)
        for i in range(len(torch_model.decoder.block)):
            cache.is_updated[i] = True  # use the cross cache as it is
        mask = torch.cat([torch.ones(b, n, dtype=torch.long), torch.tensor(SOURCE_MASK)], 1)
        want = torch_model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=torch.tensor(DECODER),
                           past_key_values=cache).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - jpeft_logits(model, params, decoder=DECODER, decoder_mask=np.ones_like(DECODER))).max() > 1e-2


def test_an_encoder_prefix_of_a_text_s_keys_and_values_is_that_text_before_the_source():
    # In a one-layer encoder a text's keys and values do not depend on what follows it, so
    # prefix rows made from them must give the source exactly the outputs it has after the text.
    c = t5.T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, num_decoder_layers=1,
                    relative_attention_num_buckets=8, relative_attention_max_distance=12)
    model = t5.model(c)
    params = _random_like(model.abstract_params(), 0, 0.5)
    text, source = jnp.array([[6, 2, 11]]), jnp.array([[4, 7, 9, 1]])
    layer = params["encoder"]["layers_0"]
    h = t5.blocks.rms_norm(params["shared"]["embedding"][text[0]], layer["self_attn_norm"]["scale"],
                           c.layer_norm_epsilon)
    rows = {"encoder_prefix": {"key": (h @ layer["self_attn"]["k_proj"]["kernel"])[None],
                               "value": (h @ layer["self_attn"]["v_proj"]["kernel"])[None]}}
    method = jpeft.prefix_tuning(num_virtual_tokens=3, init="normal", model=model, hook_points=("encoder_prefix",))
    encode = jax.jit(lambda p, tokens: t5.encode(p, c, tokens)["hidden"])
    got = encode(method.apply(params, rows), source)
    want = encode(params, jnp.concatenate([text, source], 1))[:, 3:]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - encode(params, source)).max() > 1e-2


def test_prefix_tuning_feeds_all_three_t5_points_by_default_and_the_projection_folds():
    c = t5.T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, num_decoder_layers=3)
    model = t5.model(c)
    params = _random_like(model.abstract_params(), 0, 0.3)
    method = jpeft.prefix_tuning(num_virtual_tokens=2, init="normal", projection=True, hidden_size=8, model=model)
    adapter = _random_like(jax.eval_shape(method.init, jax.random.key(1), params), 1, 0.5)
    folded = jax.jit(jpeft.methods.prefix.fold)(adapter)
    assert {k: v["key"].shape for k, v in folded.items()} == {
        "encoder_prefix": (2, 2, 16), "prefix": (3, 2, 16), "cross_prefix": (3, 2, 16)}
    assert set(model.hooks) - set(folded) == {"prompt"}
    source, decoder = jnp.array([[4, 7, 9, 1]]), jnp.array([[0, 5, 6]])
    run = jax.jit(lambda p: model.forward(p, source, decoder_tokens_BxT=decoder)[0])
    np.testing.assert_allclose(run(method.apply(params, adapter)), run(method.apply(params, folded)), atol=1e-5)
    grads = jax.jit(jax.grad(lambda a: run(method.apply(params, a)).sum()))(adapter)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_bad_prefix_settings_on_t5_name_the_points():
    model = t5.model(t5.T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
    params = model.abstract_params()
    with pytest.raises(SettingError, match="cross_prefix"):
        jpeft.prefix_tuning(2, model=model, hook_points=("cross",))
    with pytest.raises(SettingError, match=r"hook_points=\('prefix',\)"):
        jpeft.prefix_tuning(2, init_ids=[1, 2], model=model)
    method = jpeft.prefix_tuning(2, init="normal", model=model, hook_points=("prefix",))
    other = jax.eval_shape(jpeft.prefix_tuning(2, init="normal", model=model).init, jax.random.key(1), params)
    with pytest.raises(ValueError, match="other hook points"):
        method.apply(params, other)


def test_qlora_on_t5_runs_on_the_4_bit_base_as_lora_on_its_dequantized_weights():
    from jpeft import quant
    from jpeft.quant.quantize import layer_kernels

    c = t5.T5Config(vocab_size=20, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4, num_decoder_layers=2,
                    scan_layers=True)
    model = t5.model(c)
    params = _random_like(model.abstract_params(), 0, 0.3)
    qparams = jax.jit(lambda p: quant.quantize(p, layer_kernels(model.layouts()), "nf4", block_size=16,
                                               model=model))(params)
    quantized = [p for p, leaf in jpeft.tree.flatten(qparams).items() if quant.is_quantized(leaf)]
    # every stacked layer kernel: encoder self-attention 4 + MLP 2, decoder self 4 + cross 4 + MLP 2
    assert len(quantized) == 16 and any("cross_attn" in p for p in quantized)
    method = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v)_proj/kernel", model=model)
    adapter = _random_like(jax.eval_shape(method.init, jax.random.key(1), qparams), 2, 0.3)
    source, decoder = jnp.array([[4, 7, 9, 1], [3, 3, 8, 1]]), jnp.array([[0, 5, 6], [0, 2, 2]])
    loss = jax.jit(lambda a, p: model.forward(method.apply(p, a), source, decoder_tokens_BxT=decoder)[0].std())
    got, grads = jax.jit(jax.value_and_grad(loss))(adapter, qparams)
    want = loss(adapter, jax.jit(quant.dequantize)(qparams))  # the reference: plain LoRA over the dequantized weights
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
