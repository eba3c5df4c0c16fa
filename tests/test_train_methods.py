"""Every method through the training program: its shipped config, config errors that name the key, the
run's method built from its section, and tiny end-to-end runs (train, evaluate, save, restore)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft

from jpeft.checkpoint import CheckpointError
from train import config as config_lib
from train.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def methods_table():
    """benchmarks/methods_table.py, the table of every method's run."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import methods_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return methods_table


@pytest.fixture(scope="module")
def loaded_models(mixing_hf_folder):
    """``{quantize: Loaded}``, each loaded once: the float tiny model and its NF4 copy."""
    from train import loading

    return {q: loading.load(config_lib.ModelConfig(hf_folder=str(mixing_hf_folder), quantize=q)) for q in (None, "nf4")}


# ---------------------------------------------------------------- config


def _shipped(name):
    return config_lib.load_config(str(REPO / "configs" / f"smollm2_bbc_{name}.yaml"))


def _same_job_as_lora(cfg, lora):
    """The default LoRA job (data, evaluation, model) on the same target modules."""
    assert (cfg.data, cfg.eval, cfg.model) == (lora.data, lora.eval, lora.model)
    assert cfg.method_settings["targets"] == lora.method_settings["targets"]


def _loras_rank_and_targets(cfg, lora):
    settings, lora_settings = dict(cfg.method_settings), dict(lora.method_settings)
    assert {k: settings[k] for k in ("rank", "alpha", "targets")} == \
        {k: lora_settings[k] for k in ("rank", "alpha", "targets")}


def _qlora(cfg, lora):
    """LoRA's job and settings on an NF4 base."""
    assert cfg.model.quantize == "nf4" and lora.model.quantize is None
    assert (cfg.lora, cfg.data, cfg.train, cfg.eval) == (lora.lora, lora.data, lora.train, lora.eval)


def _pissa(cfg, lora):
    _loras_rank_and_targets(cfg, lora)
    assert dict(cfg.method_settings)["init"] == "pissa"


def _adalora(cfg, lora):
    _same_job_as_lora(cfg, lora)
    settings = cfg.method_settings
    assert settings["tinit"] < cfg.train.steps - settings["tfinal"]  # a budgeting phase within the run


def _ulmfit(cfg, lora):
    assert cfg.train.schedule == "slanted_triangular"


def _nothing_more(cfg, lora):
    pass


