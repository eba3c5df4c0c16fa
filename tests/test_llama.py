"""jpeft.models.llama against PyTorch transformers (Llama, Mistral, Qwen2) and itself."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jpeft
from jpeft.io import load_hf
from jpeft.models import generate, llama
from jpeft import stack
from reference import greedy_without_cache

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
VARIANTS = {
    "llama-gqa-untied": ("Llama", dict(rope_theta=10000.0)),
    "llama-mha-tied-headdim": ("Llama", dict(num_key_value_heads=4, head_dim=24, tie_word_embeddings=True,
                                             rope_theta=500000.0)),
    "llama3-rope-bias": ("Llama", dict(attention_bias=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "mistral-window": ("Mistral", dict(sliding_window=4, rope_theta=20000.0)),
    "qwen2-bias-tied": ("Qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e6)),
}
LENGTHS = (11, 6)  # a left-padded batch: the second row has 5 pads


def _randomize(model: torch.nn.Module) -> None:
    """O(1) activations and logits, so a 1e-4 tolerance means something (HF init is tiny)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def _make_hf(variant: str, folder) -> torch.nn.Module:
    family, extra = VARIANTS[variant]
    config = getattr(transformers, f"{family}Config")(**{**SMALL, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    _randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _sequences(vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, size=n) for n in LENGTHS]


def _left_pad(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    width = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for row, s in enumerate(seqs):
        tokens[row, width - len(s):], mask[row, width - len(s):] = s, 1
    return jnp.asarray(tokens), jnp.asarray(mask)


def _hf_logits(model: torch.nn.Module, seq: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(seq[None], dtype=torch.long)).logits[0].numpy()


@dataclasses.dataclass
class Variant:
    name: str
    config: llama.LlamaConfig
    params: dict
    seqs: list  # unpadded token sequences
    tokens: jax.Array  # the same, left-padded into one batch
    mask: jax.Array
    torch_logits: list  # transformers' logits for each unpadded sequence
    logits: jax.Array  # jpeft's logits for the padded batch


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory) -> Variant:
    """A random transformers model saved with save_pretrained, loaded with load_hf, run once."""
    folder = tmp_path_factory.mktemp(request.param)
    model = _make_hf(request.param, folder)
    loaded, params = load_hf(folder)
    config = loaded.config
    seqs = _sequences(config.vocab_size)
    tokens, mask = _left_pad(seqs)
    logits, cache = jax.jit(llama.forward)(params, config, tokens, attention_mask_BxT=mask)
    assert logits.dtype == jnp.float32 and cache is None
    torch_logits = [_hf_logits(model, s) for s in seqs]
    return Variant(request.param, config, params, seqs, tokens, mask, torch_logits, logits)


def test_logits_match_transformers_with_left_padding(variant):
    """Row 0 fills the batch (no padding); row 1 is left-padded and compared at its real tokens."""
    width = variant.tokens.shape[1]
    for row, seq in enumerate(variant.seqs):
        real = np.asarray(variant.logits[row, width - len(seq):])
        diff = np.abs(real - variant.torch_logits[row]).max()
        print(f"{variant.name} row {row} ({width - len(seq)} pads): max |jpeft - torch| = {diff:.2e}")
        assert diff <= 1e-4


def test_scan_layers_matches_unrolled(variant):
    config = dataclasses.replace(variant.config, scan_layers=True)
    params = stack.stack_layers(variant.params, config.num_layers)
    out, _ = jax.jit(llama.forward)(params, config, variant.tokens, attention_mask_BxT=variant.mask)
    np.testing.assert_allclose(out, variant.logits, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_is_close_to_float32(variant):
    config = dataclasses.replace(variant.config, dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variant.params)
    out, _ = jax.jit(llama.forward)(params, config, variant.tokens, attention_mask_BxT=variant.mask)
    ref = np.asarray(variant.logits)
    real = np.asarray(variant.mask, bool)
    err = np.abs(np.asarray(out) - ref)[real].max() / np.abs(ref).max()
    print(f"{variant.name}: bf16 max error / max |logit| = {err:.3f}")
    assert out.dtype == jnp.float32 and err < 0.05


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_greedy_generation_equals_full_forward_argmax(scan_layers):
    config = llama.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                               num_heads=4, num_kv_heads=2, sliding_window=6, scan_layers=scan_layers)
    params = llama.model(config).init(jax.random.key(1), stddev=0.3)
    tokens, mask = _left_pad(_sequences(config.vocab_size))
    got = generate(llama.model(config), params, tokens, mask, max_new_tokens=8)
    want = greedy_without_cache(params, config, tokens, mask, steps=8)
    np.testing.assert_array_equal(got, want)


def test_generation_stops_at_eos_and_pads():
    config = llama.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4)
    params = llama.model(config).init(jax.random.key(2), stddev=0.3)
    tokens, mask = _left_pad(_sequences(config.vocab_size))
    greedy = np.asarray(generate(llama.model(config), params, tokens, mask, max_new_tokens=6))
    eos = int(greedy[0, 1])
    stopped = np.asarray(generate(llama.model(config), params, tokens, mask, max_new_tokens=6, eos_id=eos, pad_id=-1))
    for row in range(2):
        hits = np.flatnonzero(greedy[row] == eos)
        end = hits[0] + 1 if hits.size else 6
        np.testing.assert_array_equal(stopped[row, :end], greedy[row, :end])
        assert (stopped[row, end:] == -1).all()


