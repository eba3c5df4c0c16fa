"""Mixed batches: every row runs its own adapter, checked against running the batch with that adapter alone.

Tiny models and few compilations (each distinct parameter structure compiles the model once): the
references merge LoRA and IA3 adapters into the weights, so they share one compiled forward.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import quant
from jpeft.errors import SettingError
from jpeft.methods.ia3 import Ia3Rows
from jpeft.methods.lora import LoraRows
from jpeft.models import generation, llama
from jpeft import stack

CONFIG = llama.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True, scan_layers=True)
MODEL = llama.model(CONFIG)


def random_like(shapes, seed, std=0.3, offset=0.0):
    """Random normal leaves (numpy: no random-number program to compile) of ``shapes``' shapes and dtypes."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(offset + std * rng.normal(size=x.shape), x.dtype), shapes)


def random_adapter(method, params, seed, **kwargs):
    """An adapter of ``method`` with every leaf random (a fresh LoRA's B is zero, which would hide mistakes)."""
    return random_like(jax.eval_shape(method.init, jax.random.key(0), params), seed, **kwargs)


# Weights large enough that the adapters change the logits; norm scales one.
PARAMS = jax.tree.map(lambda x: x if x.ndim > 1 else jnp.ones_like(x),
                      random_like(jax.eval_shape(MODEL.init, jax.random.key(0)), 0))
FLAT_CONFIG = dataclasses.replace(CONFIG, scan_layers=False)  # one layer per parameter subtree
FLAT_MODEL = llama.model(FLAT_CONFIG)
FLAT_PARAMS = stack.unstack_layers(PARAMS, CONFIG.num_layers)
# Six left-padded rows.
TOKENS = jnp.asarray(np.random.default_rng(5).integers(1, CONFIG.vocab_size, (6, 7)), jnp.int32)
MASK = jnp.ones((6, 7), jnp.int32).at[1, :3].set(0).at[4, :1].set(0)

forward = jax.jit(llama.forward)


def lora_adapters(model, params):
    """Three LoRA adapters of ranks 2, 4 and 3 over different weights (one on the tied embedding)."""
    methods = {
        "r2": jpeft.lora(rank=2, alpha=4, targets=r".*/(q|v)_proj/kernel", model=model),
        "r4": jpeft.lora(rank=4, alpha=3, targets=[jpeft.Rule(r".*/mlp/.*_proj/kernel", rank=3),
                                                   r".*/(q|k|v|o)_proj/kernel"], use_rslora=True, model=model),
        "emb": jpeft.lora(rank=3, alpha=6, targets=[r"embed_tokens/embedding", r".*/o_proj/kernel"],
                          ensure_weight_tying=True, model=model),
    }
    return {name: (m, random_adapter(m, params, seed=10 + i))
            for i, (name, m) in enumerate(methods.items())}


def alone(config, params, entry, *, merge=True, **kwargs):
    """The whole batch run with one adapter (merged into the weights, or applied) or none: each row as if alone."""
    run = params if entry is None else (entry[0].merge if merge else entry[0].apply)(params, entry[1])
    return np.asarray(forward(run, config, TOKENS, attention_mask_BxT=MASK, **kwargs)[0])


def check_rows(config, params, adapters, names, mix, merge=True, atol=2e-5, **kwargs):
    logits, _ = forward(mix.apply(params, names), config, TOKENS, attention_mask_BxT=MASK, **kwargs)
    assert logits.shape == (len(names), TOKENS.shape[1], CONFIG.vocab_size)
    for name in dict.fromkeys(names):
        want = alone(config, params, adapters.get(name), merge=merge, **kwargs)
        for row in [i for i, n in enumerate(names) if n == name]:
            np.testing.assert_allclose(logits[row], want[row], atol=atol, rtol=1e-5, err_msg=f"row {row} ({name})")
    return np.asarray(logits)


