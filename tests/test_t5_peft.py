"""PEFT methods on T5: LoRA on every attention (cross-attention too) and on all linear layers, merged
and in Hugging Face PEFT's format both ways (checked against peft + transformers), prompt tuning
on the encoder input, IA3 in the T0 setting."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import tree
from jpeft.io.hf import load_hf
from jpeft.io.peft import load_peft, save_peft
from t5_reference import DECODER_MASK, jpeft_logits, torch_folder, torch_logits  # noqa: F401

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REAL = DECODER_MASK.astype(bool)


def randomized(adapter, seed=1, scale=0.2):
    """Every adapter leaf random (B starts at zero, which would hide mistakes)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("variant", ["v1.1"])
def test_lora_on_q_and_v_of_every_attention_merges_to_plain_weights(torch_folder):
    _, folder, _ = torch_folder
    model, params = load_hf(folder)
    method = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v)_proj/kernel", model=model)
    adapter = randomized(method.init(jax.random.key(0), params))
    kernels = {p.rsplit("/", 2)[0] for p in tree.flatten(adapter)}
    assert len(kernels) == 2 * 2 + 2 * 3 * 2  # q, v of 2 encoder layers; self and cross q, v of 3 decoder layers
    kernels = {re.sub(r"layers_\d+", "layers_*", k) for k in kernels}
    assert kernels == {"encoder/layers_*/self_attn/q_proj", "encoder/layers_*/self_attn/v_proj",
                       "decoder/layers_*/self_attn/q_proj", "decoder/layers_*/self_attn/v_proj",
                       "decoder/layers_*/cross_attn/q_proj", "decoder/layers_*/cross_attn/v_proj"}
    applied = jpeft_logits(model, method.apply(params, adapter))
    merged = method.merge(params, adapter)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    np.testing.assert_allclose(jpeft_logits(model, merged)[REAL], applied[REAL], atol=1e-4)
    assert np.abs(applied - jpeft_logits(model, params)).max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("variant", ["v1.1", pytest.param("t5", marks=pytest.mark.slow)])
def test_jpeft_lora_on_all_linear_layers_loads_into_peft(torch_folder, tmp_path):
    _, folder, _ = torch_folder
    model, params = load_hf(folder)
    method = jpeft.lora(rank=4, alpha=8, targets=r".*/kernel", model=model)
    adapter = randomized(method.init(jax.random.key(0), params))
    save_peft(tmp_path, model, method, params, adapter)
    base = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    torch_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    want = torch_logits(torch_model)
    np.testing.assert_allclose(jpeft_logits(model, method.apply(params, adapter))[REAL], want[REAL], atol=1e-4)


@pytest.mark.parametrize("variant", ["v1.1"])
def test_peft_lora_on_q_and_v_loads_into_jpeft(torch_folder, tmp_path):
    _, folder, _ = torch_folder
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    base = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    torch_model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    torch_model.save_pretrained(tmp_path)
    want = torch_logits(torch_model)
    model, params = load_hf(folder, scan_layers=True)
    method, adapter = load_peft(tmp_path, model, params)
    assert "decoder/layers/cross_attn/v_proj/kernel/a" in tree.flatten(adapter)
    np.testing.assert_allclose(jpeft_logits(model, method.apply(params, adapter))[REAL], want[REAL], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1.1"])
def test_ia3_in_the_t0_setting_scales_k_v_and_the_ffn_of_every_block_and_merges(torch_folder):
    _, folder, _ = torch_folder
    model, params = load_hf(folder)
    method = jpeft.ia3(model=model)  # defaults: k_proj, v_proj, down_proj (its input: PEFT's feedforward)
    adapter = randomized(method.init(jax.random.key(0), params), scale=1.0)
    kinds = {p.split("/")[0] + "/" + "/".join(p.split("/")[2:4]) for p in tree.flatten(adapter)}
    assert kinds == {"encoder/self_attn/k_proj", "encoder/self_attn/v_proj", "encoder/mlp/down_proj",
                     "decoder/self_attn/k_proj", "decoder/self_attn/v_proj", "decoder/mlp/down_proj",
                     "decoder/cross_attn/k_proj", "decoder/cross_attn/v_proj"}
    applied = jpeft_logits(model, method.apply(params, adapter))
    np.testing.assert_allclose(jpeft_logits(model, method.merge(params, adapter))[REAL], applied[REAL], atol=1e-4)


@pytest.mark.slow
def test_prompt_tuning_puts_virtual_tokens_before_the_encoder_input():
    from jpeft.models import t5

    model = t5.model(t5.T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                 num_decoder_layers=1))
    params = model.init(jax.random.key(0), stddev=0.3)
    method = jpeft.prompt_tuning(num_virtual_tokens=3, init="normal", init_std=0.5, model=model)
    adapter = method.init(jax.random.key(1), params)
    source, decoder = jnp.array([[4, 7, 9, 1]]), jnp.array([[0, 5, 6]])
    got, _ = model.forward(method.apply(params, adapter), source, decoder_tokens_BxT=decoder)
    embeds = jnp.concatenate([adapter["prompt"]["embeddings"][None], params["shared"]["embedding"][source]], 1)
    want, _ = model.forward(params, input_embeds_BxTxD=embeds, decoder_tokens_BxT=decoder)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # generation prefills the prompt with the source (the cache holds the encoder's n + S slots)
    out = np.asarray(jpeft.models.generate(model, method.apply(params, adapter), source, max_new_tokens=3))
    assert out.shape == (1, 3)


@pytest.mark.slow
def test_prefix_tuning_on_decoder_self_attention_decodes_the_same_with_the_cache():
    from jpeft.models import generation, t5

    model = t5.model(t5.T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                 num_decoder_layers=2, scan_layers=True))
    params = model.init(jax.random.key(0), stddev=0.3)
    method = jpeft.prefix_tuning(num_virtual_tokens=2, init="normal", model=model)
    adapter = randomized(method.init(jax.random.key(1), params), scale=1.0)
    tuned = method.apply(params, adapter)
    source = jnp.array([[4, 7, 9, 1], [3, 3, 8, 1]])
    out = np.asarray(generation.generate(model, tuned, source, max_new_tokens=4))
    decoder = np.zeros((2, 1), np.int32)  # the reference: the whole decoder re-run without a cache
    for _ in range(4):
        logits, _ = model.forward(tuned, source, decoder_tokens_BxT=jnp.asarray(decoder))
        decoder = np.concatenate([decoder, np.asarray(logits[:, -1].argmax(-1))[:, None]], axis=1)
    np.testing.assert_array_equal(out, decoder[:, 1:])
    base_logits, _ = model.forward(params, source, decoder_tokens_BxT=jnp.asarray(decoder))
    tuned_logits, _ = model.forward(tuned, source, decoder_tokens_BxT=jnp.asarray(decoder))
    assert np.abs(np.asarray(tuned_logits - base_logits)).max() > 1e-3
