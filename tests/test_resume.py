"""Training checkpoints: kill and resume, adapter-only bytes, shape errors, meshes.

A tiny random Llama (SmolLM2's tokenizer) trains on a few BBC articles without
ROUGE evaluation (``eval.test_articles=0``) so each run takes seconds.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jpeft.checkpoint import CheckpointError, restore_adapter
from train import config as config_lib

REPO = Path(__file__).resolve().parents[1]


def tiny_config(folder, run_dir, *, steps=12, batch_size=4, articles=8, **sections) -> dict:
    """A tiny LoRA run with dropout (so the dropout keys must resume too), without ROUGE."""
    raw = {
        "name": "tiny", "method": "lora", "run_dir": str(run_dir), "progress": False,
        "model": {"hf_folder": str(folder)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ".*/(q|k|v|o|gate|up|down)_proj/kernel"},
        "data": {"max_article_tokens": 24, "max_headline_tokens": 12, "bucket_size": 32,
                 "max_train_articles": articles},
        "train": {"steps": steps, "batch_size": batch_size, "warmup_steps": 1, "eval_every": 100,
                  "val_batches": 1, "lr": 3e-2},
        "eval": {"test_articles": 0},
        "checkpoint": {"every": 2, "keep": 2},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def saved_steps(checkpoint_dir: Path) -> list[int]:
    """Steps of the finished checkpoints (orbax renames a save's folder to its step when it is done)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # a killed subprocess and its resume, ~50 s on 2 cores: JPEFT_SLOW=1
def test_killed_run_resumes_bit_identical(tmp_path, tiny_hf_folder):
    from train import run

    steps, kill_after = 10, 4
    raw = tiny_config(tiny_hf_folder, tmp_path / "killed", steps=steps)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    checkpoints = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--config", str(config_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900  # a safety net for a hung run, not a time limit
    try:
        while not any(s >= kill_after for s in saved_steps(checkpoints)):
            assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 900 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted_at = max(saved_steps(checkpoints))
    assert kill_after <= interrupted_at < steps

    resumed = run.run(config_lib.from_dict(raw))  # the same run folder: continues from its last checkpoint
    reference = run.run(config_lib.from_dict({**raw, "run_dir": str(tmp_path / "reference")}))

    a, _ = restore_adapter(Path(resumed["run_dir"]) / "adapter")
    b, _ = restore_adapter(Path(reference["run_dir"]) / "adapter")
    assert_same_tree(a, b)  # bit-identical on CPU
    resumed_losses, reference_losses = train_losses(resumed["run_dir"]), train_losses(reference["run_dir"])
    assert resumed_losses == reference_losses  # the killed run's records up to its checkpoint, then the resumed
    records = [json.loads(line) for line in (Path(resumed["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "resume"] == [interrupted_at]
    assert saved_steps(checkpoints)[-1] == steps and len(saved_steps(checkpoints)) == 2  # checkpoint.keep


def test_checkpoint_holds_adapter_and_optimizer_only(tmp_path, tiny_hf_folder):
    from train import run

    raw = tiny_config(tiny_hf_folder, tmp_path / "run", steps=2, checkpoint={"every": 0})
    run.run(config_lib.from_dict(raw))
    adapter, _ = restore_adapter(tmp_path / "run" / "adapter")
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapter))
    on_disk = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoints").rglob("*") if f.is_file())
    frozen_bytes = sum(f.stat().st_size for f in tiny_hf_folder.glob("*.safetensors"))
    # adapter + Adam's two moments, plus orbax's metadata; the frozen model is ~400x the adapter
    assert 3 * adapter_bytes <= on_disk < 3 * adapter_bytes + 200_000 < frozen_bytes / 10


def lora_tree(hidden_size: int, rank: int = 4):
    import jpeft
    from jpeft.models import llama

    c = llama.LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, scan_layers=True)
    params = llama.model(c).init(jax.random.key(0))
    return jpeft.lora(rank=rank, targets=r".*/(q|v)_proj/kernel").init(jax.random.key(1), params)


def test_restore_onto_another_base_shape_is_a_clear_error(tmp_path):
    import optax

    from train.checkpointing import Checkpoints

    optimizer = optax.adam(1e-3)
    adapter = lora_tree(hidden_size=32)
    ckpts = Checkpoints(str(tmp_path / "ckpt"), every=1, keep=1)
    ckpts.save(3, adapter, optimizer.init(adapter), jax.random.key(0), seed=0, batch_size=4)
    ckpts.close()
    ckpts = Checkpoints(str(tmp_path / "ckpt"), every=1, keep=1)
    restored = ckpts.restore(adapter, optimizer.init(adapter), seed=0, batch_size=4)
    assert restored.step == 3
    assert_same_tree(restored.adapter, adapter)
    other = lora_tree(hidden_size=48)
    with pytest.raises(CheckpointError, match=r"(?s)another adapter or base model.*shape mismatch at "
                                              r"layers/self_attn/q_proj/kernel/a: checkpoint \(2, 32, 4\), "
                                              r"expected \(2, 48, 4\)"):
        ckpts.restore(other, optimizer.init(other), seed=0, batch_size=4)
    with pytest.raises(CheckpointError, match=r"train.batch_size=4, this run has 8"):
        ckpts.restore(adapter, optimizer.init(adapter), seed=0, batch_size=8)


def test_resume_with_another_schedule_is_a_clear_error(tmp_path):
    import optax

    from train.checkpointing import Checkpoints

    optimizer = optax.adam(1e-3)
    adapter = lora_tree(hidden_size=32)
    schedule = {"steps": 10, "lr": 1e-3, "schedule": "cosine"}
    ckpts = Checkpoints(str(tmp_path / "ckpt"), every=1, keep=1)
    ckpts.save(3, adapter, optimizer.init(adapter), jax.random.key(0), seed=0, batch_size=4, schedule=schedule)
    ckpts.close()
    ckpts = Checkpoints(str(tmp_path / "ckpt"), every=1, keep=1)
    assert ckpts.restore(adapter, optimizer.init(adapter), seed=0, batch_size=4, schedule=schedule).step == 3
    with pytest.raises(CheckpointError, match=r"train.steps=10 \(this run: 20\).*new run_dir"):
        ckpts.restore(adapter, optimizer.init(adapter), seed=0, batch_size=4, schedule={**schedule, "steps": 20})


@pytest.mark.slow  # three runs, ~60 s on 2 cores (tests/test_sharding.py checks a sharded step in-process)
def test_fsdp_mesh_matches_one_device_and_restores_on_another_mesh(tmp_path, tiny_hf_folder):
    from jax.sharding import NamedSharding, PartitionSpec

    from jpeft import sharding
    from train import run, trainer
    from train.checkpointing import Checkpoints

    assert jax.device_count() == 8  # tests/conftest.py
    one = tiny_config(tiny_hf_folder, tmp_path / "one", steps=4, batch_size=8, articles=16)
    fsdp = {**tiny_config(tiny_hf_folder, tmp_path / "fsdp", steps=4, batch_size=8, articles=16,
                          mesh={"fsdp": -1}), "sharding": {"rules": "fsdp"}}
    run.run(config_lib.from_dict(one))
    run.run(config_lib.from_dict(fsdp))
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "fsdp")
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    assert "[1, 8, 1]" in (tmp_path / "fsdp" / "checkpoints" / "4" / "state" / "_sharding").read_text()  # 8 devices

    # The FSDP run's checkpoint restored onto one device, and onto a 2 x 4 mesh.
    saved, _ = restore_adapter(tmp_path / "fsdp" / "adapter")
    optimizer, _ = trainer.make_optimizer(config_lib.from_dict(fsdp).train)
    for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4}):
        devices = jax.devices()[: int(np.prod(list(shape.values())))]
        mesh = sharding.make_mesh(shape, devices=devices)
        replicated = NamedSharding(mesh, PartitionSpec())
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), saved)
        opt_like = jax.eval_shape(optimizer.init, like)
        opt_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), opt_like)
        restored = Checkpoints(str(tmp_path / "fsdp" / "checkpoints"), every=2, keep=2).restore(
            like, opt_like, seed=0, batch_size=8)
        assert restored.step == 4
        assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored.adapter))
        assert_same_tree(restored.adapter, saved)


