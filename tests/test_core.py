"""The open core: roles from logical axes, containers kept by split/combine, the method registry, import lines."""

import ast
import pathlib
import re
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import layout, ops, quant, tree
from jpeft.methods import registry
from jpeft.models import ParamSpec, spec

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- roles from logical axes


class TinyEinsumModel(NamedTuple):
    """A model whose attention kernels are DenseGeneral-style: (embed, heads, head_dim) and (heads, head_dim, embed).

    Only what LoRA/IA3/quantization ask of a model: its layouts (from parameter specs).
    """

    def specs(self):
        return {"embed": {"embedding": ParamSpec((16, 64), ("vocab", "embed"))},
                "q": {"kernel": ParamSpec((64, 4, 16), ("embed", "heads", "head_dim"))},
                "o": {"kernel": ParamSpec((4, 16, 64), ("heads", "head_dim", "embed"), inputs=2)}}

    def layouts(self):
        return spec.layouts(self.specs())


def einsum_forward(params, ids_BxT):
    x_BxTxD = ops.embed(ids_BxT, params["embed"]["embedding"])
    q_BxTxNxH = ops.einsum("btd,dnh->btnh", x_BxTxD, params["q"]["kernel"])
    return ops.einsum("btnh,nhd->btd", jnp.tanh(q_BxTxNxH), params["o"]["kernel"])


def test_roles_come_from_logical_axes_not_paths():
    model = TinyEinsumModel()
    layouts = model.layouts()
    assert layouts["q/kernel"] == layout.Layout("kernel", lead=0, inputs=1)
    assert layouts["o/kernel"] == layout.Layout("kernel", lead=0, inputs=2)
    assert layouts["embed/embedding"].kind == "table"
    assert layout.layout_of(("layers", "embed", "mlp")).lead == 1
    # The same leaf under another name is still a table: the path plays no part.
    assert layout.layouts_for({"x": jnp.zeros((16, 64))}, axes={"x": ("vocab", "embed")})["x"].kind == "table"


def test_lora_factors_multi_axis_kernels_along_their_real_input_and_output_axes():
    model = TinyEinsumModel()
    params = spec.init_params(model.specs(), jax.random.key(0), stddev=0.3)
    method = jpeft.lora(rank=3, alpha=6, targets=r"(q|o)/kernel|embed/embedding", model=model)
    adapter = method.init(jax.random.key(1), params)
    assert adapter["q"]["kernel"]["a"].shape == (64, 3) and adapter["q"]["kernel"]["b"].shape == (3, 4, 16)
    assert adapter["o"]["kernel"]["a"].shape == (4, 16, 3) and adapter["o"]["kernel"]["b"].shape == (3, 64)
    # An embedding table starts the other way round (A zero, B normal), as Hugging Face PEFT does.
    assert float(jnp.abs(adapter["embed"]["embedding"]["a"]).max()) == 0.0
    assert float(jnp.abs(adapter["embed"]["embedding"]["b"]).max()) > 0.0
    ids = jnp.array([[1, 2, 3], [4, 5, 15]])
    np.testing.assert_array_equal(einsum_forward(method.apply(params, adapter), ids), einsum_forward(params, ids))

    trained = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), adapter)
    # Reference: W + s * A B contracted over the rank, written out with numpy in float64.
    a, b = (np.asarray(trained["o"]["kernel"][k], np.float64) for k in "ab")
    merged = method.merge(params, trained)
    np.testing.assert_allclose(merged["o"]["kernel"], np.asarray(params["o"]["kernel"]) + 2.0 * np.einsum(
        "nhr,rd->nhd", a, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(einsum_forward(method.apply(params, trained), ids), einsum_forward(merged, ids),
                               rtol=1e-4, atol=1e-4)
    axes = jpeft.methods.lora.logical_axes(trained, {"q": {"kernel": ("embed", "heads", "head_dim")},
                                                     "o": {"kernel": ("heads", "head_dim", "embed")},
                                                     "embed": {"embedding": ("vocab", "embed")}})
    assert axes["q"]["kernel"]["b"] == ("lora_rank", "heads", "head_dim")
    assert axes["o"]["kernel"]["a"] == ("heads", "head_dim", "lora_rank")


def test_ia3_and_quantization_follow_the_layout():
    model = TinyEinsumModel()
    params = spec.init_params(model.specs(), jax.random.key(0), stddev=0.3)
    ia3 = jpeft.ia3(targets=r"(q|o)/kernel", feedforward=r"o/kernel", model=model)
    adapter = ia3.init(jax.random.key(0), params)
    assert adapter["q"]["kernel"]["ia3_l"].shape == (4, 16)  # q's output axes
    assert adapter["o"]["kernel"]["ia3_l"].shape == (4, 16)  # o's input axes (a feed-forward-style target)
    trained = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), adapter)
    ids = jnp.array([[1, 2, 3]])
    np.testing.assert_allclose(einsum_forward(ia3.apply(params, trained), ids),
                               einsum_forward(ia3.merge(params, trained), ids), rtol=1e-4, atol=1e-5)
    q = quant.quantize(params, r"(q|o)/kernel|embed/embedding", "int8", model=model, block_size=16)
    assert q["q"]["kernel"].axis == -3 and q["o"]["kernel"].axis == -2 and q["embed"]["embedding"].axis == -1
    np.testing.assert_allclose(einsum_forward(q, ids), einsum_forward(quant.dequantize(q), ids), rtol=1e-5)