def test_lora_rows_equal_each_row_alone():
    """Ranks 2, 4 (3 on the MLP) and 3, rsLoRA, a tied embedding, one layer per subtree; the dense strategy
    (the other tests run the default, gathering)."""
    adapters = lora_adapters(FLAT_MODEL, FLAT_PARAMS)
    mix = jpeft.MixedAdapters(FLAT_PARAMS, adapters, model=FLAT_MODEL, strategy="dense")
    assert jpeft.tree.flatten(mix.apply(FLAT_PARAMS, ["r2"] * 6))["layers_0/self_attn/q_proj/kernel"]._dense(6)
    names = ["r4", "base", "r2", "emb", None, "r2"]
    logits = check_rows(FLAT_CONFIG, FLAT_PARAMS, adapters, names, mix)
    # The adapters do change the rows they run in (so the comparison above means something).
    assert np.abs(logits[2] - alone(FLAT_CONFIG, FLAT_PARAMS, None)[2]).max() > 0.05


def test_lora_rows_on_a_4bit_base():
    """Scanned layers over an NF4 base; the references are the adapters applied alone to the same 4-bit base
    (QLoRA), one compilation each, so two adapters and no base row (the other tests have base rows)."""
    qparams = quant.quantize(PARAMS, r".*/(self_attn|mlp)/.*_proj/kernel", "nf4", block_size=16, model=MODEL)
    assert isinstance(qparams["layers"]["self_attn"]["q_proj"]["kernel"], quant.QuantizedArray)
    adapters = lora_adapters(MODEL, qparams)
    del adapters["r4"]
    mix = jpeft.MixedAdapters(qparams, adapters, model=MODEL)
    q_leaf = jpeft.tree.flatten(mix.apply(qparams, ["r2"] * 6))["layers/self_attn/q_proj/kernel"]
    assert isinstance(q_leaf, LoraRows) and isinstance(q_leaf.base, quant.QuantizedArray)  # stays 4-bit
    check_rows(CONFIG, qparams, adapters, ["r2", "emb", "emb", "emb", "r2", "r2"], mix, merge=False)


def prompt_adapters(params):
    prompt = jpeft.prompt_tuning(3, init="normal", init_std=0.5, model=MODEL)
    ptune = jpeft.p_tuning(5, hidden_size=8, model=MODEL)
    lora = jpeft.lora(rank=2, targets=r".*/v_proj/kernel", model=MODEL)
    return {"prompt": (prompt, random_adapter(prompt, params, 1, std=0.5)),
            "ptune": (ptune, random_adapter(ptune, params, 2)),  # unfolded: its encoder runs once, on load
            "lora": (lora, random_adapter(lora, params, 4))}


def test_prompt_rows_equal_each_row_alone():
    """Different numbers of virtual tokens (3 and 5), none for the base row, mixed with a LoRA row; explicit
    positions are shifted by each row's own number of virtual tokens."""
    adapters = prompt_adapters(PARAMS)
    mix = jpeft.MixedAdapters(PARAMS, adapters, model=MODEL)
    names = ["prompt", "ptune", "base", "lora", "ptune", "prompt"]
    assert MODEL.virtual_tokens(mix.apply(PARAMS, names)) == 5
    positions = jnp.broadcast_to(jnp.arange(7), (6, 7))
    check_rows(CONFIG, PARAMS, adapters, names, mix, positions_BxT=positions)


def test_ia3_rows_equal_each_row_alone():
    full = jpeft.ia3(model=MODEL)  # keys, values and the FFN input
    kv_only = jpeft.ia3(targets=r".*/(k|v)_proj/kernel", feedforward=None, model=MODEL)
    lora = jpeft.lora(rank=2, targets=r".*/(k|q)_proj/kernel", model=MODEL)  # shares k_proj with the IA3 adapters
    adapters = {"full": (full, random_adapter(full, PARAMS, 1, offset=1.0)),
                "kv": (kv_only, random_adapter(kv_only, PARAMS, 2, offset=1.0)),
                "lora": (lora, random_adapter(lora, PARAMS, 4))}
    mix = jpeft.MixedAdapters(PARAMS, adapters, model=MODEL)
    k_leaf = jpeft.tree.flatten(mix.apply(PARAMS, ["kv"] * 6))["layers/self_attn/k_proj/kernel"]
    assert isinstance(k_leaf, LoraRows) and isinstance(k_leaf.base, Ia3Rows)
    check_rows(CONFIG, PARAMS, adapters, ["kv", "full", "base", "lora", "full", "kv"], mix)


