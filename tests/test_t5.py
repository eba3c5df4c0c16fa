"""The T5 family against PyTorch ``transformers``' T5ForConditionalGeneration (random small configs).

Both variants: T5 (ReLU MLP, head tied to the shared embedding, outputs scaled) and
T5 v1.1 / FLAN-T5 (gated GELU, own head, no scaling). The torch model is written to a
Hugging Face folder and jpeft loads that folder, so loading is checked with the numbers.
"""

import json

import jax
import numpy as np
import pytest

from jpeft.errors import CheckpointError
from jpeft.io.hf import load_hf, save_hf
from jpeft.models import generation, t5

from t5_reference import (BOTH, DECODER_MASK, FLAN_FIRST, SOURCE, SOURCE_MASK, jpeft_logits,  # noqa: F401
                          torch_folder, torch_logits)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


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


@pytest.mark.slow
@BOTH
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


@pytest.mark.parametrize("variant", ["v1.1"])
def test_a_checkpoint_of_another_size_is_refused(torch_folder, tmp_path):
    _, folder, _ = torch_folder
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_model": 64}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_hf(tmp_path)
