"""``python -m train.generate``: a tiny model, a jpeft and a PEFT adapter, rows checked against generate per row."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.checkpoint import save_adapter
from jpeft.io.peft import save_peft
from jpeft.models import generation, llama
from train import data
from train import generate as cli
from train import loading
from train.config import ModelConfig

MAX_NEW = 6


def random_adapter(method, params, seed, std):
    """An adapter with every leaf random (numpy: no random-number program to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(method.init, jax.random.key(0), params)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.normal(size=x.shape), x.dtype), shapes)


@pytest.fixture(scope="module")
def saved(mixing_hf_folder, tmp_path_factory):
    """The tiny model as the program loads it, a prompt-tuning adapter saved as ``python -m train`` saves one,
    and a LoRA adapter saved as a PEFT folder."""
    loaded = loading.load(ModelConfig(hf_folder=str(mixing_hf_folder)))
    model, params = loaded.model, loaded.params
    settings = {"num_virtual_tokens": 4, "init": "normal", "init_std": 0.5}
    prompt = jpeft.prompt_tuning(**settings, model=model)
    prompt_adapter = random_adapter(prompt, params, 1, std=0.5)
    tone = tmp_path_factory.mktemp("runs") / "tone" / "adapter"
    save_adapter(tone, prompt.saved_form(prompt_adapter),
                 metadata={"method": "prompt_tuning", **settings, "steps": 0, "model": {"hf_folder": "elsewhere"}})
    lora = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v|down)_proj/kernel", model=model)
    lora_adapter = random_adapter(lora, params, 3, std=0.1)
    news = tmp_path_factory.mktemp("news")
    save_peft(news, model, lora, params, lora_adapter)
    return {"loaded": loaded, "folder": str(mixing_hf_folder), "tone": str(tone), "news": str(news),
            "adapters": {"tone": (prompt, prompt_adapter), "news": (lora, lora_adapter)}}


@pytest.fixture
def loaded_once(saved, monkeypatch):
    """The program's model load answered with the fixture's model (the first test loads it for real)."""
    monkeypatch.setattr(loading, "load", lambda cfg: saved["loaded"])


def run(argv):
    out = io.StringIO()
    code = cli.main(argv, out=out)
    return code, out.getvalue()


def alone(saved, text, name) -> list[int]:
    """The tokens ``generation.generate`` makes for one prompt with one adapter (merged, for LoRA), up to EOS.

    Left-padded to 64 tokens, which padding does not change, so every reference compiles once per adapter kind.
    """
    loaded = saved["loaded"]
    tok = loaded.tokenizer
    ids = cli.encode(tok, text, raw=False)
    batch = data.prompt_batch([ids], pad_id=0, bucket_size=64, max_len=64)
    params = loaded.params
    if name != "base":
        method, adapter = saved["adapters"][name]
        params = jpeft.for_inference(method, params, adapter)
    out = [int(t) for t in generation.generate(loaded.model, params, batch.prompt_BxT, batch.prompt_mask_BxT,
                                               max_new_tokens=MAX_NEW, eos_id=tok.eos_token_id)[0]]
    return out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def test_rows_equal_generate_with_each_adapter_alone(saved, capsys):
    """Rows with a PEFT LoRA, a jpeft prompt adapter and the base in mixed batches, streamed as JSON lines."""
    prompts = [("Write a headline: rail strike ends", "news"), ("Say hello.", "tone"), ("Say hello.", "base"),
               ("Another article about the markets", "tone")]
    argv = [f"model.hf_folder={saved['folder']}", "--load", f"tone={saved['tone']}", "--load",
            f"news={saved['news']}", "--max-new-tokens", str(MAX_NEW), "--jsonl", "--batch-size", "3"]
    for text, name in prompts:
        argv += ["--prompt", text, "--adapter", name]
    compiled = generation._step_jit._cache_size()
    code, out = run(argv)
    assert code == 0, capsys.readouterr().err
    assert generation._step_jit._cache_size() == compiled + 1  # two batches (3 rows, then 1 padded to 3), one mix
    assert "adapter 'tone' was trained on model {'hf_folder': 'elsewhere'}" in capsys.readouterr().err
    records = [json.loads(line) for line in out.splitlines()]
    finals = {r["row"]: r for r in records if "completion" in r}
    assert sorted(finals) == [0, 1, 2, 3]
    for row in finals:  # each row's pieces are printed before its final record
        assert records.index(finals[row]) > max((i for i, r in enumerate(records) if r["row"] == row and "text" in r),
                                                default=-1)
    tok = saved["loaded"].tokenizer
    for row, (text, name) in enumerate(prompts):
        streamed = "".join(r["text"] for r in records if r["row"] == row and "text" in r)
        assert finals[row]["completion"] == streamed and finals[row]["adapter"] == name
        want = alone(saved, text, name)
        assert finals[row]["tokens"] == want, f"row {row} ({name})"
        assert finals[row]["completion"] == tok.decode(want, skip_special_tokens=True)
    # The adapters change what the rows say (rows 1 and 2 have the same prompt).
    assert finals[1]["tokens"] != finals[2]["tokens"]


