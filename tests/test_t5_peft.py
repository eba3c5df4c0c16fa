"""PEFT methods on T5: LoRA on every attention (cross-attention too) and on all linear layers, merged
and in Hugging Face PEFT's format both ways (checked against peft + transformers), prompt tuning
on the encoder input, IA3 in the T0 setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import tree
from jpeft.io.hf import load_hf
from jpeft.io.peft_format import load_peft, save_peft
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
    model, params = load_hf(folder, scan_layers=True)
    method = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v)_proj/kernel", model=model)
    adapter = randomized(method.init(jax.random.key(0), params))
    kernels = {p.rsplit("/", 2)[0] for p in tree.flatten(adapter)}
    assert kernels == {"encoder/layers/self_attn/q_proj", "encoder/layers/self_attn/v_proj",
                       "decoder/layers/self_attn/q_proj", "decoder/layers/self_attn/v_proj",
                       "decoder/layers/cross_attn/q_proj", "decoder/layers/cross_attn/v_proj"}
    applied = jpeft_logits(model, method.apply(params, adapter))
    merged = method.merge(params, adapter)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    np.testing.assert_allclose(jpeft_logits(model, merged)[REAL], applied[REAL], atol=1e-4)
    assert np.abs(applied - jpeft_logits(model, params)).max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("variant", ["t5", "v1.1"])
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
