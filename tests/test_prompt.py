"""Prompt tuning, P-tuning and prefix tuning on a tiny Llama, with Hugging Face PEFT as the reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods import prefix as prefix_lib
from jpeft.methods import prompt as prompt_lib
from jpeft.models import generate, llama
from jpeft import stack
from reference import adam_steps, greedy_without_cache, target_xent

CONFIG = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64)
PARAMS = llama.model(CONFIG).init(jax.random.key(0), stddev=0.3)
MODEL = llama.model(CONFIG)
N = 3  # virtual tokens
# A left-padded batch: row 1 has 3 pads.
TOKENS = jnp.array([[5, 9, 2, 7, 1, 3, 8], [0, 0, 0, 4, 6, 11, 2]], jnp.int32)
MASK = jnp.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]], jnp.int32)
forward = jax.jit(llama.forward, static_argnames=("return_hidden", "prepend_virtual"))

METHODS = {
    "prompt": lambda: jpeft.prompt_tuning(N, init_ids=[4, 9], model=MODEL),
    "p_tuning_mlp": lambda: jpeft.p_tuning(N, hidden_size=8, model=MODEL),
    "p_tuning_lstm": lambda: jpeft.p_tuning(N, encoder="lstm", hidden_size=8, model=MODEL),
    "p_tuning_residual": lambda: jpeft.p_tuning(N, hidden_size=8, init_ids=[4, 9], residual=True, model=MODEL),
    "prefix": lambda: jpeft.prefix_tuning(N, init_std=0.5, model=MODEL),
    "prefix_projection": lambda: jpeft.prefix_tuning(N, projection=True, hidden_size=8, model=MODEL),
}


def scanned(params):
    return stack.stack_layers(params, CONFIG.num_layers)


SCAN_CONFIG = dataclasses.replace(CONFIG, scan_layers=True)


def test_prompt_is_the_same_as_prepended_input_embeddings():
    method = jpeft.prompt_tuning(N, init="normal", init_std=0.5, model=MODEL)
    prompt_NxD = method.init(jax.random.key(1), PARAMS)["prompt"]["embeddings"]
    logits, _ = forward(method.apply(PARAMS, {"prompt": {"embeddings": prompt_NxD}}), CONFIG, TOKENS,
                        attention_mask_BxT=MASK)
    embeds_BxTxD = jnp.concatenate([jnp.broadcast_to(prompt_NxD, (2, N, 16)),
                                    llama.embed_tokens(PARAMS, CONFIG, TOKENS)], axis=1)
    mask = jnp.concatenate([jnp.ones((2, N), jnp.int32), MASK], axis=1)
    want, _ = forward(PARAMS, CONFIG, input_embeds_BxTxD=embeds_BxTxD, attention_mask_BxT=mask)
    assert logits.shape == (2, 7, 32)
    np.testing.assert_allclose(logits, want[:, N:], atol=1e-5)


def test_prefix_is_the_same_as_a_cache_holding_it():
    method = METHODS["prefix"]()
    adapter = method.init(jax.random.key(1), PARAMS)
    logits, _ = forward(method.apply(PARAMS, adapter), CONFIG, TOKENS, attention_mask_BxT=MASK)
    # Reference: the base model continuing from a cache whose first N slots hold the prefix.
    cache = llama.init_cache(CONFIG, 2, N + 7)
    k, h = CONFIG.num_kv_heads, CONFIG.head_dim
    for i in range(CONFIG.num_layers):
        for part, name in (("k", "key"), ("v", "value")):
            rows_BxNxKxH = jnp.broadcast_to(adapter["prefix"][name][i].reshape(N, k, h), (2, N, k, h))
            cache[f"layers_{i}"][part] = cache[f"layers_{i}"][part].at[:, :N].set(rows_BxNxKxH)
    cache["mask"] = cache["mask"].at[:, :N].set(True)
    cache["positions"] = cache["positions"].at[:, :N].set(jnp.arange(N))
    cache["index"] = jnp.int32(N)
    want, _ = forward(PARAMS, CONFIG, TOKENS, attention_mask_BxT=MASK, cache=cache)
    np.testing.assert_allclose(logits, want, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_prefix_from_text_is_the_same_as_the_text_written_before_the_input(scan):
    params, config = (scanned(PARAMS), SCAN_CONFIG) if scan else (PARAMS, CONFIG)
    method = jpeft.prefix_tuning(5, init_ids=[4, 9], model=llama.model(config))
    adapter = method.init(jax.random.key(1), params)
    assert adapter["prefix"]["key"].shape == (2, 5, 8)
    got, _ = forward(method.apply(params, adapter), config, TOKENS, attention_mask_BxT=MASK)
    text_BxN = jnp.broadcast_to(jnp.array([4, 9, 4, 9, 4], jnp.int32), (2, 5))
    want, _ = forward(params, config, jnp.concatenate([text_BxN, TOKENS], axis=1),
                      attention_mask_BxT=jnp.concatenate([jnp.ones((2, 5), jnp.int32), MASK], axis=1))
    np.testing.assert_allclose(got, want[:, 5:], atol=1e-5)
    # The same text as a prompt-tuning prompt: the same model.
    prompt = jpeft.prompt_tuning(5, init_ids=[4, 9], model=MODEL)
    as_prompt, _ = forward(prompt.apply(params, prompt.init(jax.random.key(0), params)), config, TOKENS,
                           attention_mask_BxT=MASK)
    np.testing.assert_allclose(got, as_prompt, atol=1e-5)


def test_prefix_text_init_errors():
    for kwargs, message in [({"init": "text", "model": MODEL}, "needs init_text"),
                            ({"init_ids": [1]}, "pass model="),
                            ({"init_ids": [1], "model": MODEL, "projection": True}, "needs init='normal'"),
                            ({"init": "zeros"}, "'text', 'normal'"),
                            ({"init": "normal", "init_ids": [1]}, "does not read a text")]:
        with pytest.raises(ValueError, match=message):
            jpeft.prefix_tuning(4, **kwargs)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        jpeft.prefix_tuning(4, init_ids=[99], model=MODEL).init(jax.random.key(0), PARAMS)
    with pytest.raises(ValueError, match="does not describe these parameters"):
        jpeft.prefix_tuning(4, init_ids=[1], model=MODEL).init(jax.random.key(0), scanned(PARAMS))
    applied = jpeft.prompt_tuning(N, init_ids=[4], model=MODEL).apply(PARAMS, {"prompt": {"embeddings": jnp.zeros((N, 16))}})
    with pytest.raises(ValueError, match="without a prompt or prefix"):
        llama.keys_values_of_text(applied, CONFIG, [1, 2])


def test_prefix_adapter_works_with_scan_layers_on_and_off():
    method = METHODS["prefix_projection"]()
    adapter = method.init(jax.random.key(1), PARAMS)
    unrolled, _ = forward(method.apply(PARAMS, adapter), CONFIG, TOKENS, attention_mask_BxT=MASK)
    stacked_params = method.apply(scanned(PARAMS), adapter)
    assert stacked_params["layers"]["hooks"]["prefix"]["key"].shape == (2, N, 8)
    stacked, _ = forward(stacked_params, SCAN_CONFIG, TOKENS, attention_mask_BxT=MASK)
    np.testing.assert_allclose(stacked, unrolled, atol=1e-5)


@pytest.mark.parametrize("name, scan", [("prompt", False), ("prefix", True)])
def test_cached_generation_equals_generation_without_cache(name, scan):
    method = METHODS[name]()
    adapter = method.init(jax.random.key(2), PARAMS)
    params, config = (scanned(PARAMS), SCAN_CONFIG) if scan else (PARAMS, CONFIG)
    applied = method.apply(params, adapter)
    got = generate(llama.model(config), applied, TOKENS, MASK, max_new_tokens=6)
    np.testing.assert_array_equal(got, greedy_without_cache(applied, config, TOKENS, MASK, steps=6))
    assert not np.array_equal(got, generate(llama.model(config), params, TOKENS, MASK, max_new_tokens=6))


@pytest.mark.parametrize("name", ["prompt", "p_tuning_mlp", "p_tuning_residual", "prefix", "prefix_projection"])
def test_gradients_exist_only_for_the_adapter_and_training_lowers_the_loss(name):
    method = METHODS[name]()
    adapter = method.init(jax.random.key(1), PARAMS)
    losses, grads = adam_steps(lambda a: target_xent(method.apply(PARAMS, a), CONFIG, TOKENS, MASK), adapter)
    checked = grads[1 if name == "p_tuning_residual" else 0]  # its zero last layer blocks step 0's inner grads
    assert jax.tree.structure(checked) == jax.tree.structure(adapter)
    for path, g in jpeft.tree.flatten(checked).items():
        assert float(jnp.abs(g).max()) > 0, path
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", ["p_tuning_mlp", "p_tuning_residual", "prefix_projection"])
def test_fold_removes_the_encoder_and_keeps_the_model(name):
    method = METHODS[name]()
    lib = prompt_lib if name.startswith("p_") else prefix_lib
    adapter = method.init(jax.random.key(1), PARAMS)
    folded = lib.fold(adapter)
    assert set(folded) == ({"prompt"} if lib is prompt_lib else {"prefix"})
    assert jax.tree.structure(lib.fold(folded)) == jax.tree.structure(folded)  # folding twice is a no-op
    full, _ = forward(method.apply(PARAMS, adapter), CONFIG, TOKENS, attention_mask_BxT=MASK)
    small, _ = forward(method.apply(PARAMS, folded), CONFIG, TOKENS, attention_mask_BxT=MASK)
    np.testing.assert_allclose(small, full, atol=1e-6)
    merged = jpeft.tree.flatten(method.merge(PARAMS, adapter))  # base + the folded hook entries
    assert not any(jpeft.ops.is_wrapper(x) for x in merged.values())
    hooks = {p: v for p, v in merged.items() if "/hooks/" in f"/{p}"}
    assert len(hooks) == (1 if lib is prompt_lib else 2 * CONFIG.num_layers)
    assert jpeft.param_report(PARAMS, folded).trainable < jpeft.param_report(PARAMS, adapter).trainable


def test_prompt_initialisations():
    table = PARAMS["embed_tokens"]["embedding"]
    text = jpeft.prompt_tuning(5, init_ids=[4, 9], model=MODEL).init(jax.random.key(0), PARAMS)["prompt"]["embeddings"]
    np.testing.assert_array_equal(text, table[jnp.array([4, 9, 4, 9, 4])])
    vocab = jpeft.prompt_tuning(5, model=MODEL).init(jax.random.key(0), PARAMS)["prompt"]["embeddings"]
    assert all(any(np.array_equal(row, t) for t in np.asarray(table)) for row in np.asarray(vocab))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    normal = jpeft.prompt_tuning(5, init="normal", model=MODEL).init(jax.random.key(0), abstract)
    assert normal["prompt"]["embeddings"].shape == (5, 16)
    assert jax.eval_shape(jpeft.prompt_tuning(5, model=MODEL).init, jax.random.key(0), abstract)["prompt"]["embeddings"].shape \
        == (5, 16)
    with pytest.raises(ValueError, match="only a shape"):
        jpeft.prompt_tuning(5, model=MODEL).init(jax.random.key(0), abstract)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        jpeft.prompt_tuning(5, init_ids=[40], model=MODEL).init(jax.random.key(0), PARAMS)
    for name in ("prefix", "prefix_projection", "p_tuning_lstm"):  # shape-only inits
        shapes = jax.eval_shape(METHODS[name]().init, jax.random.key(0), abstract)
        assert jax.tree.structure(METHODS[name]().init(jax.random.key(0), abstract)) == jax.tree.structure(shapes)


def _peft_prompt_encoder(encoder_type):
    import peft
    import torch

    torch.manual_seed(0)
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, token_dim=16,
                                      num_transformer_submodules=1, num_attention_heads=4, num_layers=2,
                                      encoder_reparameterization_type=encoder_type, encoder_hidden_size=8)
    return peft.PromptEncoder(config).eval()


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_encoder_matches_peft(encoder):
    import torch

    hf = _peft_prompt_encoder(encoder.upper())
    t = lambda x: jnp.asarray(x.detach().numpy())
    adapter = {"embedding": t(hf.embedding.weight)}
    dense = [m for m in hf.mlp_head if isinstance(m, torch.nn.Linear)]
    adapter["mlp"] = {f"dense_{i}": {"kernel": t(m.weight).T, "bias": t(m.bias)} for i, m in enumerate(dense)}
    if encoder == "lstm":
        lstm = hf.lstm_head
        weight = lambda name, i, sfx: t(getattr(lstm, f"{name}_l{i}{sfx}"))
        direction = lambda i, sfx: {"w_ih": weight("weight_ih", i, sfx).T, "w_hh": weight("weight_hh", i, sfx).T,
                                    "bias": weight("bias_ih", i, sfx) + weight("bias_hh", i, sfx)}
        adapter["lstm"] = {f"layer_{i}": {"forward": direction(i, ""), "backward": direction(i, "_reverse")}
                           for i in range(2)}
    adapter = {"prompt_encoder": adapter}
    ours = jpeft.p_tuning(N, encoder=encoder, hidden_size=8, model=MODEL).init(jax.random.key(0), PARAMS)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, adapter)
    with torch.no_grad():
        want = hf(torch.arange(N)[None])[0].numpy()
    np.testing.assert_allclose(prompt_lib.encode(adapter), want, atol=1e-5)
    # Every encoder weight gets a gradient (the model-level training test uses the MLP encoder).
    grads = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(prompt_lib.encode(a)))))(adapter)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_residual_p_tuning_starts_as_prompt_tuning_from_the_same_text(encoder):
    residual = jpeft.p_tuning(5, encoder=encoder, hidden_size=8, init_ids=[4, 9], residual=True, model=MODEL)
    adapter = residual.init(jax.random.key(3), PARAMS)
    assert "residual_mlp" in adapter["prompt_encoder"] and "mlp" not in adapter["prompt_encoder"]
    prompt = jpeft.prompt_tuning(5, init_ids=[4, 9], model=MODEL).init(jax.random.key(0), PARAMS)
    np.testing.assert_array_equal(prompt_lib.encode(adapter), prompt["prompt"]["embeddings"])
    # Once the encoder has moved, the virtual tokens are embedding + encoder(embedding).
    moved = jax.tree.map(lambda x: x + 0.1, adapter)
    plain = {"prompt_encoder": {**{k: v for k, v in moved["prompt_encoder"].items() if k != "residual_mlp"},
                                "mlp": moved["prompt_encoder"]["residual_mlp"]}}
    np.testing.assert_allclose(prompt_lib.encode(moved),
                               moved["prompt_encoder"]["embedding"] + prompt_lib.encode(plain), atol=1e-6)
    # A residual adapter is not a plain one, and the other way round.
    with pytest.raises(ValueError, match="not a p_tuning"):
        jpeft.p_tuning(5, encoder=encoder, hidden_size=8, model=MODEL).apply(PARAMS, adapter)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        jpeft.p_tuning(5, init_ids=[99], residual=True, model=MODEL).init(jax.random.key(0), PARAMS)
    with pytest.raises(ValueError, match="init_ids is empty"):
        jpeft.p_tuning(5, init_ids=[], model=MODEL)


def test_parameter_counts_match_peft():
    import peft
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)
    config = llama.LlamaConfig.from_hf(hf_config.to_dict())
    params = jax.eval_shape(llama.model(config).init, jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    MODEL = llama.model(config)  # noqa: N806 (the builders below read it)
    cases = [
        (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7), jpeft.prompt_tuning(7, model=MODEL)),
        (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7), jpeft.prefix_tuning(7, model=MODEL)),
        (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, prefix_projection=True,
                                 encoder_hidden_size=12), jpeft.prefix_tuning(7, projection=True, hidden_size=12, model=MODEL)),
        (peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, encoder_hidden_size=12),
         jpeft.p_tuning(7, hidden_size=12, model=MODEL)),
    ]
    for hf_peft_config, method in cases:
        torch.manual_seed(0)
        model = peft.get_peft_model(transformers.LlamaForCausalLM(hf_config), hf_peft_config)
        hf_trainable, _ = model.get_nb_trainable_parameters()
        ours = jpeft.param_report(params, method.init(jax.random.key(0), params)).trainable
        assert ours == hf_trainable, (method.name, ours, hf_trainable)
    assert jpeft.param_report(params, jpeft.prompt_tuning(7, model=MODEL).init(jax.random.key(0), params)).trainable == 7 * 16


def test_errors_are_clear():
    prompt = METHODS["prompt"]()
    adapter = prompt.init(jax.random.key(0), PARAMS)
    applied = prompt.apply(PARAMS, adapter)
    long_tokens = jnp.ones((1, 62), jnp.int32)  # 3 virtual + 62 > 64
    with pytest.raises(ValueError, match="exceed the model's context"):
        llama.forward(applied, CONFIG, long_tokens)
    jax.eval_shape(lambda p: llama.forward(p, CONFIG, long_tokens), PARAMS)  # without the prompt it fits
    with pytest.raises(ValueError, match="exceed the model's context"):
        generate(llama.model(CONFIG), applied, jnp.ones((1, 50), jnp.int32), max_new_tokens=12)
    with pytest.raises(ValueError, match="prepend_virtual"):
        llama.forward(applied, CONFIG, TOKENS, cache=llama.init_cache(CONFIG, 2, 20))
    with pytest.raises(ValueError, match="larger cache"):
        llama.forward(applied, CONFIG, TOKENS, cache=llama.init_cache(CONFIG, 2, 8), prepend_virtual=True)
    # Adapters for a model of another shape.
    small = llama.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=3, num_heads=2)
    small_params = llama.model(small).init(jax.random.key(0))
    with pytest.raises(ValueError, match="another model"):
        prompt.apply(small_params, adapter)
    prefix = METHODS["prefix"]()
    with pytest.raises(ValueError, match="another model"):
        prefix.apply(small_params, prefix.init(jax.random.key(0), PARAMS))
    bad_hook = {**PARAMS, "hooks": {"prompt": jnp.zeros((N, 8))}}
    with pytest.raises(ValueError, match="another model"):
        llama.forward(bad_hook, CONFIG, TOKENS)
    # Adapters of one method applied as another.
    lora = jpeft.lora(rank=2)
    with pytest.raises(ValueError, match="not a prompt_tuning adapter"):
        prompt.apply(PARAMS, lora.init(jax.random.key(0), PARAMS))
    with pytest.raises(ValueError, match="not a prefix_tuning adapter"):
        prefix.apply(PARAMS, adapter)
    with pytest.raises(ValueError, match="not a p_tuning"):
        jpeft.p_tuning(N, model=MODEL).apply(PARAMS, prefix.init(jax.random.key(0), PARAMS))
    with pytest.raises(ValueError, match="not a LoRA factor"):
        lora.apply(PARAMS, adapter)
    with pytest.raises(ValueError, match="already carry a 'prompt'"):
        prompt.apply(applied, adapter)
    with pytest.raises(ValueError, match="both a prompt"):
        llama.forward(prefix.apply(applied, prefix.init(jax.random.key(0), PARAMS)), CONFIG, TOKENS)
    # Bad settings.
    for build, message in [(lambda: jpeft.prompt_tuning(0, model=MODEL), "positive int"),
                           (lambda: jpeft.prompt_tuning(4, init="text", model=MODEL), "needs init_text"),
                           (lambda: jpeft.p_tuning(4, encoder="gru", model=MODEL), "encoder must be"),
                           (lambda: jpeft.prefix_tuning(4, init_std=0.0, model=MODEL), "init_std")]:
        with pytest.raises(ValueError, match=message):
            build()