# ----------------------------------------------------------------------------- containers


class Pair(NamedTuple):
    kernel: Any
    bias: Any


def test_split_and_combine_keep_the_containers_they_were_given():
    flax_core = pytest.importorskip("flax.core")
    params = {"blocks": [Pair(jnp.ones((2, 2)), jnp.zeros(2)), Pair(jnp.ones((2, 3)), jnp.zeros(3))],
              "head": (jnp.ones(4), jnp.ones(5)),
              "frozen_dict": flax_core.FrozenDict({"kernel": jnp.ones((3, 3))})}
    picked, rest = tree.split(params, r".*/kernel")
    assert isinstance(picked["blocks"], list) and isinstance(picked["blocks"][1], Pair)
    assert isinstance(picked["head"], tuple) and isinstance(rest["frozen_dict"], flax_core.FrozenDict)
    assert picked["blocks"][0].bias is None and rest["blocks"][0].kernel is None
    assert sorted(tree.flatten(picked)) == ["blocks/0/kernel", "blocks/1/kernel", "frozen_dict/kernel"]
    back = tree.combine(picked, rest)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    # Full fine-tuning of a subset keeps the containers too, and gradients flow only to it.
    method = jpeft.full(r"blocks/1/kernel")
    adapter = method.init(jax.random.key(0), params)
    applied = method.apply(params, adapter)
    assert isinstance(applied["blocks"][1], Pair) and isinstance(applied["frozen_dict"], flax_core.FrozenDict)
    grads = jax.grad(lambda a: jnp.sum(method.apply(params, a)["blocks"][1].kernel ** 2))(adapter)
    assert list(tree.flatten(grads)) == ["blocks/1/kernel"]
    # LoRA wraps leaves in place: the containers stay.
    lora = jpeft.lora(rank=1, targets=r"blocks/.*/kernel")
    wrapped = lora.apply(params, lora.init(jax.random.key(0), params))
    assert isinstance(wrapped["blocks"][0], Pair) and isinstance(wrapped["blocks"][0].kernel, jpeft.LoraWeight)


# ----------------------------------------------------------------------------- the library / program line


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_methods_and_loaders_import_no_model_family_and_the_library_no_program():
    families = {f"jpeft.models.{name}" for name in jpeft.models.families.names()}
    for path in sorted((REPO / "jpeft").rglob("*.py")):
        imported = _imports(path)
        assert not any(i == "train" or i.startswith("train.") for i in imported), path
        if path.parent.name in ("methods", "io"):
            assert not imported & families, (path, imported & families)


