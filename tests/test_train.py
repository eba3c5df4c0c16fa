"""Tests for the training program: config validation, data, and tiny end-to-end runs."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train import config as config_lib
from train import data
from train.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures


def _write(path, text):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- config


def test_config_defaults_and_overrides(tmp_path):
    cfg = config_lib.from_dict({"name": "x", "train": {"steps": 30, "lr": "1e-3"}})
    assert cfg.train.lr == 1e-3  # PyYAML leaves 1e-3 a string: coerced for float keys
    cfg = config_lib.apply_overrides(cfg, ["lora.rank=4", f"data.dir={tmp_path}", "train.lr=2e-4"])
    assert (cfg.lora.rank, cfg.method, cfg.data.dir, cfg.train.lr) == (4, "lora", str(tmp_path), 2e-4)
    assert config_lib.apply_overrides(cfg, ["method=full", "lora=null"]).lora.rank == 8  # the section dropped
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3


def test_shipped_configs_are_valid():
    for name in ("smollm2_bbc_lora", "smollm2_bbc_full"):
        cfg = config_lib.load_config(str(REPO / "configs" / f"{name}.yaml"))
        assert cfg.name == name and cfg.method == name.rsplit("_", 1)[1]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"stepz": 3}}, r"unknown key 'train.stepz'.*did you mean 'steps'"),
        ({"modle": {}}, r"unknown key 'modle'.*did you mean 'model'"),
        ({"lora": {"rank": 0}}, r"'lora.rank': 0 must be a positive integer"),
        ({"lora": {"rank": 2.5}}, r"'lora.rank': 2.5 is a float, it needs a int"),
        ({"train": {"lr": -1.0}}, r"'train.lr': -1.0 must be > 0"),
        ({"train": {"lr": "fast"}}, r"'train.lr': 'fast' is a str"),
        ({"train": {"steps": True}}, r"'train.steps': True is a bool"),
        ({"method": "lorra"}, r"'method': 'lorra' must be one of .*'lora'.*did you mean 'lora'"),
        ({"model": {"gguf": "a.gguf", "hf_folder": "b"}}, r"only one of .*gguf, hf_folder"),
        ({"train": "fast"}, r"'train' must be a mapping"),
    ],
)
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_dict(raw)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", r"unknown key 'train.stepz'"),
        ("trian.steps=3", r"unknown key 'trian'.*did you mean 'train'"),
        ("lora.rank=-2", r"'lora.rank': -2 must be a positive integer"),
        ("train.steps", r"not of the form key=value"),
    ],
)
def test_bad_overrides(override, message):
    cfg = config_lib.from_dict({})
    with pytest.raises(ConfigError, match=message):
        config_lib.apply_overrides(cfg, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        config_lib.load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="unknown key 'eval.top_k'"):
        config_lib.load_config(_write(tmp_path / "bad.yaml", "eval:\n  top_k: 3\n"))


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        ("train:\n  stepz: 3\n", [], "unknown key 'train.stepz'"),
        ("name: x\n", ["lora.rank=0"], "'lora.rank': 0 must be a positive integer"),
        ("name: x\n", ["model.source=null", "model.gguf=/no/such/model.gguf"], "model.gguf='/no/such/model.gguf' does not exist"),
    ],
)
def test_cli_exits_2_and_writes_nothing(tmp_path, yaml_text, overrides, message):
    path = _write(tmp_path / "c.yaml", yaml_text)
    out_dir = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", path, f"out_dir={out_dir}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize("yaml_text, overrides, message", [
    ("name: x\nmethod: loha\n", ["lora.rank=2"],
     "unknown key 'lora' for this run: it is the section of the method 'lora', but the run's method is 'loha'"),
    ("name: x\nlora:\n  rank: 2\n", ["method=loha"], "the run's method is 'loha'"),
    ("name: x\n", ["classify.classifier_input=cls"], "the run's task is 'headlines'"),
    ("", [], "is empty"),
    ("# nothing but a comment\n", [], "is empty"),
])
def test_a_setting_the_run_would_not_read_exits_2_and_writes_nothing(tmp_path, capsys, yaml_text, overrides,
                                                                    message):
    """A section of a method or task the run does not use is refused like an unknown key, and so is an empty
    config file (it would start a run with every default). A missing model file would stop such a run later:
    it must not be the first complaint."""
    from train import __main__ as cli

    out_dir = tmp_path / "runs"
    code = cli.main(["--config", _write(tmp_path / "c.yaml", yaml_text), f"out_dir={out_dir}",
                     "model.gguf=/no/such/model.gguf", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


# ---------------------------------------------------------------- data


def test_decode_and_parse():
    assert data.decode_text("caf\u00e9".encode("utf-8")) == "caf\u00e9"
    assert data.decode_text(b"\xa3100m deal") == "\u00a3100m deal"  # Latin-1 pound sign
    assert data.parse_article("\n\nTitle here \n\nPara one.\n\n Para two.\n") == ("Title here", "Para one.\nPara two.")


def test_split_is_fixed_disjoint_and_complete(bbc_dir):
    articles = data.load_bbc(bbc_dir)
    assert len(articles) == 2225
    assert sorted({a.category for a in articles}) == ["business", "entertainment", "politics", "sports", "tech"]
    split = data.split_articles(articles, seed=0, val_fraction=0.05, test_fraction=0.1)
    again = data.split_articles(list(reversed(articles)), seed=0, val_fraction=0.05, test_fraction=0.1)
    keys = [[a.key for a in part] for part in split]
    assert keys == [[a.key for a in part] for part in again]  # independent of input order
    train, val, test = (set(k) for k in keys)
    assert not (train & val or train & test or val & test)
    assert train | val | test == {a.key for a in articles}
    assert (len(test), len(val)) == (223, 112)
    other = data.split_articles(articles, seed=1, val_fraction=0.05, test_fraction=0.1)
    assert {a.key for a in other.test} != test


def test_loss_mask_covers_only_headline_and_eos(bbc_dir, tokenizer):
    articles = data.load_bbc(bbc_dir)[:6]
    fmt = data.PromptFormat(tokenizer, max_article_tokens=40, max_headline_tokens=24)
    encoded = fmt.encode(articles)
    batch = data.train_batch(encoded, pad_id=fmt.eos_id, bucket_size=32, max_len=fmt.max_len - 1, max_answer=25)
    assert batch.tokens_BxT.shape[1] % 32 == 0 or batch.tokens_BxT.shape[1] == fmt.max_len - 1
    for b, article in enumerate(articles):
        mask = batch.loss_mask_BxT[b] > 0
        answer = tokenizer.decode(batch.targets_BxT[b][mask])
        assert answer == article.headline + tokenizer.eos_token
        positions = batch.answer_positions_BxA[b]
        np.testing.assert_array_equal(positions[positions >= 0], np.flatnonzero(mask))
        prompt_text = tokenizer.decode(batch.tokens_BxT[b][: len(encoded[b].prompt)])
        assert "Write a headline for this article." in prompt_text and prompt_text.endswith("assistant\n")
        assert batch.attention_mask_BxT[b].sum() == len(encoded[b].prompt) + len(encoded[b].answer) - 1
    assert fmt.decode(encoded[0].answer + [5, 6]) == articles[0].headline


def test_prompt_batch_is_left_padded():
    batch = data.prompt_batch([[5, 6, 7], [8]], pad_id=0, bucket_size=4, max_len=16)
    np.testing.assert_array_equal(batch.prompt_BxT, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(batch.prompt_mask_BxT, [[0, 1, 1, 1], [0, 0, 0, 1]])


# ---------------------------------------------------------------- end to end


def _tiny_run_config(tmp_path, folder, bbc_dir, method, **train):
    return config_lib.from_dict({
        "name": f"tiny_{method}",
        "method": method,
        "run_dir": str(tmp_path / method),
        "progress": False,
        "model": {"hf_folder": str(folder)},
        "lora": {"rank": 4, "alpha": 8, "targets": ".*/(q|k|v|o|gate|up|down)_proj/kernel"},
        "data": {"dir": str(bbc_dir), "max_article_tokens": 24, "max_headline_tokens": 12, "bucket_size": 32,
                 "max_train_articles": 8},
        "train": {"steps": 12, "batch_size": 4, "warmup_steps": 1, "eval_every": 6, "val_batches": 1, **train},
        "eval": {"test_articles": 4, "batch_size": 4, "max_new_tokens": 4},
    })


@pytest.mark.parametrize("method, lr", [("lora", 3e-2), pytest.param("full", 3e-3, marks=pytest.mark.slow)])
def test_tiny_run_end_to_end(tmp_path, tiny_hf_folder, bbc_dir, method, lr):
    import jpeft
    from jpeft.checkpoint import restore_adapter
    from train import loading, run

    cfg = _tiny_run_config(tmp_path, tiny_hf_folder, bbc_dir, method, lr=lr)
    summary = run.run(cfg)
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 6, 12]
    assert [r["model"] for r in records if r["kind"] == "rouge"][0] == "base"
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {"config.yaml", "summary.json", "predictions_tuned.jsonl"} <= set(os.listdir(run_dir))

    loaded = loading.load(cfg.model)
    method_obj = run.make_method(cfg, loaded.model)
    like = jax.eval_shape(method_obj.init, jax.random.key(0), loaded.params)
    adapter, meta = restore_adapter(run_dir / "adapter", like=like)
    assert meta["method"] == method
    counts = jpeft.param_report(loaded.params, adapter)
    assert counts.trainable == next(r for r in records if r["kind"] == "params")["trainable"]
    if method == "lora":
        assert meta["rank"] == 4 and counts.percent < 10
        assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adapter))
    else:
        assert counts.trainable == counts.total


def test_bfloat16_model_computes_in_bfloat16_and_trains_a_float32_adapter(tmp_path, tiny_hf_folder, bbc_dir):
    """Also with the gradient accumulated over two micro-batches (train.micro_batches)."""
    from jpeft.checkpoint import restore_adapter
    from train import loading, run

    cfg = config_lib.apply_overrides(_tiny_run_config(tmp_path, tiny_hf_folder, bbc_dir, "lora", lr=3e-2),
                                  ["model.dtype=bfloat16", "eval.test_articles=0", "train.micro_batches=2"])
    loaded = loading.load(cfg.model)
    assert loaded.config.compute_dtype == jax.numpy.bfloat16
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jax.numpy.dtype("bfloat16")}
    summary = run.run(cfg, loaded=loaded)
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    adapter, _ = restore_adapter(Path(summary["run_dir"]) / "adapter")
    assert {x.dtype for x in jax.tree.leaves(adapter)} == {np.dtype(np.float32)}


def test_train_step_takes_frozen_params_as_arguments():
    import jpeft
    from jpeft.models import llama
    from train import trainer
    from train.tasks.headlines import answer_xent

    c = llama.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, tie_word_embeddings=True, scan_layers=True)
    params = llama.model(c).init(jax.random.key(0))
    method = jpeft.lora(rank=2, alpha=4)
    adapter = method.init(jax.random.key(1), params)
    cfg = config_lib.from_dict({}).train
    optimizer, _ = trainer.make_optimizer(cfg)
    step = trainer.make_train_step(method, llama.model(c), optimizer, sums=answer_xent)
    encoded = [data.Encoded([1, 2, 3, 4], [5, 6, 7]), data.Encoded([1, 2], [8, 9])]
    batch = data.train_batch(encoded, pad_id=0, bucket_size=8, max_len=16, max_answer=4)
    args = (adapter, optimizer.init(adapter), params, batch, jax.random.key(2))
    jaxpr = jax.make_jaxpr(step)(*args)
    const_elements = sum(np.size(x) for x in jaxpr.consts)
    assert const_elements < 1000  # no frozen weight baked into the program
    assert len(jaxpr.jaxpr.invars) == len(jax.tree.leaves(args))
    new_adapter, _, stats = step(*args)
    assert jax.tree.structure(new_adapter) == jax.tree.structure(adapter)
    assert np.isfinite(float(stats["loss"]))


@pytest.mark.parametrize("overrides, message", [
    (["lora.targets=.*/qq_proj/kernel"], "matched no parameter"),
    (["lora.rank=100", "lora.targets=.*/k_proj/kernel"], "larger than the weight"),
])
def test_method_settings_that_do_not_fit_the_model_exit_2_and_write_nothing(
        tmp_path, capsys, tiny_hf_folder, overrides, message):
    from train import __main__ as cli

    out_dir = tmp_path / "runs"
    path = _write(tmp_path / "c.yaml", "name: x\n")
    code = cli.main(["--config", path, f"out_dir={out_dir}", "model.source=null", f"model.hf_folder={tiny_hf_folder}",
                     "data.max_train_articles=8", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not out_dir.exists()
