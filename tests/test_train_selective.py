"""The selective family's own behaviour in the training program: ULMFiT's stages (unfreezing on schedule,
resuming across a stage), and settings that do not fit the model. Their shipped configs and tiny runs are
with every other method's in tests/test_train_methods.py."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import jpeft
from jpeft.checkpoint import CheckpointError
from train import config as config_lib



@pytest.fixture(scope="module")
def loaded(mixing_hf_folder):
    from train import loading

    return loading.load(config_lib.ModelConfig(hf_folder=str(mixing_hf_folder)))


@pytest.fixture(scope="module")
def unsaved(tokenizer):
    """A tiny 2-layer Llama with SmolLM2's tokenizer, never written to files: for checks that stop before training."""
    from jpeft.models import llama
    from reference import numpy_params
    from train import loading

    tiny = llama.model(llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True))
    return loading.Loaded(tiny, numpy_params(tiny), tokenizer)


SECTIONS = {"selective": {"top_layers": 1}, "ulmfit": {"groups": 2, "unfreeze_every": 4},
            "pir": {"budget": 5000, "score_batches": 2}}


def _config(tmp_path, folder, bbc_dir, method, run="run", **train):
    """Four training articles in batches of four: every step sees the same examples, so the loss must fall."""
    return config_lib.from_dict({
        "name": f"tiny_{method}", "method": method, "run_dir": str(tmp_path / run), "progress": False,
        "model": {"hf_folder": str(folder)} if folder else {"source": "smollm2"},
        **{name: section for name, section in SECTIONS.items() if name == method},  # the run's own section
        "data": {"dir": str(bbc_dir), "max_article_tokens": 24, "max_headline_tokens": 12, "bucket_size": 32,
                 "max_train_articles": 4},
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "eval_every": 8, "val_batches": 1,
                  **train},
        "eval": {"test_articles": 0},
    })


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _count_traces(monkeypatch) -> list:
    """Counts traces of the train step's loss (one per compile of the step), by the trainer's stage."""
    from train import trainer

    traces, make = [], trainer.make_loss_fn

    def counting(method, model, sums=None):
        loss_fn = make(method, model, sums)

        def traced(*args):
            traces.append(method.describe())
            return loss_fn(*args)
        return traced

    monkeypatch.setattr(trainer, "make_loss_fn", counting)
    return traces


@pytest.mark.slow  # tests/test_ulmfit.py checks the stages in the trainer's loop by default
def test_ulmfit_run_unfreezes_on_schedule_and_resumes_across_a_stage(tmp_path, mixing_hf_folder, bbc_dir, loaded,
                                                                     monkeypatch):
    from train import run

    cfg = _config(tmp_path, mixing_hf_folder, bbc_dir, "ulmfit", lr=1e-2, schedule="slanted_triangular")
    cfg = config_lib.apply_overrides(cfg, ["checkpoint.every=5", "checkpoint.keep=3", "checkpoint.async_save=false"])
    traces = _count_traces(monkeypatch)
    summary = run.run(cfg, loaded=loaded)
    assert len(traces) == 2  # the train step compiled once per stage (every batch here has one shape)
    run_dir = Path(summary["run_dir"])
    records = _records(run_dir)
    per_layer = sum(x.size for x in jax.tree.leaves(loaded.params["layers"])) // 2
    assert next(r for r in records if r["kind"] == "params")["trainable"] == per_layer + 64
    assert [(r["step"], r["trainable"]) for r in records if r["kind"] == "stage"] == [(5, 2 * per_layer + 64)]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs[0] == pytest.approx(1e-2 / 32) and lrs[1] == pytest.approx(1e-2)  # slanted triangular
    adapter, _ = run.restore(str(run_dir / "adapter"), cfg, loaded)
    assert {p.split("/")[0] for p in jpeft.tree.flatten(adapter)} == {"layers_0", "layers_1", "norm"}

    # Kill after step 5 (the first step of stage 2): resume from its checkpoint to the same adapter.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "8")
    shutil.rmtree(resumed_dir / "adapter")
    again = run.run(config_lib.apply_overrides(cfg, [f"run_dir={resumed_dir}"]), loaded=loaded)
    assert [r["step"] for r in _records(again["run_dir"]) if r["kind"] == "resume"] == [5]
    assert len(traces) == 3  # the resumed run starts in stage 2: one compile
    second, _ = run.restore(str(resumed_dir / "adapter"), cfg, loaded)
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The saved adapter is the last stage's: restoring it as another method's is refused.
    with pytest.raises(CheckpointError, match="holds a 'ulmfit' adapter, not a 'selective' one"):
        other = config_lib.apply_overrides(cfg, ["method=selective", "ulmfit=null"])
        run.restore(str(run_dir / "adapter"), other, loaded)


@pytest.mark.parametrize("raw, message", [
    ({"selective": {"top_layers": 0}}, r"'selective.top_layers': 0 must be a positive integer"),
    ({"selective": {"layers": [1, 1]}}, r"'selective.layers': \[1, 1\] names a layer twice"),
    ({"bitfit": {"norms": "yes"}}, r"'bitfit.norms': 'yes' must be one of 'auto', 'always', 'never'"),
    ({"ulmfit": {"factor": -1}}, r"'ulmfit.factor': -1.0 must be > 0"),
    ({"ulmfit": {"unfreeze_every": 0}}, r"'ulmfit.unfreeze_every': 0 must be a positive integer or null"),
    ({"pir": {"budget": 0}}, r"'pir.budget': 0 must be a positive integer"),
    ({"pir": {"score": "taylor"}}, r"'pir.score': 'taylor' must be one of 'weight_gradient', 'fisher'"),
    ({"train": {"schedule": "stlr"}}, r"'train.schedule': 'stlr' must be one of 'cosine', 'linear', "
                                      r"'slanted_triangular'"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.from_dict(raw)


def test_settings_that_do_not_fit_the_model_stop_before_the_run_folder(tmp_path, bbc_dir, unsaved):
    from train import run

    for method, override, message in (("selective", "selective.top_layers=3", "top_layers is more than the model's 2"),
                                      ("ulmfit", "ulmfit.groups=9", "9 is more than the 3 groups"),
                                      ("pir", "pir.budget=100000000", "budget is more than")):
        cfg = config_lib.apply_overrides(_config(tmp_path, None, bbc_dir, method, run=method, lr=1e-2),
                                         [override])
        with pytest.raises(config_lib.ConfigError, match=message):
            run.run(cfg, loaded=unsaved)
        assert not (tmp_path / method).exists()
