"""AdaLoRA through the training program: the shipped config, and a tiny end-to-end run (slow lane) whose
budget schedule, penalty and rank-pattern summary go through the trainer without AdaLoRA code in it."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train import config as config_lib

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_in_the_methods_table():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import methods_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    lora = config_lib.load_config(str(REPO / "configs" / "smollm2_bbc_lora.yaml"))
    cfg = config_lib.load_config(str(REPO / "configs" / "smollm2_bbc_adalora.yaml"))
    assert (cfg.name, cfg.method) == ("smollm2_bbc_adalora", "adalora")
    assert "adalora" in methods_table.METHODS
    assert (cfg.data, cfg.eval, cfg.model) == (lora.data, lora.eval, lora.model)  # the same job as LoRA's
    assert cfg.method_settings["targets"] == lora.method_settings["targets"]
    s = cfg.method_settings
    assert s["tinit"] < cfg.train.steps - s["tfinal"]  # a budgeting phase within the run


def test_total_step_is_context_not_a_setting():
    from train import run

    with pytest.raises(config_lib.ConfigError, match=r"unknown key 'adalora.total_step'"):
        config_lib.from_dict({"method": "adalora", "adalora": {"total_step": 40}})
    cfg = config_lib.from_dict({"method": "adalora", "adalora": {"tinit": 30, "tfinal": 10}, "train": {"steps": 40}})
    with pytest.raises(config_lib.ConfigError, match="leave no budgeting phase in total_step=40"):
        run.make_method(cfg)


@pytest.fixture(scope="module")
def loaded(mixing_hf_folder):
    from train import loading

    return loading.load(config_lib.ModelConfig(hf_folder=str(mixing_hf_folder)))


@pytest.mark.slow  # a trainer run (about a minute on the shared 2-core machine)
def test_tiny_run_end_to_end(tmp_path, mixing_hf_folder, bbc_dir, loaded, capsys):
    from jpeft.io.peft import save_peft
    from jpeft.methods import adalora as adalora_lib
    from train import run

    cfg = config_lib.from_dict({
        "name": "tiny_adalora", "method": "adalora", "run_dir": str(tmp_path / "run"), "progress": False,
        "model": {"hf_folder": str(mixing_hf_folder)},
        "adalora": {"init_r": 4, "target_r": 2, "alpha": 8, "tinit": 2, "tfinal": 2},
        "data": {"dir": str(bbc_dir), "max_article_tokens": 24, "max_headline_tokens": 12, "bucket_size": 32,
                 "max_train_articles": 4},
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "eval_every": 8, "val_batches": 1, "lr": 3e-2},
        "checkpoint": {"every": 4},
        "eval": {"test_articles": 4, "batch_size": 4, "max_new_tokens": 4, "base_model": False},
    })
    summary = run.run(cfg, loaded=loaded)
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    adapter, meta = run.restore(str(Path(summary["run_dir"]) / "adapter"), cfg, loaded)
    assert meta["method"] == "adalora"
    kept = adalora_lib.rank_pattern(adapter)
    modules = sum(k.size // k.shape[-1] for k in kept.values())
    assert sum(int(k.sum()) for k in kept.values()) == 2 * modules  # the final budget, target_r per module
    text = next(r for r in records if r["kind"] == "method_summary")["text"]
    assert text.startswith(f"adalora rank pattern: {2 * modules} of {4 * modules} triplets kept")
    assert text in capsys.readouterr().out
    method = run.make_method(cfg, loaded.model)
    save_peft(tmp_path / "peft", loaded.model, method, loaded.params, adapter)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sum(sum(v) for v in config["rank_pattern"].values()) == 2 * modules and config["total_step"] == 8
