"""Bad input, refused commands, damaged checkpoints and diverging runs, as a user meets them.

Each case runs ``python -m train``'s entry point in-process (``train.__main__.main``) and checks
what a person sees: one message naming the file or setting, the exit status, and that nothing
was written (or that an earlier run's files are exactly as they were).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jpeft import quant
from jpeft.checkpoint import restore_adapter
from train import __main__ as cli


def tiny_raw(folder, run_dir, **sections) -> dict:
    raw = {
        "name": "tiny", "method": "lora", "run_dir": str(run_dir), "progress": False,
        "model": {"hf_folder": str(folder)},
        "lora": {"rank": 2, "alpha": 4},
        "data": {"max_article_tokens": 16, "max_headline_tokens": 8, "bucket_size": 32, "max_train_articles": 8},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 100, "val_batches": 1, "lr": 1e-2},
        "eval": {"test_articles": 0},
        "checkpoint": {"every": 2, "keep": 3, "async_save": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def write_config(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run_cli(capsys, config: str, *overrides) -> tuple[int, str]:
    code = cli.main(["--config", config, *overrides])
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under ``folder``: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. messages, not tracebacks


@pytest.fixture
def broken_inputs(tmp_path, tiny_hf_folder):
    """Files a user might point the program at by mistake."""
    (tmp_path / "a_folder.yaml").mkdir()
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "not.gguf").write_bytes(b"GGUF" + b"\x00" * 50)
    truncated = tmp_path / "truncated_hf"
    shutil.copytree(tiny_hf_folder, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad_json = tmp_path / "bad_json_hf"
    shutil.copytree(tiny_hf_folder, bad_json)
    (bad_json / "config.json").write_text("{not json")
    gpt2 = tmp_path / "gpt2_hf"
    shutil.copytree(tiny_hf_folder, gpt2)
    (gpt2 / "config.json").write_text(json.dumps({**json.loads((gpt2 / "config.json").read_text()),
                                                  "model_type": "gpt2"}))
    no_tokenizer = tmp_path / "no_tokenizer_hf"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_hf_folder / name, no_tokenizer / name)
    (tmp_path / "a_file").write_text("in the way")
    return tmp_path


CASES = {  # name: (config file (None: a good one), overrides, what the message must say)
    "config is a folder": ("a_folder.yaml", [], "is a folder"),
    "config is binary": ("binary.yaml", [], "not a text file"),
    "not a gguf": (None, ["model.hf_folder=null", "model.gguf={t}/not.gguf"], "is not a readable GGUF file"),
    "truncated safetensors": (None, ["model.hf_folder={t}/truncated_hf"], "safetensors"),
    "invalid config.json": (None, ["model.hf_folder={t}/bad_json_hf"], "config.json is not valid JSON"),
    "unsupported model_type": (None, ["model.hf_folder={t}/gpt2_hf"], "Unsupported model_type 'gpt2'"),
    "no tokenizer": (None, ["model.hf_folder={t}/no_tokenizer_hf"], "has no tokenizer"),
    "missing data folder": (None, ["data.dir={t}/no_such_data"], "data.dir="),
    "out_dir blocked": (None, ["run_dir=null", "out_dir={t}/a_file/runs"], "is a file, not a folder"),
    "run_dir is a file": (None, ["run_dir={t}/a_file"], "run_dir="),
    "unknown sharding rules": (None, ["sharding.rules=tensor_only"], "'sharding.rules'"),
    "batch larger than the data": (None, ["data.max_train_articles=3"], "larger than the 3 training articles"),
    "no validation batch": (None, ["data.val_fraction=0.0005"], "no validation loss"),
    "infinite learning rate": (None, ["train.lr=inf"], "not a finite number"),
    "infinite lora alpha": (None, ["lora.alpha=.inf"], "not a finite number"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_foreseeable_bad_input_is_one_message_exit_2_and_nothing_written(capsys, broken_inputs, tiny_hf_folder,
                                                                         case):
    config_name, overrides, expected = CASES[case]
    run_dir = broken_inputs / "runs" / "run"
    good = write_config(broken_inputs / "good.yaml", tiny_raw(tiny_hf_folder, run_dir))
    config = str(broken_inputs / config_name) if config_name else good
    code, err = run_cli(capsys, config, *[o.format(t=broken_inputs) for o in overrides])
    assert code == 2, err
    assert expected in err and "Traceback" not in err and len(err.splitlines()) <= 3, err
    assert not (broken_inputs / "runs").exists()


# ----------------------------------------------------------------------------- 2. a refused command changes nothing


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_hf_folder):
    """A tiny run with checkpoints at steps 2 and 4, run once; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    raw = tiny_raw(tiny_hf_folder, root / "run")
    config = write_config(root / "tiny.yaml", raw)
    assert cli.main(["--config", config]) == 0
    return root / "run", raw


def copy_run(finished_run, tmp_path) -> tuple[Path, str]:
    source, raw = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return run_dir, write_config(tmp_path / "tiny.yaml", {**raw, "run_dir": str(run_dir)})