# config name -> (the method it runs, what else must hold of it given the LoRA config)
SHIPPED = {
    "qlora": ("lora", _qlora),
    "dora": ("dora", _loras_rank_and_targets),
    "pissa": ("lora", _pissa),
    **{name: (name, _nothing_more) for name in ("prompt_tuning", "prefix_tuning", "p_tuning", "ia3", "bottleneck",
                                                "bitfit", "selective", "pir")},
    "ulmfit": ("ulmfit", _ulmfit),
    **{name: (name, _same_job_as_lora) for name in ("loha", "lokr", "vera", "oft")},
    "adalora": ("adalora", _adalora),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_is_valid_and_in_the_methods_table(name, methods_table):
    method, check = SHIPPED[name]
    cfg = _shipped(name)
    assert (cfg.name, cfg.method) == (f"smollm2_bbc_{name}", method)
    assert name in methods_table.METHODS
    check(cfg, _shipped("lora"))


def test_every_methods_table_row_has_a_valid_config(tmp_path, methods_table):
    """benchmarks/methods_table.py builds every row's config before it trains anything."""
    from jpeft.models import llama
    from train import run

    model = llama.model(llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                                          num_heads=4))
    labels = {}
    for name in methods_table.METHODS:
        # AdaLoRA's schedule (tinit 8, tfinal 8) and ULMFiT's unfreezing (a group every 10 steps) need more than
        # 3 steps: a 3-step run is refused (checked in their own tests), so no phases here and a group a step
        schedule = {"adalora": ["adalora.tinit=0", "adalora.tfinal=0"],
                    "ulmfit": ["ulmfit.unfreeze_every=1"]}.get(name, [])
        cfg = methods_table.method_config(name, ["train.steps=3", "train.warmup_steps=1", *schedule], str(tmp_path))
        assert cfg.train.steps == 3 and cfg.run_dir == str(tmp_path / name)
        method = run.make_method(cfg, model, tokenizer=lambda text: [1, 2, 3])  # every row's method builds
        labels[name] = run.method_label(cfg, method)
    assert len(set(labels.values())) == len(labels), labels  # every row is told apart in the table
    assert labels["p_tuning_plain"] == "p_tuning (random init)" and labels["qlora"] == "lora r=8 (nf4 base)"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"quantize": "nf3"}}, r"'model.quantize': 'nf3' must be one of 'nf4', 'int4', 'int8'"),
        ({"method": "qlora"}, r"'method': 'qlora' must be one of .*'bottleneck'"),
        ({"prompt_tuning": {"num_virtual_tokens": 0}}, r"'prompt_tuning.num_virtual_tokens': 0 must be a positive int"),
        ({"prompt_tuning": {"init": "random"}}, r"'prompt_tuning.init': 'random' must be one of 'text'"),
        ({"method": "prompt_tuning", "prompt_tuning": {"init_text": " "}}, r"'prompt_tuning.init_text'.*empty"),
        ({"prefix_tuning": {"projection": "yes"}}, r"'prefix_tuning.projection': 'yes' is a str, it needs a bool"),
        ({"prefix_tuning": {"hidden_size": 0}}, r"'prefix_tuning.hidden_size': 0 must be a positive int or None"),
        ({"prefix_tuning": {"init": "vocab"}}, r"'prefix_tuning.init': 'vocab' must be one of 'text', 'normal'"),
        ({"method": "prefix_tuning", "prefix_tuning": {"init_text": ""}}, r"'prefix_tuning.init_text'.*empty"),
        ({"method": "prefix_tuning", "prefix_tuning": {"init_text": "x", "projection": True}},
         r"'prefix_tuning.projection': True needs init='normal'"),
        ({"p_tuning": {"encoder": "gru"}}, r"'p_tuning.encoder': 'gru' must be one of 'mlp', 'lstm'"),
        ({"method": "p_tuning", "p_tuning": {"init": "text", "init_text": ""}}, r"'p_tuning.init_text'.*empty"),
        ({"p_tuning": {"residual": 1}}, r"'p_tuning.residual': 1 is a int, it needs a bool"),
        ({"ia3": {"target": "x"}}, r"unknown key 'ia3.target'.*did you mean 'targets'"),
        ({"bottleneck": {"placement": "middle"}}, r"'bottleneck.placement': 'middle' must be one of"),
        ({"bottleneck": {"size": 2.5}}, r"'bottleneck.size': 2.5 is a float, it needs a int"),
    ],
)
def test_method_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_dict(raw)


def test_method_overrides():
    cfg = config_lib.apply_overrides(config_lib.from_dict({}), ["method=ia3", "ia3.feedforward=null",
                                                                 "model.quantize=int8"])
    assert (cfg.method, cfg.ia3.feedforward, cfg.model.quantize, cfg.bottleneck.size) == ("ia3", None, "int8", 64)
    with pytest.raises(ConfigError, match=r"unknown key 'bottleneck.sise'.*did you mean 'size'"):
        config_lib.apply_overrides(cfg, ["method=bottleneck", "bottleneck.sise=3"])


def test_total_step_is_context_not_a_setting():
    from train import run

    with pytest.raises(ConfigError, match=r"unknown key 'adalora.total_step'"):
        config_lib.from_dict({"method": "adalora", "adalora": {"total_step": 40}})
    cfg = config_lib.from_dict({"method": "adalora", "adalora": {"tinit": 30, "tfinal": 10}, "train": {"steps": 40}})
    with pytest.raises(ConfigError, match="leave no budgeting phase in total_step=40"):
        run.make_method(cfg)


def test_cli_exits_2_on_a_bad_method_section(tmp_path):
    out_dir = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(REPO / "configs" / "smollm2_bbc_bottleneck.yaml"),
         f"out_dir={out_dir}", "bottleneck.placement=middle"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'bottleneck.placement': 'middle' must be one of 'pfeiffer', 'houlsby'" in proc.stderr
    assert not out_dir.exists()


# ---------------------------------------------------------------- methods


