"""The contract every registered method keeps, checked for each name in ``registry.names()`` on a tiny Llama.

A new method is covered by registering it: nothing here names a method. Each is built from
its defaults (plus what the lifecycle gives a builder: the model, a tokenizer, the run's
steps) and taken through :mod:`jpeft.lifecycle`:

* ``init`` runs under ``jax.eval_shape`` and gives the concrete adapter's shapes and dtypes;
* the fresh adapter is the base model where the method promises it: every method that
  attaches nothing at the model's hook points starts as the model it adapts (an input
  method's virtual tokens change the inputs by design);
* ``merge`` equals ``apply`` (of a perturbed adapter) wherever the method says merging is exact;
* gradients exist for the adapter's leaves only, finite, and not all zero;
* ``save_adapter`` / ``restore_adapter`` of the saved form is bit-exact;
* every check in :data:`ADAPTER_CHECKS` (the PEFT format's round trip hooks in there).

Then every task x method goes through the runner (``python -m train``'s ``main``): it trains
one step, or is refused with one message and exit status 2 before anything is written (the
default lane runs one row per task; ``JPEFT_SLOW=1`` all of them, about 20 s a row on two busy cores).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jpeft import checkpoint, lifecycle, tree
from jpeft.methods import registry
from jpeft.models import hooks, llama
from train import tasks

CONFIG = llama.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, tie_word_embeddings=True, scan_layers=True)
TOKENS_BxT = (np.arange(2 * 6, dtype=np.int32).reshape(2, 6) * 7) % CONFIG.vocab_size
STEPS = 4  # the run length builders that schedule over it (AdaLoRA's budget) are told
SIZED_FOR_A_TINY_MODEL = {"pir": {"budget": 1000}}
"""Settings in place of defaults that are sized for real models (PIR's default budget is more entries than
the tiny model has). A method whose defaults fit a small Llama needs no entry."""

ADAPTER_CHECKS: list[Callable[..., None]] = []
"""Further checks of a started method: ``check(name, method, params, adapter, tmp_path)``; each raises on a
broken promise. The Hugging Face PEFT round trip of a method with a codec belongs here."""


def _tokenizer(text: str, add_special_tokens: bool = False) -> dict:
    return {"input_ids": [ord(c) % CONFIG.vocab_size for c in text]}


@pytest.fixture(scope="module")
def tiny():
    """``(model, params, base logits)``: weights of std 0.2, so that every adapted weight shows in the logits."""
    model = llama.model(CONFIG)
    params = jax.tree.map(lambda x: x * 10.0 if x.ndim >= 2 else x, llama.model(CONFIG).init(jax.random.key(0)))
    return model, params, _logits(model, params)


def _loss(model):
    def params_loss(params, tokens_BxT):
        logits_BxTxV, _ = model.forward(params, tokens_BxT)
        logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1))

    return params_loss


def _start(name, model, params):
    settings = SIZED_FOR_A_TINY_MODEL.get(name, {})
    method = registry.build(name, settings, model=model, tokenizer=_tokenizer, total_step=STEPS)
    return lifecycle.start(method, params, jax.random.key(1), loss_fn=_loss(model), batches=iter([TOKENS_BxT] * 4))


def _logits(model, params):
    return np.asarray(jax.jit(lambda p: model.forward(p, TOKENS_BxT)[0])(params), np.float64)


def _perturbed(adapter, scale=0.05):
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                              else x for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_method_keeps_the_contract(name, tiny, tmp_path):
    model, params, base_logits = tiny
    begun = _start(name, model, params)
    method, adapter, frozen = begun.method, begun.adapter, begun.frozen

    # init under eval_shape: the same shapes and dtypes as the concrete adapter, nothing allocated
    abstract = jax.eval_shape(method.init, jax.random.key(1), jax.eval_shape(lambda p: p, params))
    assert jax.tree.structure(abstract) == jax.tree.structure(adapter)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(adapter)):
        assert (a.shape, a.dtype) == (c.shape, c.dtype), name

    # the fresh adapter: the base model itself, for every method that adds nothing at the model's hook points
    # (an input method's virtual tokens change the inputs; a bottleneck at a block's output may start at zero)
    run_applied = jax.jit(lambda a: model.forward(method.apply(frozen, a), TOKENS_BxT)[0])
    fresh = np.asarray(run_applied(adapter), np.float64)
    assert np.all(np.isfinite(fresh)), name
    if not any(hooks.HOOKS in path.split("/") for path in tree.flatten(method.apply(frozen, adapter))):
        np.testing.assert_allclose(fresh, base_logits, atol=5e-5, err_msg=f"{name}: fresh adapter != base")

    # merge equals apply wherever the method says merging is exact
    moved = _perturbed(adapter)
    if method.merge_blocker is None or method.merge_blocker(frozen) is None:
        np.testing.assert_allclose(_logits(model, method.merge(frozen, moved)), np.asarray(run_applied(moved)),
                                   atol=2e-4, err_msg=f"{name}: merge != apply")

    # gradients: for the adapter's leaves only, finite, not all zero
    grads = jax.grad(lifecycle.loss(method, _loss(model)))(moved, frozen, TOKENS_BxT)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter), name
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), name
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads)), f"{name}: every gradient is zero"

    # save and restore: bit-exact
    saved = method.saved_form(moved)
    checkpoint.save_adapter(tmp_path / "adapter", saved, metadata={"method": name})
    like = jax.eval_shape(lambda a: a, saved)
    restored, meta = checkpoint.restore_adapter(tmp_path / "adapter", like=like, method=name)
    assert meta["method"] == name
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    for check in ADAPTER_CHECKS:
        check(name, method, params, moved, tmp_path)


# ----------------------------------------------------------------------------- every task x method, through the runner


def _tiny_t5_folder(folder, tokenizer):
    from jpeft.io.hf import save_hf
    from jpeft.models import t5

    config = t5.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=8,
                         relative_attention_max_distance=16, decoder_start_token_id=0)
    model = t5.model(config)
    save_hf(folder, model, model.init(jax.random.key(0), stddev=0.05))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_models(tmp_path_factory, tiny_hf_folder, tokenizer):
    """A tiny model folder for each task: the Llama writes headlines; BERT classifies; T5 is the seq2seq model."""
    from test_classify import _tiny_bert_folder

    from jpeft import assets

    bert = _tiny_bert_folder(tmp_path_factory.mktemp("bert"), assets.minilm_dir(), vocab_size=30522)
    return {"headlines": tiny_hf_folder, "classify": bert,
            "seq2seq": _tiny_t5_folder(tmp_path_factory.mktemp("t5"), tokenizer)}


def _run_cli(tmp_path, capsys, task, method, folder):
    from train import __main__ as cli

    raw = {"name": f"{task}-{method}", "task": task, "method": method, "out_dir": str(tmp_path / "runs"),
           "progress": False, "model": {"hf_folder": str(folder)},
           "data": {"max_train_articles": 8, "max_article_tokens": 16, "max_headline_tokens": 4, "bucket_size": 16},
           "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0, "val_batches": 1, "eval_every": 1},
           "eval": {"test_articles": 2, "batch_size": 2, "max_new_tokens": 2, "base_model": False},
           "checkpoint": {"every": 0, "async_save": False}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.main(["--config", str(path)])
    return code, capsys.readouterr().err, tmp_path / "runs"


def _task_method_cases():
    for task in tasks.names():
        for method in registry.names():
            marks = () if method == "lora" else (pytest.mark.slow,)  # one row per task in the default lane
            yield pytest.param(task, method, marks=marks, id=f"{task}-{method}")


@pytest.mark.parametrize("task, method", list(_task_method_cases()))
def test_every_task_trains_every_method_one_step_or_refuses_it_with_exit_2(task, method, task_models, tmp_path,
                                                                        capsys):
    code, err, out_dir = _run_cli(tmp_path, capsys, task, method, task_models[task])
    if code == 0:
        (run_dir,) = out_dir.iterdir()
        assert (run_dir / "summary.json").is_file() and (Path(run_dir) / "adapter").is_dir()
        return
    headlines = [line for line in err.strip().splitlines() if not line.startswith(" ")]  # a list may follow
    assert code == 2 and len(headlines) == 1 and "Traceback" not in err, (code, err)
    assert not out_dir.exists(), f"{task} x {method} was refused after writing {list(out_dir.iterdir())}"
