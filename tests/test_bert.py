"""The BERT family against PyTorch transformers (``BertModel``, ``BertForSequenceClassification``).

Small random configs in the default lane; the real all-MiniLM-L6-v2 in the slow lane.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.errors import CheckpointError
from jpeft.io.hf import load_hf, save_hf
from jpeft.models import bert

import reference

TOL = 1e-4


def _torch_bert(folder, *, classifier=False, seed=0, **sizes):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=40, type_vocab_size=2,
                                     num_labels=3, **sizes)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    module = cls(config).eval()
    with torch.no_grad():  # move LayerNorms and biases off their trivial init so a mix-up shows
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    module.save_pretrained(folder)
    return module


def _inputs(seed=1, batch=3, length=9, vocab=96):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    types = np.zeros((batch, length), np.int32)
    types[:, 4:] = 1
    return tokens, mask, types


def _torch_hidden(module, tokens, mask, types):
    import torch

    with torch.no_grad():
        out = module(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types, dtype=torch.long))
    return out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_hidden_states_and_pooler_match_transformers(tmp_path, scan_layers):
    module = _torch_bert(tmp_path)
    model, params = load_hf(tmp_path, scan_layers=scan_layers)
    assert model.name == "bert" and model.config.num_labels == 0 and "classifier" not in params
    tokens, mask, types = _inputs()
    hidden, _ = jax.jit(model.forward)(params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask),
                                       token_type_ids_BxT=jnp.asarray(types))
    ref = _torch_hidden(module, tokens, mask, types)
    real = mask.astype(bool)
    assert np.max(np.abs(np.asarray(hidden)[real] - ref.last_hidden_state.numpy()[real])) <= TOL
    pooled = bert.pool(params, model.config, hidden)
    assert np.max(np.abs(np.asarray(pooled) - ref.pooler_output.numpy())) <= TOL
    embedding = bert.sentence_embedding(hidden, jnp.asarray(mask))
    ref_hidden = ref.last_hidden_state.numpy() * mask[..., None]
    ref_mean = ref_hidden.sum(1) / mask.sum(1, keepdims=True)
    assert np.max(np.abs(np.asarray(embedding) - ref_mean)) <= TOL


def test_classifier_logits_match_and_the_folder_round_trips(tmp_path):
    import torch
    import transformers

    module = _torch_bert(tmp_path / "torch", classifier=True, hidden_act="gelu_new")
    model, params = load_hf(tmp_path / "torch")
    assert model.config.num_labels == 3 and model.config.hidden_act == "gelu_new"
    assert model.names.hf.to_name("layers_0/attention/self/query/kernel")[0] == \
        "bert.encoder.layer.0.attention.self.query.weight"
    tokens, mask, types = _inputs(seed=2)
    hidden, _ = model.forward(params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask),
                              token_type_ids_BxT=jnp.asarray(types))
    logits = model.classify(params, hidden, jnp.asarray(mask))
    ref = _torch_hidden(module, tokens, mask, types).logits.numpy()
    assert np.max(np.abs(np.asarray(logits) - ref)) <= TOL

    save_hf(tmp_path / "jpeft", model, params)  # written with BertForSequenceClassification's names
    assert json.loads((tmp_path / "jpeft" / "config.json").read_text())["architectures"] == \
        ["BertForSequenceClassification"]
    again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "jpeft").eval()
    assert np.max(np.abs(_torch_hidden(again, tokens, mask, types).logits.numpy() - ref)) <= TOL
    with torch.no_grad():
        assert torch.equal(again.classifier.weight, module.classifier.weight)


def test_encoder_folder_loads_into_bert_model_names(tmp_path):
    """An encoder (no head) is written with BertModel's names, which transformers loads as it is."""
    import transformers

    cfg = bert.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    m = bert.model(cfg)
    params = reference.numpy_params(m)
    save_hf(tmp_path, m, params)
    torch_model = transformers.BertModel.from_pretrained(tmp_path).eval()
    tokens, mask, types = _inputs(vocab=50)
    ref = _torch_hidden(torch_model, tokens, mask, types).last_hidden_state.numpy()
    hidden, _ = m.forward(params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask),
                          token_type_ids_BxT=jnp.asarray(types))
    real = mask.astype(bool)
    assert np.max(np.abs(np.asarray(hidden)[real] - ref[real])) <= TOL


def test_bad_configs_and_checkpoints_are_refused_with_one_message(tmp_path):
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        bert.BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                        hidden_act="swish")
    with pytest.raises(ValueError, match="only absolute position embeddings"):
        bert.BertConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
    _torch_bert(tmp_path, classifier=True)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*classifier"):
        load_hf(tmp_path, num_labels=4)  # a head of another size than the checkpoint's
    m = bert.model(bert.BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                                   max_position_embeddings=4))
    with pytest.raises(ValueError, match="max_position_embeddings=4"):
        m.forward(reference.numpy_params(m), jnp.zeros((1, 5), "int32"))
    with pytest.raises(NotImplementedError, match="no key/value cache"):
        m.init_cache(1, 4)


@pytest.mark.slow
def test_all_minilm_l6_v2_matches_transformers():
    import transformers

    from jpeft import assets

    folder = assets.minilm_dir()
    model, params = load_hf(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    texts = ["jpeft fine-tunes encoders too.", "A longer sentence about the BBC News business section, padded."]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    torch_model = transformers.BertModel.from_pretrained(folder).eval()
    ref = _torch_hidden(torch_model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    hidden, _ = model.forward(params, jnp.asarray(batch["input_ids"], jnp.int32),
                              attention_mask_BxT=jnp.asarray(batch["attention_mask"]),
                              token_type_ids_BxT=jnp.asarray(batch["token_type_ids"], jnp.int32))
    real = batch["attention_mask"].astype(bool)
    assert np.max(np.abs(np.asarray(hidden)[real] - ref.last_hidden_state.numpy()[real])) <= TOL
    assert np.max(np.abs(np.asarray(bert.pool(params, model.config, hidden)) - ref.pooler_output.numpy())) <= TOL
