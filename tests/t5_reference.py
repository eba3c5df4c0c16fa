"""A tiny random PyTorch T5 of both variants (the peer of the T5 tests) and the inputs they share."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jpeft.models import t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SOURCE = np.array([[5, 9, 2, 7, 3, 11, 1], [0, 0, 4, 8, 13, 6, 1]])          # row 1 left-padded
SOURCE_MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
DECODER = np.array([[0, 3, 17, 4, 9], [0, 12, 2, 2, 0]])
DECODER_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
VARIANTS = {
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def save_torch_t5(folder, variant: str, seed: int = 0, vocab_size: int = 40):
    """A random ``transformers`` T5 of ``variant`` written to ``folder``; returns the torch model.

    transformers 5 always ties ``lm_head`` to ``shared`` in a fresh model; the v1.1 variant gets
    its own random head, written as ``lm_head.weight`` with ``tie_word_embeddings: false``, as
    the published v1.1 / FLAN-T5 checkpoints are.
    """
    torch.manual_seed(seed)
    settings = VARIANTS[variant]
    config = transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0, decoder_start_token_id=0,
        feed_forward_proj=settings["feed_forward_proj"], tie_word_embeddings=settings["tie_word_embeddings"])
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF's init makes tiny relative biases; larger ones test the buckets
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(std=1.0)
    model.save_pretrained(folder)
    if not settings["tie_word_embeddings"]:
        head = torch.nn.Parameter(torch.randn(vocab_size, 32) * 0.5)
        model.lm_head.weight = head
        tensors = load_file(f"{folder}/model.safetensors")
        tensors["lm_head.weight"] = head.detach().numpy()
        save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
        config_json = json.loads((folder / "config.json").read_text())
        config_json["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(config_json))
    return model


def torch_logits(model, source=SOURCE, source_mask=SOURCE_MASK, decoder=DECODER, decoder_mask=DECODER_MASK):
    with torch.no_grad():
        return model(input_ids=torch.tensor(source), attention_mask=torch.tensor(source_mask),
                     decoder_input_ids=torch.tensor(decoder),
                     decoder_attention_mask=torch.tensor(decoder_mask)).logits.numpy()


_forward = jax.jit(t5.forward, static_argnums=1)


def jpeft_logits(model, params, source=SOURCE, source_mask=SOURCE_MASK, decoder=DECODER, decoder_mask=DECODER_MASK):
    logits, _ = _forward(params, model.config, jnp.asarray(source), attention_mask_BxT=jnp.asarray(source_mask),
                         decoder_tokens_BxT=jnp.asarray(decoder), decoder_mask_BxT=jnp.asarray(decoder_mask))
    return np.asarray(logits)


_FOLDERS = {}
BOTH = pytest.mark.parametrize("variant", list(VARIANTS))
# The other variant of a check that does not depend on the variant's own layers runs in the slow lane.
FLAN_FIRST = pytest.mark.parametrize("variant", ["v1.1", pytest.param("t5", marks=pytest.mark.slow)])


@pytest.fixture
def torch_folder(variant, tmp_path_factory):
    """``(variant, folder, torch model)``, written once per variant per session."""
    if variant not in _FOLDERS:
        folder = tmp_path_factory.mktemp(f"t5-{variant}")
        _FOLDERS[variant] = (variant, folder, save_torch_t5(folder, variant))
    return _FOLDERS[variant]


