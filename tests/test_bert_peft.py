"""BERT LoRA adapters with a trained classifier (PEFT's modules_to_save) in both directions with peft + transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.errors import CheckpointError
from jpeft.io.hf import load_hf
from jpeft.io.peft import load_peft, save_peft
from jpeft.methods.heads import KEY, with_modules_to_save

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[2, 5, 9, 11, 7, 3], [4, 4, 8, 1, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
TARGETS = ["query", "key", "value", "dense"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert_cls")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=16, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def torch_base(folder):
    return transformers.BertForSequenceClassification.from_pretrained(folder).eval()


def torch_logits(module):
    with torch.no_grad():
        return module(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK)).logits.numpy()


def jpeft_logits(model, params):
    hidden, _ = model.forward(params, jnp.asarray(TOKENS, jnp.int32), attention_mask_BxT=jnp.asarray(MASK))
    return np.asarray(model.classify(params, hidden, jnp.asarray(MASK)))


def test_peft_seq_cls_adapter_loads_into_jpeft(base_folder, tmp_path):
    torch.manual_seed(1)
    module = peft.get_peft_model(torch_base(base_folder), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(std=0.3)  # PEFT starts B at zero and the head at the base's: that would hide mistakes
    module.save_pretrained(tmp_path)
    expected = torch_logits(module)

    model, params = load_hf(base_folder, scan_layers=True)
    method, adapter = load_peft(tmp_path, model, params)
    assert sorted(jpeft.tree.flatten(adapter[KEY])) == ["classifier/bias", "classifier/kernel"]
    np.testing.assert_allclose(jpeft_logits(model, method.apply(params, adapter)), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(jpeft_logits(model, params) - expected).max() > 1e-2  # the adapter (and head) changed them

    small, small_params = load_hf(base_folder, num_labels=3)
    narrow = small.replace(num_labels=2)  # a head of another label count than the adapter's
    narrow_params = {**small_params, "classifier": {"kernel": jnp.zeros((16, 2)), "bias": jnp.zeros(2)}}
    with pytest.raises(CheckpointError, match=r"classifier.weight: shape \(16, 3\).*another number of labels"):
        load_peft(tmp_path, narrow, narrow_params)


def test_jpeft_adapter_with_trained_head_loads_into_peft(base_folder, tmp_path):
    model, params = load_hf(base_folder)
    method = with_modules_to_save(jpeft.lora(rank=4, alpha=8, targets=r".*/(query|key|value|dense)/kernel",
                                             model=model), r"classifier/.*")
    adapter = method.init(jax.random.key(0), params)
    rng = np.random.default_rng(1)  # numpy: no sampler compiled per shape
    adapter = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.2 * rng.standard_normal(x.shape), x.dtype),
                           adapter)
    save_peft(tmp_path, model, method, params, adapter)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]

    module = peft.PeftModel.from_pretrained(torch_base(base_folder), tmp_path).eval()
    np.testing.assert_allclose(jpeft_logits(model, method.apply(params, adapter)), torch_logits(module),
                               rtol=1e-4, atol=1e-4)
    method2, adapter2 = load_peft(tmp_path, model, params)  # and back
    np.testing.assert_allclose(jpeft_logits(model, method2.apply(params, adapter2)), torch_logits(module),
                               rtol=1e-4, atol=1e-4)


def test_encoder_adapter_uses_bert_model_names(tmp_path):
    """A LoRA adapter of a plain encoder is keyed as PEFT keys BertModel's modules (no ``bert.`` prefix)."""
    torch.manual_seed(2)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path / "base")
    model, params = load_hf(tmp_path / "base")
    method = jpeft.lora(rank=2, targets=r".*/(query|value)/kernel", model=model)
    adapter = jax.tree.map(lambda x: x + 0.3, method.init(jax.random.key(0), params))
    save_peft(tmp_path / "adapter", model, method, params, adapter)
    module = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = module(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    hidden, _ = model.forward(method.apply(params, adapter), jnp.asarray(TOKENS, jnp.int32),
                              attention_mask_BxT=jnp.asarray(MASK))
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], expected[real], rtol=1e-4, atol=1e-4)
