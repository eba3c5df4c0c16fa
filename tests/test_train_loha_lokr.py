"""LoHa and LoKr through the training program: shipped configs, and tiny end-to-end runs (slow lane)."""

import json
import sys
from pathlib import Path

import jax
import pytest

from train import config as config_lib

REPO = Path(__file__).resolve().parents[1]
METHODS = ("loha", "lokr")


def test_shipped_configs_are_valid_and_in_the_methods_table():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import methods_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    lora = config_lib.load_config(str(REPO / "configs" / "smollm2_bbc_lora.yaml"))
    for name in METHODS:
        cfg = config_lib.load_config(str(REPO / "configs" / f"smollm2_bbc_{name}.yaml"))
        assert (cfg.name, cfg.method) == (f"smollm2_bbc_{name}", name)
        assert name in methods_table.METHODS
        assert (cfg.data, cfg.eval, cfg.model) == (lora.data, lora.eval, lora.model)  # the same job as LoRA's
        assert cfg.method_settings["targets"] == lora.method_settings["targets"]


@pytest.fixture(scope="module")
def loaded(mixing_hf_folder):
    from train import loading

    return loading.load(config_lib.ModelConfig(hf_folder=str(mixing_hf_folder)))


@pytest.mark.slow  # the trainer path is LoRA's (a weight method through the registry); this checks it end to end
@pytest.mark.parametrize("method", METHODS)
def test_tiny_run_end_to_end(tmp_path, mixing_hf_folder, bbc_dir, loaded, method):
    from train import run

    cfg = config_lib.from_dict({
        "name": f"tiny_{method}", "method": method, "run_dir": str(tmp_path / method), "progress": False,
        "model": {"hf_folder": str(mixing_hf_folder)},
        method: {"rank": 2, "alpha": 4},
        "data": {"dir": str(bbc_dir), "max_article_tokens": 24, "max_headline_tokens": 12, "bucket_size": 32,
                 "max_train_articles": 4},
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "eval_every": 8, "val_batches": 1, "lr": 3e-2},
        "eval": {"test_articles": 4, "batch_size": 4, "max_new_tokens": 4, "base_model": False},
    })
    summary = run.run(cfg, loaded=loaded)
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    adapter, meta = run.restore(str(Path(summary["run_dir"]) / "adapter"), cfg, loaded)
    assert meta["method"] == method
    trainable = next(r for r in records if r["kind"] == "params")["trainable"]
    assert trainable == sum(x.size for x in jax.tree.leaves(adapter)) > 0