def test_bad_mesh_is_a_config_error_before_loading(tmp_path, tiny_hf_folder):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tiny_hf_folder, tmp_path / "run")))
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(config_path), "mesh.fsdp=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr
    assert "bad 'mesh'" in proc.stderr and "8 devices" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two processes, ~60-80 s: JPEFT_SLOW=1
def test_two_process_run_matches_one_device(tmp_path, tiny_hf_folder):
    """``python -m train`` in 2 local processes (2 CPU devices each, gloo), FSDP over all 4 devices."""
    import socket

    from train import run

    shape = dict(steps=4, batch_size=8, articles=16)
    one = tiny_config(tiny_hf_folder, tmp_path / "one", **shape)
    run.run(config_lib.from_dict(one))
    raw = {**tiny_config(tiny_hf_folder, tmp_path / "two", mesh={"fsdp": -1}, **shape), "sharding": {"rules": "fsdp"}}
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "train", "--config", str(config_path),
                               f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    assert "val loss" in outputs[0] and "val loss" not in outputs[1]  # process 0 alone prints
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    assert saved_steps(tmp_path / "two" / "checkpoints") == [2, 4]
    # The processes wrote one final adapter folder together, equal to the one-process adapter.
    adapter_one, _ = restore_adapter(tmp_path / "one" / "adapter")
    adapter_two, meta = restore_adapter(tmp_path / "two" / "adapter")
    assert meta["method"] == "lora" and not [p for p in os.listdir(tmp_path / "two") if ".tmp-" in p]
    for a, b in zip(jax.tree.leaves(adapter_one), jax.tree.leaves(adapter_two)):
        # Sums over 4 devices round differently, and Adam's normalised step magnifies that
        # for elements whose gradient is near zero: compare whole factors, not elements.
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(b - a) < 1e-3 * np.linalg.norm(a), np.linalg.norm(b - a) / np.linalg.norm(a)