def test_prompt_tuning_init_text_is_tokenized(loaded_models):
    from train import run

    loaded = loaded_models[None]
    cfg = config_lib.from_dict({"method": "prompt_tuning",
                                "prompt_tuning": {"num_virtual_tokens": 3, "init_text": "Headline:"}})
    ids = loaded.tokenizer("Headline:", add_special_tokens=False)["input_ids"]
    adapter = run.make_method(cfg, loaded.model, loaded.tokenizer).init(jax.random.key(0), loaded.params)
    table = np.asarray(loaded.params["embed_tokens"]["embedding"])
    expected = table[(ids * 3)[:3]]
    np.testing.assert_allclose(np.asarray(adapter["prompt"]["embeddings"]), expected)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        run.make_method(cfg, loaded.model)


def test_prefix_tuning_init_text_runs_the_model_over_the_text(loaded_models):
    from jpeft.models import llama
    from train import run

    loaded = loaded_models[None]
    cfg = config_lib.from_dict({"method": "prefix_tuning",
                                "prefix_tuning": {"num_virtual_tokens": 4, "init_text": "Headline:"}})
    ids = loaded.tokenizer("Headline:", add_special_tokens=False)["input_ids"]
    adapter = run.make_method(cfg, loaded.model, loaded.tokenizer).init(jax.random.key(0), loaded.params)
    want_key, want_value = llama.keys_values_of_text(loaded.params, loaded.config, (ids * 4)[:4])
    np.testing.assert_array_equal(adapter["prefix"]["key"], want_key)
    np.testing.assert_array_equal(adapter["prefix"]["value"], want_value)
    with pytest.raises(ValueError, match="pass model="):
        run.make_method(cfg, None, loaded.tokenizer)


def test_evaluation_params_per_method(loaded_models):
    """Merged plain arrays for LoRA on a float base; the 4-bit base kept (apply) for QLoRA."""
    from jpeft import quant
    from jpeft.models import llama
    from train import run

    qloaded = loaded_models["nf4"]
    cfg = config_lib.from_dict({"model": {"quantize": "nf4"}, "lora": {"rank": 4}})
    method = run.make_method(cfg, qloaded.model)
    adapter = method.init(jax.random.key(1), qloaded.params)
    adapter = jax.tree.map(lambda x: x + 0.05, adapter)  # B != 0: the delta matters
    q_proj = qloaded.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert quant.is_quantized(q_proj)

    applied = jpeft.for_inference(method, qloaded.params, adapter)
    assert quant.is_quantized(applied["layers"]["self_attn"]["q_proj"]["kernel"].base)
    merged = method.merge(qloaded.params, adapter)  # plain weights: dequantized base + delta
    merged_q = merged["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(merged_q, jax.Array) and merged_q.shape == q_proj.shape
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))

    tokens = jnp.arange(1, 9, dtype=jnp.int32)[None]
    logits_apply, _ = llama.forward(applied, qloaded.config, tokens)
    logits_merge, _ = llama.forward(merged, qloaded.config, tokens)
    np.testing.assert_allclose(np.asarray(logits_apply), np.asarray(logits_merge), atol=2e-3, rtol=2e-3)

    merged_float = jpeft.for_inference(method, loaded_models[None].params, adapter)
    assert isinstance(merged_float["layers"]["self_attn"]["q_proj"]["kernel"], jax.Array)
    bottleneck_cfg = config_lib.from_dict({"method": "bottleneck"})
    bottleneck = run.make_method(bottleneck_cfg, loaded_models[None].model)
    b_adapter = bottleneck.init(jax.random.key(2), loaded_models[None].params)
    applied = jpeft.for_inference(bottleneck, loaded_models[None].params, b_adapter)
    assert "mlp_output" in applied["layers"]["hooks"]


def test_full_finetuning_refuses_a_quantized_base(loaded_models):
    from train import run

    cfg = config_lib.from_dict({"method": "full", "model": {"quantize": "nf4"}})
    with pytest.raises(ValueError, match="a quantized base cannot be trained"):
        run.make_method(cfg, loaded_models["nf4"].model).init(jax.random.key(0), loaded_models["nf4"].params)


# ---------------------------------------------------------------- tiny runs


def _tiny_config(tmp_path, folder, bbc_dir, method, section, *, quantize=None, lr, **extra):
    """Four training articles in batches of four: every step sees the same examples, so the loss must fall."""
    return config_lib.from_dict({
        "name": f"tiny_{method}",
        "method": method,
        "run_dir": str(tmp_path / method),
        "progress": False,
        "model": {"hf_folder": str(folder), "quantize": quantize},
        **({method: section} if section is not None else {}),  # the run's own section (else the defaults)
        "data": {"dir": str(bbc_dir), "max_article_tokens": 24, "max_headline_tokens": 12, "bucket_size": 32,
                 "max_train_articles": 4},
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "eval_every": 8, "val_batches": 1, "lr": lr},
        "eval": {"test_articles": 4, "batch_size": 4, "max_new_tokens": 4, "base_model": False},
        **extra,
    })


