"""DoRA and PiSSA through the training program: shipped configs, and (slow) tiny end-to-end runs."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import jpeft

from jpeft.checkpoint import CheckpointError
from train import config as config_lib

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_valid_and_in_the_methods_table():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import methods_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    dora = config_lib.load_config(str(REPO / "configs" / "smollm2_bbc_dora.yaml"))
    pissa = config_lib.load_config(str(REPO / "configs" / "smollm2_bbc_pissa.yaml"))
    lora = config_lib.load_config(str(REPO / "configs" / "smollm2_bbc_lora.yaml"))
    assert (dora.method, pissa.method, dict(pissa.method_settings)["init"]) == ("dora", "lora", "pissa")
    for cfg in (dora, pissa):  # the default LoRA job's targets and rank
        settings = dict(cfg.method_settings)
        assert {k: settings[k] for k in ("rank", "alpha", "targets")} == \
            {k: dict(lora.method_settings)[k] for k in ("rank", "alpha", "targets")}
    assert {"dora", "pissa"} <= set(methods_table.METHODS)


def _config(tmp_path, folder, bbc_dir, method, settings, lr):
    return config_lib.from_dict({
        "name": f"tiny_{method}", "method": method, "run_dir": str(tmp_path / "run"), "progress": False,
        "model": {"hf_folder": str(folder)}, method: settings,
        "data": {"dir": str(bbc_dir), "max_article_tokens": 24, "max_headline_tokens": 12, "bucket_size": 32,
                 "max_train_articles": 4},
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "eval_every": 8, "val_batches": 1, "lr": lr},
        "eval": {"test_articles": 4, "batch_size": 4, "max_new_tokens": 4, "base_model": False},
    })


@pytest.mark.slow  # tests/test_dora.py and tests/test_lora_init.py check the library paths by default
@pytest.mark.parametrize("method, settings, quantize", [
    ("dora", {"rank": 4, "targets": ".*/(q|v)_proj/kernel"}, None),
    ("lora", {"rank": 4, "targets": ".*/(q|v)_proj/kernel", "init": "pissa"}, None),
    ("lora", {"rank": 4, "targets": ".*/(q|v)_proj/kernel", "init": "pissa"}, "nf4"),  # the residual re-quantized
], ids=["dora", "pissa", "pissa_nf4"])
def test_tiny_run_end_to_end(tmp_path, mixing_hf_folder, bbc_dir, method, settings, quantize):
    from train import loading, run

    loaded = loading.load(config_lib.ModelConfig(hf_folder=str(mixing_hf_folder), quantize=quantize))
    cfg = _config(tmp_path, mixing_hf_folder, bbc_dir, method, settings, lr=3e-3)
    cfg = config_lib.from_dict({**config_lib.to_dict(cfg), "model": {"hf_folder": str(mixing_hf_folder),
                                                                      "quantize": quantize}})
    summary = run.run(cfg, loaded=loaded)
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    assert np.isfinite(summary["rouge"][-1]["rouge1"])
    adapter_dir = str(Path(summary["run_dir"]) / "adapter")
    adapter, meta = run.restore(adapter_dir, cfg, loaded)
    assert meta["method"] == method
    leaves = {p.rsplit("/", 1)[1] for p in jpeft.tree.flatten(adapter)}
    assert leaves == ({"a", "b", "m"} if method == "dora" else {"a", "b"})
    if method == "lora":  # PiSSA: generate runs it as a plain rank-2r LoRA over the loaded weights
        from train.generate import load_adapter

        if quantize:  # the run's base was the re-quantized residual: that form would not be the trained model
            with pytest.raises(CheckpointError, match="re-quantized residual"):
                load_adapter("p", adapter_dir, loaded)
            return
        pissa = run.make_method(cfg, loaded.model, loaded.tokenizer)
        trained = pissa.merge(pissa.training.rebase.base(loaded.params, pissa.init(jax.random.key(cfg.train.seed), loaded.params)),
                              adapter)
        plain, plain_adapter = load_adapter("p", adapter_dir, loaded)
        assert plain.training.rebase is None and plain.describe().startswith("lora r=8")
        tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % loaded.model.config.vocab_size
        want, _ = loaded.model.forward(trained, tokens)
        got, _ = loaded.model.forward(plain.merge(loaded.params, plain_adapter), tokens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
