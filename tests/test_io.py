"""jpeft.io: Hugging Face folders and GGUF files, including the real SmolLM2-135M GGUF."""

import dataclasses
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jpeft import assets
from jpeft.io import CheckpointError, load_gguf, load_hf, save_hf
from jpeft.models.llama_formats import unpermute_rope_rows
from jpeft.models import generate, llama
from jpeft import stack

TINY = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                         num_kv_heads=2)


def _saved_tiny(folder, config=TINY, seed=0):
    params = llama.model(config).init(jax.random.key(seed), stddev=0.3)
    save_hf(folder, llama.model(config), params)
    return params


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- HF folders: errors


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"1 missing \(layers_1/mlp/up_proj/kernel\)"),
        (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(3, np.float32)}),
         r"1 unexpected \(model.layers.0.mlp.extra.weight\)"),
        (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.ones((8, 15), np.float32)}),
         r"model.layers.0.self_attn.k_proj.weight -> layers_0/self_attn/k_proj/kernel: "
         r"got \(15, 8\), expected \(16, 8\)"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_load_hf_names_bad_tensors(tmp_path, edit, expected):
    _saved_tiny(tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(CheckpointError, match=expected):
        load_hf(tmp_path)


def test_load_hf_reports_all_problems_at_once(tmp_path):
    _saved_tiny(tmp_path)

    def break_many(t):
        for i in range(2):
            t.pop(f"model.layers.{i}.input_layernorm.weight")
        t["model.layers.7.mlp.up_proj.weight"] = np.ones((24, 16), np.float32)

    _edit_weights(tmp_path, break_many)
    with pytest.raises(CheckpointError, match=r"2 missing .*1 unexpected \(model.layers.7.mlp.up_proj.weight\)"):
        load_hf(tmp_path)


def test_load_hf_needs_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="No config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
    with pytest.raises(CheckpointError, match="No model.safetensors"):
        load_hf(tmp_path)


# ----------------------------------------------------------------------------- HF folders: round trips


def test_save_then_load_round_trips_including_scan_and_bfloat16(tmp_path):
    params = _saved_tiny(tmp_path)
    _, loaded = load_hf(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    model, stacked = load_hf(tmp_path, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, stacked, stack.stack_layers(params, 2))
    model16, half = load_hf(tmp_path, dtype=jnp.bfloat16)
    assert model16.config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    save_hf(tmp_path / "again", model, stacked)  # stacked params are unstacked on save
    jax.tree.map(np.testing.assert_array_equal, load_hf(tmp_path / "again")[1], params)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_saved_folder_loads_in_transformers_with_same_logits(tmp_path, model_type):
    config = dataclasses.replace(TINY, model_type=model_type, attention_bias=True,
                                 attention_out_bias=model_type == "llama", tie_word_embeddings=True)
    params = _saved_tiny(tmp_path, config)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    out, _ = jax.jit(llama.forward)(params, config, jnp.asarray(tokens))
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(hf_config)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _, params = load_hf(tmp_path)
    state = model.state_dict()
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["down_proj"]["kernel"],
                                  state["model.layers.1.mlp.down_proj.weight"].numpy().T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], state["lm_head.weight"].numpy().T)


# ----------------------------------------------------------------------------- GGUF: synthetic files


def _llama_cpp_permute(weight_RxC, num_heads):
    """What llama.cpp's converter does to q/k rows (the inverse of unpermute_rope_rows)."""
    half = weight_RxC.shape[0] // num_heads // 2
    return weight_RxC.reshape(num_heads, 2, half, -1).swapaxes(1, 2).reshape(weight_RxC.shape)


