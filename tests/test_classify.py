"""The encoder side: every encoder method on a small BERT, the classification job and its refusals."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.methods import registry
from jpeft.methods.heads import with_modules_to_save
from jpeft.models import bert
from train import config as config_lib
from train.tasks.classify import macro_f1

import reference

REPO = Path(__file__).resolve().parents[1]
CONFIG = bert.BertConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                         max_position_embeddings=32, num_labels=3, classifier_input="cls", scan_layers=True)
TOKENS = jnp.array([[2, 5, 9, 11, 7, 3], [4, 4, 8, 1, 0, 0]], jnp.int32)
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
LABELS = jnp.array([0, 2])
ENCODER_METHODS = {  # every method that applies to an encoder, with settings for this model
    "lora": {"rank": 2, "targets": r".*/(query|key|value|dense)/kernel"},
    "ia3": {"targets": r".*/(key|value)/kernel|layers/output/dense/kernel", "feedforward": r"layers/output/dense/kernel"},
    "prompt_tuning": {"num_virtual_tokens": 3, "init": "vocab"},
    "p_tuning": {"num_virtual_tokens": 3, "hidden_size": 8},
    "prefix_tuning": {"num_virtual_tokens": 3, "init": "normal", "init_std": 0.5},
    "bottleneck": {"size": 4, "placement": "houlsby"},
    "full": {},
}


def test_macro_f1_against_a_hand_computed_case():
    # class 0: tp 2 fp 1 fn 0 -> 4/5; class 1: tp 0 -> 0; class 2: tp 1 fp 0 fn 1 -> 2/3; class 3 absent -> 0
    labels, predictions = [0, 0, 1, 2, 2], [0, 0, 0, 2, 1]
    assert macro_f1(labels, predictions, 4) == pytest.approx((4 / 5 + 0 + 2 / 3 + 0) / 4)
    assert macro_f1([0, 1], [0, 1], 2) == 1.0


@pytest.mark.parametrize("names, quantize", [
    (["prefix_tuning"], False),  # the default lane: a hook method (LoRA with a head: tests/test_bert_peft.py)
    pytest.param(["lora"], True, marks=pytest.mark.slow),  # QLoRA: the layers' kernels in NF4, LoRA over them
    pytest.param([m for m in ENCODER_METHODS if m != "prefix_tuning"], False, marks=pytest.mark.slow),
])
def test_every_encoder_method_trains_a_small_bert_with_its_head(names, quantize):
    from jpeft.quant.quantize import layer_kernels

    model = bert.model(CONFIG)
    params = reference.numpy_params(model)
    if quantize:
        params = jpeft.quant.quantize(params, layer_kernels(model.layouts()), "nf4", block_size=16, model=model)

    def logits(p):
        return model.classify(p, model.forward(p, TOKENS, attention_mask_BxT=MASK)[0], MASK)

    def loss(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(p), LABELS))

    base = jax.jit(logits)(params)
    for name in names:
        method = registry.build(name, ENCODER_METHODS[name], model=model)
        if name != "full":
            method = with_modules_to_save(method, r"classifier/.*")
        adapter = method.init(jax.random.key(1), params)

        @jax.jit
        def step(adapter, params, method=method):  # one compile: loss, gradients, logits after a step
            value, grads = jax.value_and_grad(lambda a: loss(method.apply(params, a)))(adapter)
            moved = jax.tree.map(lambda a, g: a - 0.5 * g, adapter, grads)
            return value, grads, logits(method.apply(params, moved))

        value, grads, after = step(adapter, params)
        norms = {p: float(jnp.abs(g).max()) for p, g in jpeft.tree.flatten(grads).items()}
        assert np.isfinite(float(value)), name
        assert norms and all(np.isfinite(v) for v in norms.values()), (name, norms)
        assert norms.get("modules_to_save/classifier/kernel", norms.get("classifier/kernel", 0.0)) > 0, name
        inner = {p: v for p, v in norms.items() if "classifier" not in p}
        assert max(inner.values()) > 0, (name, inner)  # the method's own weights get a gradient too
        assert not np.allclose(np.asarray(after), np.asarray(base)), name


def test_shipped_classification_configs_are_valid():
    for path in sorted((REPO / "configs").glob("minilm_bbc_*.yaml")):
        cfg = config_lib.load_config(str(path))
        assert cfg.task == "classify" and cfg.model.source == "minilm", path
        assert cfg.name == path.stem


# ----------------------------------------------------------------------------- the program


@pytest.fixture(scope="module")
def bert_tokenizer_folder():
    from jpeft import assets

    return assets.minilm_dir()


def _tiny_bert_folder(folder, tokenizer_folder, *, vocab_size, num_labels=0, stddev=0.02):
    import shutil

    from jpeft.io.hf import save_hf

    config = bert.BertConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                             max_position_embeddings=64, num_labels=num_labels)
    model = bert.model(config)
    save_hf(folder, model, reference.numpy_params(model, stddev=stddev))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(tokenizer_folder) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, bert_tokenizer_folder):
    return _tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"), bert_tokenizer_folder, vocab_size=30522)


def _cli(tmp_path, capsys, folder, *overrides):
    from train import __main__ as cli

    out_dir = tmp_path / "runs"
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntask: classify\n")
    code = cli.main(["--config", str(path), f"out_dir={out_dir}", f"model.hf_folder={folder}",
                     "data.max_train_articles=16", "train.batch_size=4", "train.steps=2", "train.warmup_steps=0",
                     "progress=false", *overrides])
    return code, capsys.readouterr().err, out_dir


def test_classify_on_a_decoder_and_headlines_on_an_encoder_exit_2_and_write_nothing(
        tmp_path, capsys, tiny_hf_folder, tiny_bert):
    code, err, out_dir = _cli(tmp_path, capsys, tiny_hf_folder)
    assert code == 2 and "decoder-only language model" in err and "model.source: minilm" in err, err
    assert "Traceback" not in err and not out_dir.exists()
    code, err, out_dir = _cli(tmp_path, capsys, tiny_bert, "task=headlines")
    assert code == 2 and "encoder without a language-model head" in err and "task: classify" in err, err
    assert not out_dir.exists()


def test_a_tokenizer_or_a_head_that_does_not_fit_exits_2_and_writes_nothing(
        tmp_path, capsys, bert_tokenizer_folder, tiny_bert):
    small = _tiny_bert_folder(tmp_path / "small_vocab", bert_tokenizer_folder, vocab_size=1000)
    code, err, out_dir = _cli(tmp_path, capsys, small)
    assert code == 2 and "the tokenizer has 30522 tokens but the model's embedding table has 1000 rows" in err, err
    assert not out_dir.exists()
    three = _tiny_bert_folder(tmp_path / "three_labels", bert_tokenizer_folder, vocab_size=30522, num_labels=3)
    code, err, out_dir = _cli(tmp_path, capsys, three)
    assert code == 2 and "has 3 classes, but the BBC News task has 5" in err, err
    assert not out_dir.exists()
    code, err, out_dir = _cli(tmp_path, capsys, tiny_bert, "data.max_article_tokens=100")
    assert code == 2 and "'data.max_article_tokens': 100 is more than the model's 64 positions" in err, err
    assert not out_dir.exists()


@pytest.mark.slow
def test_tiny_classification_run_end_to_end(tmp_path, capsys, tiny_bert):
    from jpeft.checkpoint import restore_adapter

    code, err, out_dir = _cli(tmp_path, capsys, tiny_bert, "method=lora", "lora.rank=2",
                              "lora.targets=.*/(query|value)/kernel", "data.max_article_tokens=32", "train.steps=6", "train.lr=1e-2",
                              "eval.test_articles=8", "train.eval_every=3", "train.val_batches=1")
    assert code == 0, err
    (run_dir,) = out_dir.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    row = summary["classification"]
    assert row["test_articles"] == 8 and 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "train"]) == 6
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 8
    _, meta = restore_adapter(run_dir / "adapter")
    assert meta["method"] == "lora" and meta["labels"] == ["business", "entertainment", "politics", "sports", "tech"]


def test_a_split_that_cannot_teach_or_measure_a_classifier_exits_2_and_writes_nothing(tmp_path, capsys, tiny_bert):
    """One category (a model that learns one answer scores 1.0) or no test articles (accuracy nan): refused."""
    corpus = tmp_path / "one_category"
    (corpus / "sport").mkdir(parents=True)
    for i in range(40):
        (corpus / "sport" / f"{i:03d}.txt").write_text(f"Headline {i}\n\nThe match report number {i}.\n")
    code, err, out_dir = _cli(tmp_path, capsys, tiny_bert, f"data.dir={corpus}", "data.val_fraction=0.2")
    assert code == 2 and "needs articles of at least two categories" in err and "are all 'sport'" in err, err
    assert err.count("\n") == 1 and not out_dir.exists()
    code, err, out_dir = _cli(tmp_path, capsys, tiny_bert, "eval.test_articles=0")
    assert code == 2 and "set eval.test_articles to at least 1" in err, err
    assert err.count("\n") == 1 and not out_dir.exists()


def _step0_val_loss(out_dir: Path) -> float:
    (run_dir,) = out_dir.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["kind"] == "val" and r["step"] == 0)


def test_pissa_classification_starts_from_the_base_model(tmp_path, capsys, bert_tokenizer_folder):
    """A method whose init takes its factors out of the base (PiSSA) trains over the residual in this task too:
    before the first step its validation loss is the base model's (a fresh plain LoRA's), with the head trained
    whole or not. (Weights of std 0.3 and a head of its own, so that the loss feels the encoder.)"""
    bert_folder = _tiny_bert_folder(tmp_path / "bert", bert_tokenizer_folder, vocab_size=30522, num_labels=5,
                                    stddev=0.3)
    common = ("method=lora", "lora.rank=2", "lora.targets=.*/(query|value)/kernel", "lora.alpha=16",
              "train.steps=1", "eval.test_articles=4", "train.val_batches=1", "data.max_article_tokens=32")
    losses = {}
    for name, extra in {"plain": (), "pissa": ("lora.init=pissa",),
                        "pissa, no head copy": ("lora.init=pissa", "classify.modules_to_save=null")}.items():
        folder = tmp_path / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        code, err, out_dir = _cli(folder, capsys, bert_folder, *common, *extra)
        assert code == 0, err
        losses[name] = _step0_val_loss(out_dir)
    assert losses["pissa"] == pytest.approx(losses["plain"], rel=1e-4), losses
    assert losses["pissa, no head copy"] == pytest.approx(losses["plain"], rel=1e-4), losses


@pytest.mark.parametrize("method", ["adalora", "pir"])
def test_a_method_that_cannot_train_next_to_the_head_exits_2_and_writes_nothing(tmp_path, capsys, tiny_bert,
                                                                                    method):
    code, err, out_dir = _cli(tmp_path, capsys, tiny_bert, f"method={method}",
                              f"{method}.targets=.*/(query|value)/kernel", "data.max_article_tokens=32")
    assert code == 2 and "cannot train modules_to_save" in err and "modules_to_save (null)" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()