def _trainable_is_the_adapter(cfg, loaded, records, adapter, adapter_dir):
    trainable = next(r for r in records if r["kind"] == "params")["trainable"]
    assert trainable == sum(x.size for x in jax.tree.leaves(adapter)) > 0
    return trainable


def _folded_to(key):
    def check(cfg, loaded, records, adapter, adapter_dir):
        assert set(adapter) == {key}  # folded before saving
    return check


def _bitfit(cfg, loaded, records, adapter, adapter_dir):
    assert _trainable_is_the_adapter(cfg, loaded, records, adapter, adapter_dir) == 64 * (2 * 2 + 1)


def _selective(cfg, loaded, records, adapter, adapter_dir):  # the top one of two layers
    want = sum(x.size for x in jax.tree.leaves(loaded.params["layers"])) // 2
    assert _trainable_is_the_adapter(cfg, loaded, records, adapter, adapter_dir) == want


def _pir(cfg, loaded, records, adapter, adapter_dir):
    trainable = next(r for r in records if r["kind"] == "params")["trainable"]
    assert set(adapter) == {"values", "indices"} and trainable == 5000
    assert np.all(np.diff(np.asarray(adapter["indices"])) > 0)


def _dora(cfg, loaded, records, adapter, adapter_dir):
    assert {p.rsplit("/", 1)[1] for p in jpeft.tree.flatten(adapter)} == {"a", "b", "m"}