def _write_gguf(path, config, params, *, skip=(), arch="llama"):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = {"embed_tokens/embedding": "token_embd.weight", "norm/scale": "output_norm.weight",
             "lm_head/kernel": "output.weight"}
    blocks = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for path_, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path_]
        array = np.asarray(leaf, np.float32)
        if keys[0].startswith("layers_"):
            name = f"blk.{keys[0][7:]}.{blocks[keys[-2]]}.weight"
        else:
            name = names["/".join(keys)]
        array = array.T if keys[-1] == "kernel" else array
        if keys[-2] in ("q_proj", "k_proj"):
            heads = config.num_heads if keys[-2] == "q_proj" else config.num_kv_heads
            array = _llama_cpp_permute(array, heads)
        if name not in skip:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)  # (rows, in); the function works on the last axis
    np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(weight, 3).T, 3).T, weight)
    np.testing.assert_array_equal(unpermute_rope_rows(weight.T, 3, inverse=True).T, _llama_cpp_permute(weight, 3))


def test_gguf_round_trip_and_errors(tmp_path):
    config = dataclasses.replace(TINY, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
    params = llama.model(config).init(jax.random.key(0), stddev=0.3)
    _write_gguf(tmp_path / "ok.gguf", config, params)
    loaded_model, loaded = load_gguf(tmp_path / "ok.gguf")
    assert loaded_model.config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    _write_gguf(tmp_path / "missing.gguf", config, params, skip={"blk.1.attn_k.weight"})
    with pytest.raises(CheckpointError, match=r"missing \(layers_1/self_attn/k_proj/kernel\)"):
        load_gguf(tmp_path / "missing.gguf")
    _write_gguf(tmp_path / "gpt2.gguf", config, params, arch="gpt2")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported; supported: \\['llama'\\]"):
        load_gguf(tmp_path / "gpt2.gguf")


# ----------------------------------------------------------------------------- GGUF: the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2(tokenizer):
    """(config, params with scan_layers, tokenizer) of SmolLM2-135M-Instruct (Q4_1 GGUF).

    The tokenizer is conftest's, made by the same ``load_gguf_tokenizer`` (16 s each time).
    """
    model, params = load_gguf(assets.smollm2_gguf_path(), scan_layers=True)
    return model.config, params, tokenizer


@pytest.fixture(scope="module")
def smollm2_torch():
    path = assets.smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def test_smollm2_config(smollm2):
    config, _, tokenizer = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings and config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>"


def test_smollm2_weights_equal_transformers_dequantization(smollm2, smollm2_torch):
    """Every tensor (q/k un-permuted, kernels transposed) equals transformers' own GGUF conversion."""
    config, params, _ = smollm2
    state = smollm2_torch.state_dict()
    flat = stack.unstack_layers(params, config.num_layers)
    for i in (0, config.num_layers - 1):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            np.testing.assert_array_equal(flat[f"layers_{i}"]["self_attn"][proj]["kernel"],
                                          state[f"model.layers.{i}.self_attn.{proj}.weight"].numpy().T)
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], state["model.embed_tokens.weight"].numpy())


def test_smollm2_logits_match_transformers(smollm2, smollm2_torch):
    config, params, tokenizer = smollm2
    text = "The Eiffel Tower was finished in 1889 and is now one of the most visited monuments in the world."
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    with torch.no_grad():
        ref = smollm2_torch(torch.tensor(ids)).logits.numpy()
    out, _ = jax.jit(llama.forward)(params, config, jnp.asarray(ids, jnp.int32))
    diff = np.abs(np.asarray(out) - ref).max()
    print(f"SmolLM2-135M: {ids.shape[1]} tokens, max |jpeft - transformers| = {diff:.2e} "
          f"(max |logit| {np.abs(ref).max():.1f})")
    assert diff < 1e-3
    assert (np.asarray(out).argmax(-1) == ref.argmax(-1)).all()


def test_smollm2_answers_factual_questions_in_a_padded_batch(smollm2):
    config, params, tokenizer = smollm2
    qa = {"What is the capital of France?": "Paris", "What is 2 + 2?": "4", "What is the capital of Japan?": "Tokyo"}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in qa]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="np", padding=True)
    assert batch["attention_mask"].min() == 0  # the batch really is left-padded
    out = generate(llama.model(config), params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                         max_new_tokens=20, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(np.asarray(out), skip_special_tokens=True)
    print(answers)
    for answer, expected in zip(answers, qa.values()):
        assert expected in answer