def test_one_row_streams_plain_text(saved, loaded_once, tmp_path, monkeypatch):
    """One row prints its text as it is decoded: the output grows while the decoder is still stepping."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Say hello.", "adapter": "news"}) + "\n")
    out, printed = io.StringIO(), []
    real_stream = generation.stream

    def watched(*args, **kwargs):
        for step in real_stream(*args, **kwargs):
            yield step
            printed.append(len(out.getvalue()))  # after the program has handled this step

    monkeypatch.setattr(generation, "stream", watched)
    code = cli.main([f"model.hf_folder={saved['folder']}", "--load", f"news={saved['news']}", "--prompts",
                     str(rows), "--max-new-tokens", str(MAX_NEW)], out=out)
    assert code == 0
    want = saved["loaded"].tokenizer.decode(alone(saved, "Say hello.", "news"), skip_special_tokens=True)
    assert out.getvalue() == want + "\n"
    assert len(printed) >= 2 and 0 < printed[0] < printed[-1] <= len(want), printed


def test_bad_input_exits_2_with_one_message(saved, loaded_once, tmp_path, capsys):
    model_arg = f"model.hf_folder={saved['folder']}"

    def fails(argv, *needles):
        code, out = run(argv)
        err = capsys.readouterr().err
        assert code == 2 and out == "", err
        for needle in needles:
            assert needle in err, err

    fails([model_arg, "--load", f"news={saved['news']}", "--prompt", "Hi", "--adapter", "sport"],
          "config error: a row names the adapter 'sport', which is not loaded; loaded: ['news']", "--load sport=")
    fails([model_arg, "--load", saved["news"], "--prompt", "Hi"], "is not NAME=FOLDER")
    fails([model_arg, "--load", f"x={tmp_path / 'missing'}", "--prompt", "Hi"], "checkpoint error", "no such folder")
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT"}))
    fails([model_arg, "--load", f"x={ia3}", "--prompt", "Hi", "--adapter", "x"],
          "PEFT adapters of type 'BOFT' are not supported; jpeft reads only ADALORA, IA3, LOHA, LOKR, LORA")
    fails([model_arg, "--load", f"x={tmp_path}", "--prompt", "Hi"], "is neither a jpeft adapter folder")
    # Adapters made for another model: a PEFT LoRA and a jpeft prompt of another width.
    other = llama.model(llama.LlamaConfig(vocab_size=saved["loaded"].model.config.vocab_size, hidden_size=32,
                                          intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2))
    other_params = jax.eval_shape(other.init, jax.random.key(0))
    lora = jpeft.lora(rank=2, model=other)
    save_peft(tmp_path / "peft_other", other, lora, other_params, random_adapter(lora, other_params, 0, std=0.1))
    fails([model_arg, "--load", f"x={tmp_path / 'peft_other'}", "--prompt", "Hi"], "--load x=", "does not fit")
    prompt = jpeft.prompt_tuning(3, init="normal", model=other)
    save_adapter(tmp_path / "jpeft_other", random_adapter(prompt, other_params, 0, std=0.5),
                 metadata={"method": "prompt_tuning", "num_virtual_tokens": 3, "init": "normal"})
    fails([model_arg, "--load", f"x={tmp_path / 'jpeft_other'}", "--prompt", "Hi"], "does not fit this base model",
          "shape mismatch")
    fails([model_arg, "train.steps=3", "--prompt", "Hi"], "is not a model setting")
    context = saved["loaded"].model.max_positions
    fails([model_arg, "--prompt", "Hi", "--prompt", "Hi " * context, "--max-new-tokens", "1"],
          "row 1's prompt is", f"the model's context of {context} tokens", "nothing is truncated")
    fails([model_arg, "--prompt", "a", "--prompt", "b", "--adapter", "x", "--adapter", "y", "--adapter", "z"],
          "3 --adapter for 2 --prompt")


def test_peft_folders_of_ia3_and_the_prompt_methods_are_served(saved, loaded_once, tmp_path, capsys):
    """``--load NAME=<PEFT folder>`` for IA3, prompt tuning, P-tuning and prefix tuning: each row makes the tokens
    ``generation.generate`` makes with that adapter alone (a prefix cannot differ per row: a run of its own)."""
    model, params = saved["loaded"].model, saved["loaded"].params
    methods = {"ia3": jpeft.ia3(model=model),
               "prompt": jpeft.prompt_tuning(3, init="normal", model=model),
               "ptuning": jpeft.p_tuning(3, hidden_size=8, model=model),
               "prefix": jpeft.prefix_tuning(3, init="normal", model=model)}
    adapters, got = {}, {}
    for seed, (name, method) in enumerate(methods.items()):
        adapter = random_adapter(method, params, seed, std=0.5)
        if name == "ia3":
            adapter = jax.tree.map(lambda x: x + 1.0, adapter)  # scales around 1
        save_peft(tmp_path / name, model, method, params, adapter)
        adapters[name] = (method, method.saved_form(adapter))
    for names in (["ia3", "prompt", "ptuning"], ["prefix"]):
        argv = [f"model.hf_folder={saved['folder']}", "--max-new-tokens", str(MAX_NEW), "--jsonl"]
        for name in names:
            argv += ["--load", f"{name}={tmp_path / name}", "--prompt", "Say hello.", "--adapter", name]
        code, out = run(argv)
        assert code == 0, capsys.readouterr().err
        got.update({r["adapter"]: r["tokens"] for r in map(json.loads, out.splitlines()) if "completion" in r})
    reference = {**saved, "adapters": adapters}
    assert got == {name: alone(reference, "Say hello.", name) for name in methods}
    assert len({tuple(t) for t in got.values()} | {tuple(alone(saved, "Say hello.", "base"))}) > 2


def test_bad_options_exit_2_before_anything_is_generated(saved, loaded_once, tmp_path, capsys, monkeypatch):
    """Every option is checked up front: one message, exit 2, and no token generated."""
    monkeypatch.setattr(generation, "stream", lambda *a, **k: pytest.fail("generated despite a bad option"))
    model_arg = f"model.hf_folder={saved['folder']}"
    vocab = saved["loaded"].model.config.vocab_size

    def fails(argv, *needles):
        code, out = run([model_arg, *argv])
        err = capsys.readouterr().err
        assert code == 2 and out == "", err
        assert err.count("\n") == 1 and err.startswith("config error: "), err
        for needle in needles:
            assert needle in err, err

    fails(["--prompt", "Hi", "--temperature", "nan"], "--temperature must be a finite number >= 0")
    fails(["--prompt", "Hi", "--temperature", "inf"], "--temperature must be a finite number >= 0")
    fails(["--prompt", "Hi", "--temperature", "-1"], "--temperature must be a finite number >= 0")
    fails(["--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0")
    fails(["--prompt", "Hi", "--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3")
    fails(["--prompt", "Hi", "--batch-size", "0"], "--batch-size must be at least 1")
    fails(["--prompt", "Hi", "--temperature", "1", "--top-k", "0"], "--top-k must be at least 1")
    fails(["--prompt", "Hi", "--top-k", "5"], "--temperature 0 is greedy")
    fails(["--prompt", "Hi", "--seed", "-1"], "--seed must be in [0, 2**32)")
    fails(["--prompt", "Hi", "--seed", str(2 ** 40)], "--seed must be in [0, 2**32)")
    fails(["--prompt", "Hi", "--temperature", "1", "--top-k", str(vocab + 1)],
          f"--top-k {vocab + 1} is more than the model's vocabulary of {vocab} tokens")
    fails(["--raw", "--prompt", "Hi", "--prompt", ""], "row 1's prompt is empty", "drop --raw")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": ""}) + "\n")
    fails(["--raw", "--prompts", str(rows)], "row 0's prompt is empty")


def test_an_encoder_only_model_is_refused(saved, monkeypatch, capsys):
    """BERT reads text; it cannot write any: one message, exit 2."""
    from jpeft.models import bert

    encoder = bert.model(bert.BertConfig(vocab_size=saved["loaded"].model.config.vocab_size, hidden_size=8,
                                         intermediate_size=8, num_layers=1, num_heads=2))
    monkeypatch.setattr(loading, "load", lambda cfg: saved["loaded"]._replace(
        model=encoder, params=jax.eval_shape(encoder.init, jax.random.key(0))))
    code, out = run([f"model.hf_folder={saved['folder']}", "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "the 'bert' model cannot generate text" in err and "encoder-only" in err, err


def test_prompt_tuning_rows_are_counted_at_their_real_length(saved, monkeypatch, capsys):
    """Virtual tokens + the real prompt + new tokens fill the context exactly: allowed (the padded bucket is not
    what counts), and one token more is refused."""
    import dataclasses

    loaded = saved["loaded"]
    short = llama.model(dataclasses.replace(loaded.model.config, max_position_embeddings=64))
    monkeypatch.setattr(loading, "load", lambda cfg: loaded._replace(model=short))
    text = "Write a headline for this article: markets rally as rail strike ends"
    ids = cli.encode(loaded.tokenizer, text, raw=True)
    virtual = loaded.model.virtual_tokens(saved["adapters"]["tone"][0].apply(loaded.params, saved["adapters"]["tone"][1]))
    assert len(ids) % 16, "the prompt's bucket must be longer than the prompt for this test"
    new = 64 - virtual - len(ids)
    argv = [f"model.hf_folder={saved['folder']}", "--load", f"tone={saved['tone']}", "--raw", "--prompt", text,
            "--adapter", "tone", "--jsonl"]
    code, out = run(argv + ["--max-new-tokens", str(new)])
    assert code == 0, capsys.readouterr().err
    method, adapter = saved["adapters"]["tone"]
    want = [int(t) for t in generation.generate(short, method.apply(loaded.params, adapter), jnp.asarray([ids]),
                                                max_new_tokens=new, eos_id=loaded.tokenizer.eos_token_id)[0]]
    eos = loaded.tokenizer.eos_token_id
    want = want[:want.index(eos)] if eos in want else want
    assert json.loads(out.splitlines()[-1])["tokens"] == want
    code, out = run(argv + ["--max-new-tokens", str(new + 1)])
    err = capsys.readouterr().err
    assert code == 2 and out == "", err
    assert f"row 0's prompt is {len(ids)} tokens after {virtual} virtual tokens" in err, err