def _pissa_runs_as_plain_lora(cfg, loaded, records, adapter, adapter_dir):
    """generate runs a PiSSA adapter as a plain rank-2r LoRA over the loaded weights."""
    from train import run
    from train.generate import load_adapter

    assert {p.rsplit("/", 1)[1] for p in jpeft.tree.flatten(adapter)} == {"a", "b"}
    pissa = run.make_method(cfg, loaded.model, loaded.tokenizer)
    trained = pissa.merge(pissa.training.rebase.base(loaded.params, pissa.init(jax.random.key(cfg.train.seed),
                                                                                 loaded.params)), adapter)
    plain, plain_adapter = load_adapter("p", adapter_dir, loaded)
    assert plain.training.rebase is None and plain.describe().startswith("lora r=8")
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % loaded.model.config.vocab_size
    want, _ = loaded.model.forward(trained, tokens)
    got, _ = loaded.model.forward(plain.merge(loaded.params, plain_adapter), tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def _pissa_on_nf4_is_refused_as_plain_lora(cfg, loaded, records, adapter, adapter_dir):
    """The run's base was the re-quantized residual: the plain-LoRA form would not be the trained model."""
    from train.generate import load_adapter

    assert {p.rsplit("/", 1)[1] for p in jpeft.tree.flatten(adapter)} == {"a", "b"}
    with pytest.raises(CheckpointError, match="re-quantized residual"):
        load_adapter("p", adapter_dir, loaded)


class Run(NamedTuple):
    """A tiny run: the method, its section (None: the defaults), the base, the learning rate, whether to
    score ROUGE (generation through the adapter), another method whose config must refuse the saved
    adapter, and what else must hold of the saved adapter."""
    method: str
    section: dict | None
    quantize: str | None = None
    lr: float = 3e-2
    rouge: bool = True
    other: str | None = None
    check: Callable[..., Any] | None = None


PROMPT = "Write a headline for this article:"
QV = ".*/(q|v)_proj/kernel"
RUNS = [  # ROUGE where inference takes its own path: a 4-bit base, a prompt, a prefix, block hooks.
    # P-tuning is a prompt once folded; IA3 is merged into the weights.
    pytest.param(Run("lora", {"rank": 4, "alpha": 8}, "nf4", 3e-2, True, "ia3"), id="qlora"),
    pytest.param(Run("prompt_tuning", {"num_virtual_tokens": 4, "init_text": PROMPT}, lr=3e-1, other="p_tuning"),
                 id="prompt_tuning"),
    pytest.param(Run("ia3", None, lr=1e-1, rouge=False, other="lora"), id="ia3"),
    # ~20 s each on 2 cores; their library paths (and folding, init, budgets) are tested in their own modules
    *(pytest.param(run, id=name, marks=pytest.mark.slow) for name, run in {
        "prefix_tuning": Run("prefix_tuning", {"num_virtual_tokens": 4, "init_text": PROMPT}, other="lora",
                             check=_folded_to("prefix")),
        "p_tuning": Run("p_tuning", {"num_virtual_tokens": 4, "hidden_size": 32}, rouge=False,
                        other="prompt_tuning", check=_folded_to("prompt")),
        "bottleneck": Run("bottleneck", {"size": 8, "placement": "houlsby"}, other="lora"),
        "vera": Run("vera", {"rank": 4}, check=_trainable_is_the_adapter),
        "oft": Run("oft", {"block_size": 8}, check=_trainable_is_the_adapter),
        "loha": Run("loha", {"rank": 2, "alpha": 4}, check=_trainable_is_the_adapter),
        "lokr": Run("lokr", {"rank": 2, "alpha": 4}, check=_trainable_is_the_adapter),
        "dora": Run("dora", {"rank": 4, "targets": QV}, lr=3e-3, check=_dora),
        "pissa": Run("lora", {"rank": 4, "targets": QV, "init": "pissa"}, lr=3e-3, check=_pissa_runs_as_plain_lora),
        "pissa_nf4": Run("lora", {"rank": 4, "targets": QV, "init": "pissa"}, "nf4", lr=3e-3,  # residual re-quantized
                         check=_pissa_on_nf4_is_refused_as_plain_lora),
        "bitfit": Run("bitfit", None, lr=1e-1, rouge=False, check=_bitfit),  # the same trainer path as ulmfit's stages
        "selective": Run("selective", {"top_layers": 1}, lr=3e-3, check=_selective),
        "pir": Run("pir", {"budget": 5000, "score_batches": 2}, rouge=False, check=_pir),  # prepare: scores from batches
    }.items()),
]


@pytest.mark.parametrize("case", RUNS)
def test_tiny_method_run_end_to_end(tmp_path, mixing_hf_folder, bbc_dir, loaded_models, case):
    from train import run

    cfg = _tiny_config(tmp_path, mixing_hf_folder, bbc_dir, case.method, case.section, quantize=case.quantize,
                       lr=case.lr)
    if not case.rouge:
        cfg = config_lib.apply_overrides(cfg, ["eval.test_articles=0"])
    loaded = loaded_models[case.quantize]
    summary = run.run(cfg, loaded=loaded)
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses
    if case.rouge:
        tuned = summary["rouge"][-1]
        assert tuned["model"] == run.method_label(cfg, run.make_method(cfg, loaded.model, loaded.tokenizer))
        assert np.isfinite(tuned["rouge1"])
        assert len((run_dir / "predictions_tuned.jsonl").read_text().splitlines()) == 4

    adapter, meta = run.restore(str(run_dir / "adapter"), cfg, loaded)
    assert meta["method"] == case.method and meta["model"]["quantize"] == case.quantize
    if case.check is not None:
        case.check(cfg, loaded, records, adapter, str(run_dir / "adapter"))
    if case.other is not None:
        other_cfg = config_lib.apply_overrides(cfg, [f"method={case.other}", f"{case.method}=null"])  # section dropped
        with pytest.raises(CheckpointError, match=f"holds a '{case.method}' adapter, not a '{case.other}' one"):
            run.restore(str(run_dir / "adapter"), other_cfg, loaded)


@pytest.mark.slow  # a trainer run (about a minute on the shared 2-core machine)
def test_tiny_adalora_run_follows_its_budget_schedule(tmp_path, mixing_hf_folder, bbc_dir, loaded_models, capsys):
    """AdaLoRA's budget schedule, penalty and rank-pattern summary go through the trainer without AdaLoRA code
    in it; the saved adapter's PEFT config keeps the final rank pattern."""
    from jpeft.io.peft import save_peft
    from jpeft.methods import adalora as adalora_lib
    from train import run

    loaded = loaded_models[None]
    cfg = _tiny_config(tmp_path, mixing_hf_folder, bbc_dir, "adalora",
                       {"init_r": 4, "target_r": 2, "alpha": 8, "tinit": 2, "tfinal": 2}, lr=3e-2,
                       checkpoint={"every": 4})
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
