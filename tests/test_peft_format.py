"""The Hugging Face PEFT adapter format, checked against peft + transformers themselves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft.io.hf import CheckpointError, load_hf
from jpeft.io.peft_format import load_peft, save_peft
from jpeft.models import llama

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def torch_base(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def jpeft_logits(config, params):
    logits, _ = llama.forward(params, config, jnp.asarray(TOKENS))
    return np.asarray(logits)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_peft_saved_adapter_loads_into_jpeft(base_folder, tmp_path, scan_layers):
    torch.manual_seed(1)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                  rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3},
                                  use_rslora=True)
    model = peft.get_peft_model(torch_base(base_folder), lora_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)   # PEFT starts B at zero, which would hide mistakes
    model.save_pretrained(tmp_path)
    expected = model(torch.tensor(TOKENS)).logits.detach().numpy()

    model, params = load_hf(base_folder, scan_layers=scan_layers)
    method, adapter = load_peft(tmp_path, model, params)
    np.testing.assert_allclose(jpeft_logits(model.config, method.apply(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)


def test_jpeft_saved_adapter_loads_into_peft(base_folder, tmp_path):
    model, params = load_hf(base_folder)
    method = jpeft.lora(rank=4, alpha=8, targets=[jpeft.Rule(r".*/mlp/down_proj/kernel", rank=2, alpha=5),
                                                  r".*/(q|k|v|o)_proj/kernel", r"embed_tokens/embedding"], model=model)
    adapter = method.init(jax.random.key(0), params)
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapter = treedef.unflatten([0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    save_peft(tmp_path, model, method, params, adapter)

    torch_model = peft.PeftModel.from_pretrained(torch_base(base_folder), tmp_path).eval()
    expected = torch_model(torch.tensor(TOKENS)).logits.detach().numpy()
    np.testing.assert_allclose(jpeft_logits(model.config, method.apply(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.fixture
def saved(base_folder, tmp_path):
    model, params = load_hf(base_folder)
    method = jpeft.lora(rank=2, targets=r".*/(q|v)_proj/kernel", model=model)
    save_peft(tmp_path, model, method, params, method.init(jax.random.key(0), params))
    return tmp_path, model, params


def _rewrite(folder, change):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file(change(tensors), str(folder / "adapter_model.safetensors"))


def test_wrong_key_prefix_fails_loudly(saved):
    folder, model, params = saved
    _rewrite(folder, lambda t: {k.replace("base_model.model.", "model."): v for k, v in t.items()})
    with pytest.raises(CheckpointError, match="not LoRA factors under"):
        load_peft(folder, model, params)


def test_missing_factor_and_unknown_module_are_named(saved):
    folder, model, params = saved
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite(folder, lambda t: {("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
                                 if k.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A")
                                 else k): v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError) as info:
        load_peft(folder, model, params)
    message = str(info.value)
    assert "model.layers.1.self_attn.v_proj: lora_B.weight is missing" in message
    assert "model.layers.7.self_attn.q_proj: no such module" in message


def test_adapter_for_another_model_shape_is_rejected(saved):
    folder, _, _ = saved
    other = llama.model(llama.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=48, num_layers=2,
                                          num_heads=4, num_kv_heads=2))
    with pytest.raises(CheckpointError, match="do not fit a weight of shape"):
        load_peft(folder, other, other.abstract_params())


def test_other_peft_types_and_corrupt_files_are_clear_errors(saved):
    folder, model, params = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        load_peft(folder, model, params)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="only LORA"):
        load_peft(folder, model, params)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_peft(folder, model, params)
