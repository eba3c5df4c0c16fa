"""The T5 family against PyTorch ``transformers``' T5ForConditionalGeneration (random small configs).

Both variants: T5 (ReLU MLP, head tied to the shared embedding, outputs scaled) and
T5 v1.1 / FLAN-T5 (gated GELU, own head, no scaling). The torch model is written to a
Hugging Face folder and jpeft loads that folder, so loading is checked with the numbers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jpeft.errors import CheckpointError
from jpeft.io.hf import load_hf, save_hf
from jpeft.models import generation, t5

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


def test_relative_position_buckets_match_transformers():
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    relative = np.arange(-300, 300)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (10, 40)):
            want = bucket(torch.tensor(relative), bidirectional=bidirectional, num_buckets=buckets,
                          max_distance=distance).numpy()
            got = jax.jit(t5.relative_position_bucket, static_argnums=(1, 2, 3))(
                relative, bidirectional, buckets, distance)
            np.testing.assert_array_equal(np.asarray(got), want)


@BOTH
def test_logits_match_transformers(torch_folder):
    variant, folder, torch_model = torch_folder
    model, params = load_hf(folder)
    assert model.name == "t5" and model.is_encoder_decoder
    assert model.config.gated == (variant == "v1.1") and model.config.tie_word_embeddings == (variant == "t5")
    want = torch_logits(torch_model)
    got = jpeft_logits(model, params)
    real = DECODER_MASK.astype(bool)  # a padded decoder position's output is not defined the same way
    assert np.abs(got - want)[real].max() <= 1e-4, np.abs(got - want)[real].max()


@FLAN_FIRST
def test_scanned_layers_and_save_round_trip(torch_folder, tmp_path):
    variant, folder, torch_model = torch_folder
    model, params = load_hf(folder, scan_layers=True)
    assert params["decoder"]["layers"]["cross_attn"]["q_proj"]["kernel"].shape == (3, 32, 32)
    want = torch_logits(torch_model)
    np.testing.assert_allclose(jpeft_logits(model, params)[DECODER_MASK.astype(bool)],
                               want[DECODER_MASK.astype(bool)], atol=1e-4)
    save_hf(tmp_path, model, params)  # and back: transformers reads what jpeft writes
    reread = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(torch_logits(reread), want, atol=1e-5)


@FLAN_FIRST
def test_greedy_generation_with_the_cache_matches_transformers(torch_folder):
    variant, folder, torch_model = torch_folder
    model, params = load_hf(folder)
    # The reference re-runs the whole torch model for every token (no cache): transformers'
    # generate() sizes its cache by the encoder's depth and fails when the decoder is deeper.
    decoder = np.zeros((2, 1), np.int64)
    for _ in range(6):
        logits = torch_logits(torch_model, decoder=decoder, decoder_mask=np.ones_like(decoder))
        decoder = np.concatenate([decoder, logits[:, -1].argmax(-1)[:, None]], axis=1)
    want = decoder[:, 1:]
    got = generation.generate(model, params, SOURCE, SOURCE_MASK, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1.1"])
def test_sampling_streams_the_same_tokens(torch_folder):
    _, folder, _ = torch_folder
    model, params = load_hf(folder)
    key = jax.random.key(3)
    a = generation.generate(model, params, SOURCE, SOURCE_MASK, max_new_tokens=5, temperature=1.0, key=key)
    b = list(generation.stream(model, params, SOURCE, SOURCE_MASK, max_new_tokens=5, temperature=1.0, key=key))
    np.testing.assert_array_equal(np.asarray(a), np.stack(b, axis=1))


@pytest.mark.parametrize("variant", ["t5"])
def test_a_checkpoint_of_another_size_is_refused(torch_folder, tmp_path):
    _, folder, _ = torch_folder
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_model": 64}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_hf(tmp_path)
