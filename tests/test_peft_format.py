"""The Hugging Face PEFT adapter format, checked against peft + transformers themselves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft.io.hf import CheckpointError, load_hf
from jpeft.io.peft import load_peft, save_peft
from jpeft.models import llama
import reference

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return reference.save_torch_llama(tmp_path_factory.mktemp("base"), hidden_size=32, intermediate_size=48)


def torch_base(folder):
    return reference.torch_llama(folder)


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
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))  # DoRA without magnitudes
    with pytest.raises(CheckpointError, match="q_proj: lora_magnitude_vector is missing"):
        load_peft(folder, model, params)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "BOFT"}))
    with pytest.raises(CheckpointError, match="'BOFT' are not supported; jpeft reads only ADALORA, IA3, LOHA, LOKR"):
        load_peft(folder, model, params)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))  # LoRA tensors
    with pytest.raises(CheckpointError, match="8 keys that are not IA3 vectors under 'base_model.model.'"):
        load_peft(folder, model, params)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_peft(folder, model, params)


# ----------------------------------------------------------------------------- tied embeddings


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tied")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("tie", [False, True], ids=["lookups-only", "ensure_weight_tying"])
def test_embedding_lora_on_tied_embeddings_matches_peft_both_ways(tied_folder, tmp_path, tie):
    model, params = load_hf(tied_folder)
    assert model.config.tie_word_embeddings
    method = jpeft.lora(rank=4, alpha=8, targets=r".*/q_proj/kernel|embed_tokens/embedding", model=model,
                        ensure_weight_tying=tie)
    adapter = method.init(jax.random.key(0), params)
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapter = treedef.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    ours = jpeft_logits(model.config, method.apply(params, adapter))

    # jpeft -> PEFT
    save_peft(tmp_path / "ours", model, method, params, adapter)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["ensure_weight_tying"] is tie
    theirs = peft.PeftModel.from_pretrained(torch_base(tied_folder), tmp_path / "ours").eval()
    np.testing.assert_allclose(ours, theirs(torch.tensor(TOKENS)).logits.detach().numpy(), rtol=1e-4, atol=1e-4)

    # PEFT -> jpeft (PEFT also saves the base embedding, and with tying the head's copy of the factors)
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=tie)
    hf = peft.get_peft_model(torch_base(tied_folder), config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.normal_(std=0.3)
    hf.save_pretrained(tmp_path / "theirs")
    saved = set(load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved
    method2, adapter2 = load_peft(tmp_path / "theirs", model, params)
    expected = hf(torch.tensor(TOKENS)).logits.detach().numpy()
    np.testing.assert_allclose(jpeft_logits(model.config, method2.apply(params, adapter2)), expected,
                               rtol=1e-4, atol=1e-4)
    # The two semantics really differ on this model: the test above could fail.
    other = jpeft.lora(rank=4, alpha=8, targets=r".*/q_proj/kernel|embed_tokens/embedding", model=model,
                       ensure_weight_tying=not tie)
    assert np.abs(jpeft_logits(model.config, other.apply(params, adapter)) - ours).max() > 1e-2
    # Merging a lookups-only adapter would change the tied head too: inference keeps it unmerged.
    assert (method.merge_blocker(params) is None) is tie


def test_base_weights_that_are_not_the_models_are_refused(tied_folder, tmp_path):
    model, params = load_hf(tied_folder)
    hf = peft.get_peft_model(torch_base(tied_folder), peft.LoraConfig(r=2, target_modules=["embed_tokens"])).eval()
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.embed_tokens: the adapter carries its own base weights"):
        load_peft(tmp_path, model, params)


# ----------------------------------------------------------------------------- readable errors


def test_an_adapter_for_a_shallower_model_is_refused_naming_the_layers(base_folder, tmp_path):
    model, params = load_hf(base_folder)
    method = jpeft.lora(rank=2, targets=r".*/(q|v)_proj/kernel", model=model)
    save_peft(tmp_path, model, method, params, method.init(jax.random.key(0), params))
    deeper = llama.model(llama.LlamaConfig(**{**model.config.__dict__, "num_layers": 4}))
    with pytest.raises(CheckpointError, match=r"layers_\*/self_attn/q_proj/kernel is adapted in layers \[0, 1\] of "
                                              r"the model's 4: layers \[2, 3\] have no adapter"):
        load_peft(tmp_path, deeper, deeper.abstract_params())
    with pytest.warns(UserWarning, match="was saved for base model 'org/tiny-llama'"):
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                                   "org/tiny-llama"}))
        load_peft(tmp_path, model, params, base_model="another/model")


def test_a_wrong_prefix_is_one_short_message(saved):
    folder, model, params = saved
    _rewrite(folder, lambda t: {k.replace("base_model.model.", "model."): v for k, v in t.items()})
    with pytest.raises(CheckpointError) as info:
        load_peft(folder, model, params)
    message = str(info.value)
    assert "8 keys that are not LoRA factors under 'base_model.model.'" in message
    assert "(and 3 more)" in message and len(message) < 600


def test_the_docs_table_lists_every_method_with_its_codec():
    """docs/peft-format.md has a row for every registered method, and says 'none' exactly where no codec exists."""
    import pathlib
    import re

    from jpeft.io.peft import BY_METHOD
    from jpeft.methods import registry

    page = (pathlib.Path(__file__).parent.parent / "docs" / "peft-format.md").read_text()
    rows = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 5:
            for name in re.findall(r"`(\w+)`", cells[0].split(" with ")[0]):
                rows.setdefault(name, cells)
    assert sorted(rows) == registry.names()
    for name, cells in rows.items():
        assert (cells[1] != "none") == (name in BY_METHOD), name
        if name in BY_METHOD:
            assert BY_METHOD[name].peft_type in cells[1], name