def test_ia3_rows_scale_a_bias_per_row():
    """A layer with a bias (Qwen2's k/v projections): the bias is scaled with the row's outputs."""
    params = {"k_proj": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
                         "bias": jnp.arange(3.0) + 1}}
    method = jpeft.ia3(targets=r"k_proj/kernel", feedforward=None)
    adapters = {n: (method, {"k_proj": {"kernel": {"ia3_l": jnp.array(v)}}})
                for n, v in {"a": [2.0, 0.5, -1.0], "b": [0.0, 3.0, 1.0]}.items()}
    mix = jpeft.MixedAdapters(params, adapters)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 4)), jnp.float32)
    run = mix.apply(params, ["b", "base", "a"])["k_proj"]
    got = jpeft.ops.linear(x, run["kernel"], run["bias"])
    for row, name in enumerate(["b", None, "a"]):
        one = params if name is None else method.apply(params, adapters[name][1])
        want = jpeft.ops.linear(x[row:row + 1], one["k_proj"]["kernel"], one["k_proj"]["bias"])
        np.testing.assert_allclose(got[row], want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", ["dense", "gather"])
def test_rank_padding_is_exact(strategy):
    """Zero-padded factors add exactly nothing: integer-valued data makes every sum exact, so the rank-2
    adapter padded to rank 8 must give bit-identical outputs to its own rank-2 LoraWeight."""
    ints = lambda seed, shape: jnp.asarray(np.random.default_rng(seed).integers(-3, 4, shape), jnp.float32)
    params = {"w": {"kernel": ints(0, (10, 9))}}
    small = jpeft.lora(rank=2, alpha=1.0, targets=r"w/kernel")  # scale 0.5: exact in binary
    big = jpeft.lora(rank=8, alpha=4.0, targets=r"w/kernel")
    a_small = {"w": {"kernel": {"a": ints(1, (10, 2)), "b": ints(2, (2, 9))}}}
    a_big = {"w": {"kernel": {"a": ints(3, (10, 8)), "b": ints(4, (8, 9))}}}
    mix = jpeft.MixedAdapters(params, {"small": (small, a_small), "big": (big, a_big)}, strategy=strategy)
    state = mix.slots.states[0]
    assert state["a"].shape == (10, 2, 8) and state["b"].shape == (2, 8, 9)  # (in, slots, R), (slots, R, out)
    assert not np.asarray(state["a"][:, 0, 2:]).any() and not np.asarray(state["b"][0, 2:, :]).any()
    x = ints(5, (3, 4, 10))
    got = jpeft.ops.linear(x, mix.apply(params, ["small", "base", "big"])["w"]["kernel"])
    np.testing.assert_array_equal(got[0], jpeft.ops.linear(x[0], small.apply(params, a_small)["w"]["kernel"]))
    np.testing.assert_array_equal(got[1], x[1] @ params["w"]["kernel"])  # the base row: exactly the base
    np.testing.assert_array_equal(got[2], jpeft.ops.linear(x[2], big.apply(params, a_big)["w"]["kernel"]))


def test_hot_swap_and_new_rows_do_not_recompile():
    """Scanned layers, free slots; compilations counted by jit's cache."""
    adapters = lora_adapters(MODEL, PARAMS)
    mix = jpeft.MixedAdapters(PARAMS, adapters, model=MODEL, max_rank=4, slots=8)
    q_leaf = jpeft.tree.flatten(mix.apply(PARAMS, ["r2"] * 6))["layers/self_attn/q_proj/kernel"]
    assert q_leaf.strategy == "auto" and q_leaf.a.shape[-2] == 8

    @jax.jit
    def logits_of(params, slots, rows, tokens):
        return llama.forward(slots.apply(params, rows), CONFIG, tokens, attention_mask_BxT=MASK)[0]

    first = logits_of(PARAMS, mix.slots, mix.rows(["r2", "r4", "emb", "base", "r2", "r4"]), TOKENS)
    # Another assignment of rows, then another adapter in slot "r2" (rank 1 padded to 4, other targets).
    logits_of(PARAMS, mix.slots, mix.rows(["emb", "emb", "base", "r4", "r2", "r2"]), TOKENS)
    swap_method = jpeft.lora(rank=1, alpha=2, targets=r".*/(q|k)_proj/kernel", model=MODEL)
    swap = random_adapter(swap_method, PARAMS, 8)
    ia3 = jpeft.ia3(model=MODEL)
    with pytest.raises(ValueError, match=r"adapts '.*/down_proj/kernel' \(ia3\), which no slot of this mix holds"):
        mix.load("r2", ia3, random_adapter(ia3, PARAMS, 0))
    swapped = mix.load("r2", swap_method, swap).load("extra", *adapters["r4"])  # a free slot takes another
    names = ["r2", "base", "r2", "emb", "r4", "extra"]
    after = logits_of(PARAMS, swapped.slots, swapped.rows(names), TOKENS)
    assert logits_of._cache_size() == 1  # three calls, one compilation
    for name in ("base", "r2", "emb", "r4", "extra"):
        entry = (swap_method, swap) if name == "r2" else {**adapters, "extra": adapters["r4"]}.get(name)
        want = alone(CONFIG, PARAMS, entry)
        for row in [i for i, n in enumerate(names) if n == name]:
            np.testing.assert_allclose(after[row], want[row], atol=2e-5, rtol=1e-5, err_msg=f"row {row} ({name})")
    assert np.abs(np.asarray(after[0] - first[0])).max() > 0.05  # the swap did change slot r2
    # Control: a mix of another shape (larger slots) does compile again, so the counter can see it.
    bigger = jpeft.MixedAdapters(PARAMS, adapters, model=MODEL, max_rank=8, slots=8)
    logits_of(PARAMS, bigger.slots, bigger.rows(names[:4] + ["r4", "r4"]), TOKENS)
    assert logits_of._cache_size() == 2


@pytest.mark.slow
def test_generate_mixed_rows_and_hot_swap_reuse_the_compiled_decoder():
    """Greedy decoding with the KV cache on scanned layers: each row decodes as it would alone (the generate
    program's test checks the same through python -m train.generate; this one is the library's, and slower)."""
    adapters = {**lora_adapters(MODEL, PARAMS), **prompt_adapters(PARAMS)}
    adapters.pop("ptune")
    mix = jpeft.MixedAdapters(PARAMS, adapters, model=MODEL, slots=6)
    names = ["prompt", "r4", "base", "prompt", "r4", "base"]
    prompt, mask = TOKENS[:, :5], MASK[:, :5]
    out = generation.generate(MODEL, mix.apply(PARAMS, names), prompt, mask, max_new_tokens=5)
    for row, name in enumerate(names[:3]):  # rows i and i + 3 run the same adapter
        entry = adapters.get(name)
        run = PARAMS if entry is None else entry[0].apply(PARAMS, entry[1])
        want = generation.generate(MODEL, run, prompt[row::3], mask[row::3], max_new_tokens=5)
        np.testing.assert_array_equal(out[row::3], want, err_msg=f"rows {row}, {row + 3} ({name})")
    compiled = generation._generate._cache_size()
    other = jpeft.prompt_tuning(2, init="normal", init_std=0.5, model=MODEL)
    swapped = mix.load("prompt", other, random_adapter(other, PARAMS, 9)).load(
        "extra", *adapters["r2"])  # a free slot takes a sixth adapter
    assert swapped.names == ("r2", "r4", "emb", "prompt", "lora", "extra")
    generation.generate(MODEL, swapped.apply(PARAMS, ["extra", "prompt", "base", "r4", "lora", "emb"]), prompt, mask,
                        max_new_tokens=5)
    assert generation._generate._cache_size() == compiled


def test_bad_input_is_one_clear_error():
    adapters = lora_adapters(MODEL, PARAMS)
    mix = jpeft.MixedAdapters(PARAMS, adapters, model=MODEL)
    with pytest.raises(ValueError, match=r"no adapter named 'sports' in this mix; it holds \['r2', 'r4', 'emb'\]"):
        mix.rows(["r2", "sports"])
    with pytest.raises(ValueError, match="the batch has 6 rows but the adapters were assigned to 2 rows"):
        llama.forward(mix.apply(PARAMS, ["r2", "r4"]), CONFIG, TOKENS)
    other = llama.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, tie_word_embeddings=True, scan_layers=True)
    other_params = jax.eval_shape(lambda: llama.model(other).init(jax.random.key(0)))
    with pytest.raises(ValueError, match="adapter 'r2' .* does not fit these parameters"):
        jpeft.MixedAdapters(other_params, {"r2": adapters["r2"]}, model=llama.model(other))
    prefix = jpeft.prefix_tuning(2, model=MODEL)
    with pytest.raises(ValueError, match="'prefix' hook point .* cannot differ per row"):
        jpeft.MixedAdapters(PARAMS, {"p": (prefix, random_adapter(prefix, PARAMS, 0))}, model=MODEL)
    full = jpeft.full(targets=r".*/q_proj/kernel")
    with pytest.raises(ValueError, match="turns 'layers/self_attn/q_proj/kernel' into a ArrayImpl"):
        jpeft.MixedAdapters(PARAMS, {"f": (full, random_adapter(full, PARAMS, 0))}, model=MODEL)
    with pytest.raises(ValueError, match="all 3 slots are taken"):
        mix.load("new", *adapters["r2"])
    big = jpeft.lora(rank=8, targets=r".*/q_proj/kernel", model=MODEL)
    with pytest.raises(ValueError, match="rank 8 is more than the slots' rank 4"):
        mix.load("r2", big, random_adapter(big, PARAMS, 0))
    with pytest.raises(ValueError, match="more than max_rank=2"):
        jpeft.MixedAdapters(PARAMS, adapters, model=MODEL, max_rank=2)
    with pytest.raises(SettingError, match="MixedAdapters: strategy must be one of .*, got strategy='fast'"):
        jpeft.MixedAdapters(PARAMS, adapters, model=MODEL, strategy="fast")
    with pytest.raises(ValueError, match="other than 'base'"):
        jpeft.MixedAdapters(PARAMS, {"base": adapters["r2"]}, model=MODEL)
    with pytest.raises(TypeError, match="no single weight array"):
        jpeft.ops.as_array(jpeft.tree.flatten(mix.apply(PARAMS, ["r2"] * 6))["layers/self_attn/q_proj/kernel"])
    emptied = mix.unload("r4")
    assert emptied.names == ("r2", "emb") and emptied.capacity == 3
    loaded = emptied.load("again", *adapters["r4"])
    assert loaded.slot("again") == 1


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rebased_adapters_are_refused_with_the_conversion(init):
    """A PiSSA / OLoRA adapter goes with its own residual base: over the shared base it would be another model."""
    method = jpeft.lora(rank=2, targets=r".*/q_proj/kernel", init=init, model=MODEL)
    shapes = jax.eval_shape(lambda p: p, PARAMS)
    adapter = random_adapter(method, shapes, seed=3)
    plain = jpeft.lora(rank=2, targets=r".*/v_proj/kernel", model=MODEL)
    adapters = {"pissa": (method, adapter), "plain": (plain, random_adapter(plain, shapes, seed=4))}
    with pytest.raises(ValueError, match=r"MixedAdapters: adapter 'pissa'.*rebased.*as_plain_lora"):
        jpeft.MixedAdapters(shapes, adapters, model=MODEL)
    with pytest.raises(ValueError, match=r"AdapterBank: adapter 'pissa'.*as_plain_lora"):
        jpeft.AdapterBank(adapters)


def test_a_converted_pissa_adapter_mixes_exactly():
    """The plain rank-2r form of a trained PiSSA adapter runs in a mixed batch as the PiSSA model over its residual."""
    from jpeft.methods.lora import as_plain_lora

    params = FLAT_PARAMS
    method = jpeft.lora(rank=2, alpha=4, targets=r".*/(q|v)_proj/kernel", init="pissa", model=FLAT_MODEL)
    initial = method.init(jax.random.key(1), params)
    trained = jax.tree.map(lambda x, n: x + n, initial, random_adapter(method, params, seed=7, std=0.05))
    want, _ = forward(method.merge(method.training.rebase.base(params, initial), trained), FLAT_CONFIG, TOKENS,
                      attention_mask_BxT=MASK)
    mix = jpeft.MixedAdapters(params, {"p": as_plain_lora(method, params, trained, initial, model=FLAT_MODEL)},
                              model=FLAT_MODEL)
    got, _ = forward(mix.apply(params, ["p"] * TOKENS.shape[0]), FLAT_CONFIG, TOKENS, attention_mask_BxT=MASK)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)
