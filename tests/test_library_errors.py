"""Bad input to the library's public functions: one ``ValueError`` (or a jpeft error) that names the problem.

Tiny models; nothing here compiles more than a few small programs.
"""

import jax
import jax.numpy as jnp
import pytest

from jpeft.models import bert, generation, llama

LLAMA = llama.model(llama.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2))
PARAMS = LLAMA.init(jax.random.key(0))
PROMPT = jnp.ones((1, 3), jnp.int32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=1.0, top_k=0), "top_k must be a positive int or None"),
    (dict(temperature=1.0, top_k=17), "top_k=17 is more than the vocabulary's 16 tokens"),
])
def test_generation_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generation.generate(LLAMA, PARAMS, PROMPT, max_new_tokens=2, key=jax.random.key(0), **kwargs)


def test_generation_needs_a_prompt_token_and_a_decoder():
    with pytest.raises(ValueError, match="at least one token"):
        generation.generate(LLAMA, PARAMS, jnp.ones((1, 0), jnp.int32), max_new_tokens=2)
    encoder = bert.model(bert.BertConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                                         num_heads=2))
    with pytest.raises(ValueError, match="'bert' model cannot generate text"):
        list(generation.stream(encoder, jax.eval_shape(encoder.init, jax.random.key(0)), PROMPT, max_new_tokens=2))


def test_model_loaders_name_a_missing_folder_or_a_bad_file(tmp_path):
    """Every loader that takes a path: a missing path, a folder for a file (or the reverse), a garbled file."""
    from jpeft.errors import CheckpointError
    from jpeft.io.gguf import load_gguf, load_gguf_tokenizer
    from jpeft.io.hf import load_hf
    from jpeft.io.peft import load_peft

    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_bytes(b"\x00 not a model")
    cases = [
        (load_hf, tmp_path / "missing", "No Hugging Face model folder at .*missing: it does not exist"),
        (load_hf, tmp_path / "file", "it is a file; give the folder that holds config.json"),
        (load_hf, tmp_path / "empty", "No config.json in .*empty"),
        (load_gguf, tmp_path / "missing.gguf", "does not exist"),
        (load_gguf, tmp_path / "empty", "is a folder; give the .gguf file in it"),
        (load_gguf, tmp_path / "file", "is not a readable GGUF file"),
        (load_gguf_tokenizer, tmp_path / "missing.gguf", "does not exist"),
        (load_gguf_tokenizer, tmp_path / "file", "is not a readable GGUF file"),
        (lambda f: load_peft(f, LLAMA, PARAMS), tmp_path / "missing", "is not a PEFT adapter folder"),
        (lambda f: load_peft(f, LLAMA, PARAMS), tmp_path / "empty", "adapter_config.json is missing"),
    ]
    for load, path, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load(path)


def test_a_dtype_setting_must_name_a_float_dtype():
    """Every builder whose ``dtype`` defaults to a dtype: a name that is not one is refused before anything runs."""
    from jpeft.methods import registry

    with_dtype = [n for n in registry.names() if "dtype" in registry.settings(n)]
    assert {"lora", "ia3", "prompt_tuning"} <= set(with_dtype)
    for name in with_dtype:
        assert registry.check_settings(name, {"dtype": "bfloat16"}) == {"dtype": "bfloat16"}
        for bad in ("floatx", "int8", 3):
            with pytest.raises(registry.SettingsMappingError, match="is not a floating-point dtype") as info:
                registry.validate(name, {"dtype": bad})
            assert info.value.setting == "dtype"


def test_prompt_tuning_refuses_a_non_positive_init_std():
    from jpeft.methods import registry

    for bad in (0.0, -1.0):
        with pytest.raises(registry.SettingsMappingError, match="must be > 0") as info:
            registry.validate("prompt_tuning", {"init_std": bad})
        assert info.value.setting == "init_std"


def test_savers_refuse_a_file_for_a_folder_and_keep_it(tmp_path):
    import jpeft
    from jpeft.io.hf import save_hf
    from jpeft.io.peft import save_peft

    target = tmp_path / "taken"
    target.write_bytes(b"keep me")
    method = jpeft.lora(rank=2, targets=r".*q_proj/kernel")
    adapter = method.init(jax.random.key(0), PARAMS)
    for save in (lambda f: save_hf(f, LLAMA, PARAMS), lambda f: save_peft(f, LLAMA, method, PARAMS, adapter)):
        for folder, message in ((target, "that path is a file, not a folder"),
                                (target / "inner", "is inside .*taken', which is a file")):
            with pytest.raises(ValueError, match=message):
                save(folder)
    assert target.read_bytes() == b"keep me"


def test_an_interrupted_write_leaves_the_earlier_file_whole(tmp_path):
    from jpeft.io.writing import write_whole

    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"the good save")

    def crash_half_way(tmp):
        tmp.write_bytes(b"half of")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_whole(path, crash_half_way)
    assert path.read_bytes() == b"the good save"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    write_whole(path, lambda tmp: tmp.write_bytes(b"the new save"))
    assert path.read_bytes() == b"the new save"