def test_sampling_respects_top_k_and_key():
    config = llama.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    params = llama.model(config).init(jax.random.key(0), stddev=0.5)
    prompt = jnp.ones((4, 3), jnp.int32)
    sample = lambda seed, **kw: generate(llama.model(config), params, prompt, max_new_tokens=5, temperature=1.0,
                                               key=jax.random.key(seed), **kw)
    np.testing.assert_array_equal(sample(0), sample(0))
    assert not np.array_equal(sample(0), sample(1))
    top1 = sample(2, top_k=1)
    np.testing.assert_array_equal(top1, generate(llama.model(config), params, prompt, max_new_tokens=5))
    with pytest.raises(ValueError, match="PRNG key"):
        generate(llama.model(config), params, prompt, max_new_tokens=2, temperature=1.0)


def test_input_embeds_equal_token_ids():
    config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    params = llama.model(config).init(jax.random.key(0))
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    embeds = llama.embed_tokens(params, config, tokens)
    forward = jax.jit(llama.forward, static_argnames="return_hidden")
    np.testing.assert_array_equal(forward(params, config, input_embeds_BxTxD=embeds)[0],
                                  forward(params, config, tokens)[0])
    hidden, _ = forward(params, config, tokens, return_hidden=True)
    assert hidden.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="exactly one"):
        llama.forward(params, config, tokens, input_embeds_BxTxD=embeds)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_param_axes_match_params_and_eval_shape(scan_layers):
    config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                               num_kv_heads=2, attention_bias=True, scan_layers=scan_layers)
    shapes = jax.eval_shape(llama.model(config).init, jax.random.key(0))
    axes = llama.model(config).param_axes()
    is_axes = lambda x: isinstance(x, tuple)
    assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=is_axes)
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)[0])
    for path, shape in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = flat_axes[path]
        assert len(shape.shape) == len(names)
        in_layer_stack = path[0].key == "layers"
        assert (names[0] == "layers") == in_layer_stack
    q_axes = (axes["layers"] if scan_layers else axes["layers_0"])["self_attn"]["q_proj"]["kernel"]
    assert q_axes == (("layers",) if scan_layers else ()) + ("embed", "q_heads")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_lora_wrapped_params_run_through_the_model(scan_layers):
    config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, scan_layers=scan_layers)
    params = llama.model(config).init(jax.random.key(0))
    method = jpeft.lora(rank=2, alpha=4, targets=r".*/(q|v)_proj/kernel")
    adapter = method.init(jax.random.key(1), params)
    adapter = jax.tree.map(lambda x: x + 0.1, adapter)  # make B non-zero
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    wrapped, _ = jax.jit(llama.forward)(method.apply(params, adapter), config, tokens)
    merged, _ = jax.jit(llama.forward)(method.merge(params, adapter), config, tokens)
    base, _ = jax.jit(llama.forward)(params, config, tokens)
    np.testing.assert_allclose(wrapped, merged, atol=1e-5)
    assert np.abs(np.asarray(wrapped - base)).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(num_heads=4, head_dim=5), "even"),
        (dict(num_heads=3), "not divisible"),
        (dict(num_heads=4, dtype="int8"), "dtype"),
        (dict(num_heads=4, rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(num_heads=4, sliding_window=0), "sliding_window"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1, **kwargs)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "Unsupported model_type"),
        (dict(hidden_act="gelu"), "silu"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
        (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    ],
)
def test_from_hf_rejects_what_it_cannot_honour(change, message):
    base = dict(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=4)
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig.from_hf({**base, **change})


def test_config_round_trips_through_hf_dict_for_each_family():
    for family in ("Llama", "Mistral", "Qwen2"):
        hf = getattr(transformers, f"{family}Config")(**{**SMALL, "rope_theta": 1234.0})
        config = llama.LlamaConfig.from_hf(hf.to_dict())
        assert config.rope_theta == 1234.0 and config.num_kv_heads == 2
        assert config.attention_bias == (family == "Qwen2")
        assert llama.LlamaConfig.from_hf(config.to_hf()) == config