@pytest.mark.parametrize("overrides, expected", [
    (["train.lr=0.02"], "train.lr=0.01 (this run: 0.02)"),
    (["method=ia3", "lora=null"], "holds a 'lora' run; this config trains 'ia3'"),
    (["checkpoint.resume=false"], "set checkpoint.resume=true"),
    (["lora.rank=3"], "shape mismatch"),
])
def test_a_refused_resume_changes_nothing_in_the_run(capsys, finished_run, tmp_path, overrides, expected):
    run_dir, config = copy_run(finished_run, tmp_path)
    before = snapshot(run_dir)
    code, err = run_cli(capsys, config, *overrides)
    assert code == 2 and expected in err, err
    assert snapshot(run_dir) == before


def test_a_folder_that_is_not_a_run_is_refused(capsys, tmp_path, tiny_hf_folder):
    users = tmp_path / "my_experiments"
    users.mkdir()
    (users / "config.yaml").write_text("my own notes\n")
    config = write_config(tmp_path / "tiny.yaml", tiny_raw(tiny_hf_folder, users))
    code, err = run_cli(capsys, config)
    assert code == 2 and "not a jpeft run folder" in err, err
    assert snapshot(users) == {"config.yaml": b"my own notes\n"}


# ----------------------------------------------------------------------------- 3. a damaged newest checkpoint


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(capsys, finished_run, tmp_path):
    run_dir, config = copy_run(finished_run, tmp_path)
    good, _ = restore_adapter(run_dir / "adapter")
    for path in (run_dir / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncate every array file
    with pytest.warns(UserWarning, match=r"skipped unreadable checkpoint\(s\) \[4\].*resuming from step 2"):
        code, err = run_cli(capsys, config)
    assert code == 0, err
    # Steps 3 and 4 ran again from step 2's state: the same adapter as the uninterrupted run.
    again, _ = restore_adapter(run_dir / "adapter")
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (run_dir / "checkpoints" / "corrupt-4").is_dir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def test_no_readable_checkpoint_is_refused(capsys, finished_run, tmp_path):
    run_dir, config = copy_run(finished_run, tmp_path)
    for step in ("2", "4"):
        (run_dir / "checkpoints" / step / "meta" / "metadata").write_text("{garbled")
    before = snapshot(run_dir)
    code, err = run_cli(capsys, config)
    assert code == 2 and "no checkpoint" in err and "can be read" in err, err
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------- 4. a loss that stops being finite


def test_a_diverging_run_stops_names_the_step_and_keeps_finite_checkpoints(capsys, tmp_path, tiny_hf_folder):
    run_dir = tmp_path / "run"
    raw = tiny_raw(tiny_hf_folder, run_dir, train={"lr": 1e30, "grad_clip": 1e30, "steps": 6},
                   checkpoint={"every": 1})
    code, err = run_cli(capsys, write_config(tmp_path / "tiny.yaml", raw))
    assert code == 3, err
    assert "training stopped: the loss is" in err and "at step" in err and "train.lr" in err, err
    assert not (run_dir / "adapter").exists()  # no final adapter from a diverged run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in records if r.get("skipped")]
    assert len(bad) == 1 and not np.isfinite(bad[0]["loss"]) and str(bad[0]["step"]) in err
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < bad[0]["step"]
    from train.checkpointing import Checkpoints

    ckpts = Checkpoints(str(run_dir / "checkpoints"), every=1, keep=3)
    state = ckpts.store.restore(steps[-1], dict(ckpts.store.manager.item_metadata(steps[-1])["state"].tree))
    ckpts.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["adapter"]))


def test_a_bounded_number_of_bad_steps_can_be_skipped(capsys, tmp_path, tiny_hf_folder):
    raw = tiny_raw(tiny_hf_folder, tmp_path / "run", train={"lr": 1e30, "grad_clip": 1e30, "steps": 4,
                                                           "max_bad_steps": 10})
    code, err = run_cli(capsys, write_config(tmp_path / "tiny.yaml", raw))
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(bool(r.get("skipped")) for r in records) >= 1


def test_quantizing_a_weight_with_nan_names_it():
    w = np.ones((64, 8), np.float32)
    w[5, 3] = np.nan
    with pytest.raises(quant.QuantizationError, match=r"'layers_0/mlp/up_proj/kernel'.*1 non-finite"):
        quant.quantize({"layers_0": {"mlp": {"up_proj": {"kernel": w}}}}, r".*/kernel")


def test_an_empty_corpus_folder_is_a_config_error(capsys, tmp_path, tiny_hf_folder):
    (tmp_path / "empty_data").mkdir()
    raw = tiny_raw(tiny_hf_folder, tmp_path / "runs" / "run", data={"dir": str(tmp_path / "empty_data")})
    code, err = run_cli(capsys, write_config(tmp_path / "tiny.yaml", raw))
    assert code == 2 and "no <category>/<nnn>.txt articles" in err, err
    assert not (tmp_path / "runs").exists()