def test_import_jpeft_leaves_the_program_dependencies_out():
    code = ("import sys, jpeft, jpeft.io, jpeft.sharding, jpeft.checkpoint, jpeft.quant; "
            "print(sorted(m for m in ('transformers', 'matplotlib', 'tqdm', 'rouge_score', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------- the method registry


def test_registry_settings_come_from_the_builder_signature():
    assert {"lora", "full", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3", "bottleneck"} <= set(
        registry.names())
    assert registry.defaults("lora")["rank"] == 8 and "model" not in registry.settings("lora")
    with pytest.raises(registry.SettingsMappingError, match=r"unknown setting 'rnak'; did you mean 'rank'"):
        registry.check_settings("lora", {"rnak": 2})
    with pytest.raises(registry.SettingsMappingError, match=r"2.5 is a float, it needs a int") as info:
        registry.check_settings("lora", {"rank": 2.5})
    assert info.value.setting == "rank"
    with pytest.raises(registry.SettingsMappingError, match=r"'svd' must be one of 'kaiming', 'gaussian', 'pissa'"):
        registry.validate("lora", {"init": "svd"})  # a str (pissa_niter_<K> is a pattern): the builder checks it
    with pytest.raises(registry.SettingsMappingError, match=r"0 must be a positive integer") as info:
        registry.validate("lora", {"rank": 0})  # the builder's own check, before any model is loaded
    assert info.value.setting == "rank"
    with pytest.raises(registry.SettingsMappingError, match=r"unknown method 'lorra'; did you mean 'lora'"):
        registry.get("lorra")
    assert registry.check_settings("lora", {"alpha": 16, "dropout": "1e-1"}) == {"alpha": 16.0, "dropout": 0.1}


def norm_tuning(*, targets_axis: str = "norm", model: Any = None) -> jpeft.Method:
    """A method the trainer has never heard of: train every weight whose logical axes end in ``targets_axis``.

    It asks the model (the trainer hands it over because the builder takes ``model``) which
    leaves those are, and otherwise is full fine-tuning of them.
    """
    if model is None:
        raise ValueError("norm_tuning needs model=")
    axes = jpeft.methods.base.flatten_axes(model.param_axes())
    chosen = sorted(path for path, names in axes.items() if names and names[-1] == targets_axis)
    if not chosen:
        raise jpeft.errors.SettingError("targets_axis", targets_axis, "names no weight's last logical axis")
    full = jpeft.full(targets=[jpeft.Rule("|".join(map(re.escape, chosen)))])
    return full._replace(name="norm_tuning", label=f"norm tuning ({len(chosen)} weights)")


def test_a_method_defined_here_trains_through_the_programs_entry_point(tmp_path, tiny_hf_folder, bbc_dir):
    """No edit under train/: the method is registered here and named in a YAML config."""
    import json

    from train import __main__ as cli

    registry.register("norm_tuning", norm_tuning)
    try:
        config = tmp_path / "norm.yaml"
        run_dir = tmp_path / "run"
        config.write_text(f"""
name: norm
method: norm_tuning
norm_tuning: {{targets_axis: norm}}
run_dir: {run_dir}
progress: false
model: {{hf_folder: {tiny_hf_folder}}}
data: {{dir: {bbc_dir}, max_article_tokens: 24, max_headline_tokens: 12, bucket_size: 32, max_train_articles: 4}}
train: {{steps: 6, batch_size: 4, warmup_steps: 1, eval_every: 6, val_batches: 1, lr: 0.1}}
eval: {{test_articles: 0}}
""")
        assert cli.main(["--config", str(config)]) == 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r["kind"] == "train"]
        assert len(losses) == 6 and losses[-1] < losses[0], losses
        trainable = next(r for r in records if r["kind"] == "params")["trainable"]
        assert trainable == 64 * (2 * 2 + 1)  # two norms per layer, two layers, and the final norm
        _, meta = jpeft.checkpoint.restore_adapter(run_dir / "adapter", method="norm_tuning")
        assert meta["targets_axis"] == "norm"
        # A bad value of its setting is a config error naming the key, before anything is written.
        bad = tmp_path / "bad_run"
        assert cli.main(["--config", str(config), f"run_dir={bad}", "norm_tuning.targets_axis=heads"]) == 2
        assert not bad.exists()
    finally:
        registry._METHODS.pop("norm_tuning", None)
