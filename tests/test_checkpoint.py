"""Tests for jpeft.checkpoint: adapter-only, atomic, checked orbax checkpoints."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import checkpoint
from jpeft.checkpoint import CheckpointError, restore_adapter, save_adapter


def _adapter(scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "layers": {
            "q_proj": {
                "a": scale * jax.random.normal(k1, (4, 64, 8)),
                "b": scale * jax.random.normal(k2, (4, 8, 64)).astype(jnp.bfloat16),
            }
        },
        "embed": {"prompt": jnp.arange(12.0).reshape(3, 4)},
    }


def _abstract(tree):
    return jax.eval_shape(lambda: tree)


def _dir_bytes(directory):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def test_round_trip_exact(tmp_path):
    adapter = _adapter()
    save_adapter(tmp_path / "ckpt", adapter, metadata={"method": "lora", "rank": 8})
    restored, meta = restore_adapter(tmp_path / "ckpt", like=_abstract(adapter))
    assert meta == {"method": "lora", "rank": 8}
    assert jax.tree.structure(restored) == jax.tree.structure(adapter)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(adapter)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_restore_without_like_and_tree_record(tmp_path):
    adapter = _adapter()
    save_adapter(tmp_path / "ckpt", adapter, metadata={})
    restored, _ = restore_adapter(tmp_path / "ckpt")
    np.testing.assert_array_equal(restored["embed"]["prompt"], adapter["embed"]["prompt"])
    tree = checkpoint.read_metadata(tmp_path / "ckpt")["tree"]
    assert tree["layers/q_proj/b"] == {"shape": [4, 8, 64], "dtype": "bfloat16"}


def test_missing_key_named(tmp_path):
    adapter = _adapter()
    small = {"layers": adapter["layers"]}
    save_adapter(tmp_path / "ckpt", small, metadata={})
    with pytest.raises(CheckpointError, match="missing keys.*embed/prompt"):
        restore_adapter(tmp_path / "ckpt", like=_abstract(adapter))


def test_unexpected_key_named(tmp_path):
    adapter = _adapter()
    save_adapter(tmp_path / "ckpt", adapter, metadata={})
    like = _abstract({"layers": adapter["layers"]})
    with pytest.raises(CheckpointError, match="unexpected keys.*embed/prompt"):
        restore_adapter(tmp_path / "ckpt", like=like)


def test_shape_mismatch_named(tmp_path):
    adapter = _adapter()
    save_adapter(tmp_path / "ckpt", adapter, metadata={})
    like = _abstract(adapter)
    like["layers"]["q_proj"]["a"] = jax.ShapeDtypeStruct((4, 64, 16), jnp.float32)
    with pytest.raises(CheckpointError, match=r"shape mismatch at layers/q_proj/a.*\(4, 64, 8\).*\(4, 64, 16\)"):
        restore_adapter(tmp_path / "ckpt", like=like)


def test_missing_and_corrupt_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a jpeft adapter checkpoint"):
        restore_adapter(tmp_path / "empty")
    save_adapter(tmp_path / "ckpt", _adapter(), metadata={})
    (tmp_path / "ckpt" / "1" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        restore_adapter(tmp_path / "ckpt")


def test_damaged_arrays_are_a_checkpoint_error(tmp_path):
    adapter = _adapter()
    save_adapter(tmp_path / "ckpt", adapter, metadata={})
    for d, _, files in os.walk(tmp_path / "ckpt" / "1" / "state"):
        for f in files:
            os.remove(os.path.join(d, f))
    with pytest.raises(CheckpointError, match="corrupt"):
        restore_adapter(tmp_path / "ckpt", like=_abstract(adapter))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = _adapter(scale=1.0)
    save_adapter(tmp_path / "ckpt", good, metadata={"step": 1})
    def explode(self, *args, **kwargs):  # the metadata write fails
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint.ocp.JsonCheckpointHandler, "save", explode)
    monkeypatch.setattr(checkpoint.ocp.JsonCheckpointHandler, "async_save", explode)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(tmp_path / "ckpt", _adapter(scale=2.0), metadata={"step": 2})
    monkeypatch.undo()
    restored, meta = restore_adapter(tmp_path / "ckpt", like=_abstract(good))
    assert meta == {"step": 1}
    np.testing.assert_array_equal(restored["layers"]["q_proj"]["a"], good["layers"]["q_proj"]["a"])
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]  # no partial save left behind


def test_failed_array_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = _adapter()
    save_adapter(tmp_path / "ckpt", good, metadata={"step": 1})

    def broken_save(self, *args, **kwargs):
        raise RuntimeError("write failed half way (simulated)")

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "save", broken_save)
    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "async_save", broken_save)
    with pytest.raises(RuntimeError, match="simulated"):
        save_adapter(tmp_path / "ckpt", _adapter(scale=3.0), metadata={"step": 2})
    monkeypatch.undo()
    _, meta = restore_adapter(tmp_path / "ckpt", like=_abstract(good))
    assert meta == {"step": 1}
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]


def test_overwrite_replaces(tmp_path):
    save_adapter(tmp_path / "ckpt", _adapter(1.0), metadata={"step": 1})
    newer = _adapter(2.0)
    save_adapter(tmp_path / "ckpt", newer, metadata={"step": 2})
    restored, meta = restore_adapter(tmp_path / "ckpt", like=_abstract(newer))
    assert meta == {"step": 2}
    np.testing.assert_array_equal(restored["layers"]["q_proj"]["a"], newer["layers"]["q_proj"]["a"])
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2"]  # the older save is gone once the newer is complete


def test_unserializable_metadata_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save_adapter(tmp_path / "ckpt", _adapter(), metadata={"fn": object()})
    assert not (tmp_path / "ckpt").exists()


def test_bytes_on_disk_are_about_the_adapter_size(tmp_path):
    frozen_W = jnp.ones((2048, 2048))  # 16 MiB the checkpoint must not contain
    adapter = {"a": jnp.ones((2048, 64)), "b": jnp.zeros((64, 2048))}  # 1 MiB
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapter))
    save_adapter(tmp_path / "ckpt", adapter, metadata={"frozen_bytes": int(frozen_W.nbytes)})
    on_disk = _dir_bytes(tmp_path / "ckpt")
    assert on_disk < adapter_bytes * 1.1 + 64 * 1024
    assert on_disk < frozen_W.nbytes / 8


@pytest.mark.parametrize("damage", ["data", "array_metadata", "no_state"])
@pytest.mark.parametrize("with_like", [False, True])
def test_damaged_files_name_the_step_folder(tmp_path, damage, with_like):
    """Garbled array files, a garbled array record or a missing item: a CheckpointError naming the step folder
    (with or without a restore target), never orbax's raw error."""
    adapter = _adapter()
    save_adapter(tmp_path / "ckpt", adapter, metadata={})
    state = tmp_path / "ckpt" / "1" / "state"
    if damage == "no_state":
        import shutil

        shutil.rmtree(state)
    for d, _, files in os.walk(state):
        for f in files:
            path = os.path.join(d, f)
            if (damage == "data" and os.sep + "d" + os.sep in path[len(str(state)):]) or (
                    damage == "array_metadata" and f == "_METADATA"):
                with open(path, "wb") as out:
                    out.write(b"\x00 garbage {")
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"corrupt checkpoint '.*ckpt/1'") as info:
        restore_adapter(tmp_path / "ckpt", like=_abstract(adapter) if with_like else None)
    assert len(str(info.value)) < 500


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="it is a file, not a checkpoint folder"):
        restore_adapter(tmp_path / "file")
