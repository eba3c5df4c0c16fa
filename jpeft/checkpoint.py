"""Adapter-only checkpoints with orbax.

A checkpoint holds the adapter (the trainable pytree) and never the frozen
base weights::

    <directory>/
      adapter/         orbax StandardCheckpointHandler files
      jpeft.json       {"format", "version", "metadata": {...}, "tree": {path: {shape, dtype}}}

Saving is atomic: everything is written to a temporary sibling folder which
then replaces ``directory``, so a save that fails part way never leaves half a
checkpoint over a good one. In a multi-process run (``jax.distributed``) every
process calls :func:`save_adapter` with the same arguments and writes its own
shards into that folder (on a file system all processes share); process 0 writes
``jpeft.json`` and moves the folder into place.

Example:
    >>> import jax, jax.numpy as jnp, tempfile
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> save_adapter(d, {"w": jnp.ones((2, 3))}, metadata={"method": "demo"})
    >>> adapter, meta = restore_adapter(d, like={"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
    >>> meta["method"], adapter["w"].shape
    ('demo', (2, 3))
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jpeft.errors import CheckpointError

FORMAT = "jpeft-adapter"
VERSION = 1
_ARRAYS = "adapter"
_INFO = "jpeft.json"




def tree_spec(tree) -> dict[str, dict[str, Any]]:
    """``{"a/b/c": {"shape": [...], "dtype": "float32"}}`` for every leaf of ``tree``."""
    spec = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        spec[key] = {"shape": list(np.shape(leaf)), "dtype": str(np.dtype(leaf.dtype))}
    return spec


def save_adapter(directory: str | os.PathLike, adapter, *, metadata: dict) -> None:
    """Write ``adapter`` and JSON ``metadata`` to ``directory``, replacing it atomically."""
    directory = os.path.abspath(os.fspath(directory))
    info = {"format": FORMAT, "version": VERSION, "metadata": metadata, "tree": tree_spec(adapter)}
    try:
        info_text = json.dumps(info, indent=2)
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata must be JSON-serializable: {e}") from None
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    # One staging folder for all processes (named by process 0); each writes its own
    # shards into it, process 0 writes the info record and moves the folder into place.
    primary = jax.process_index() == 0
    token = _agreed(secrets.randbits(31))
    staging = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.tmp-{token}")
    try:
        if primary:
            os.makedirs(staging)
        _barrier(f"jpeft.save_adapter.{token}.staged")
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        checkpointer.save(os.path.join(staging, _ARRAYS), args=ocp.args.StandardSave(adapter))
        if primary:
            with open(os.path.join(staging, _INFO), "w", encoding="utf-8") as f:
                f.write(info_text)
            _replace(staging, directory)
        _barrier(f"jpeft.save_adapter.{token}.done")
    except BaseException:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _agreed(value: int) -> int:
    """Process 0's ``value`` in every process (itself in a single-process run)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _barrier(name: str) -> None:
    """Wait for every process (nothing to wait for in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _replace(staging: str, directory: str) -> None:
    """Move ``staging`` to ``directory``; an old checkpoint is removed only after the move."""
    if not os.path.exists(directory):
        os.rename(staging, directory)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
    os.rmdir(old)
    os.rename(directory, old)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(directory: str | os.PathLike) -> dict:
    """The checkpoint's info record (format, version, metadata, tree)."""
    path = os.path.join(os.fspath(directory), _INFO)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint at {os.fspath(directory)!r}: the directory does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{os.fspath(directory)!r} is not a jpeft adapter checkpoint (no {_INFO})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt checkpoint {os.fspath(directory)!r}: {_INFO} is not valid JSON ({e})") from None
    if info.get("format") != FORMAT or "tree" not in info:
        raise CheckpointError(f"{os.fspath(directory)!r} is not a jpeft adapter checkpoint ({_INFO} has no {FORMAT} record)")
    return info


def check_like(saved: dict[str, dict], like) -> None:
    """Raise CheckpointError naming missing/unexpected keys and shape or dtype mismatches."""
    expected = tree_spec(like)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys (expected, not in checkpoint): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in checkpoint, not expected): {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(saved)):
        want, got = expected[key], saved[key]
        if want["shape"] != got["shape"]:
            problems.append(f"shape mismatch at {key}: checkpoint {tuple(got['shape'])}, expected {tuple(want['shape'])}")
        elif want["dtype"] != got["dtype"]:
            problems.append(f"dtype mismatch at {key}: checkpoint {got['dtype']}, expected {want['dtype']}")
    if problems:
        raise CheckpointError("checkpoint does not match the expected adapter:\n  " + "\n  ".join(problems))


def restore_adapter(directory: str | os.PathLike, *, like=None, method: str | None = None) -> tuple[Any, dict]:
    """``(adapter, metadata)`` from ``directory``.

    ``like`` (e.g. ``jax.eval_shape(method.init, key, params)``) is checked key by
    key and shape by shape before anything is read, and fixes the restored
    tree's structure, dtypes and, where its leaves carry one, shardings (each
    device reads its own shard). ``method``: the method name the adapter must
    have been saved with (``metadata["method"]``); another one is an error.
    """
    info = read_metadata(directory)
    if method is not None:
        saved = info["metadata"].get("method") if isinstance(info.get("metadata"), dict) else None
        if saved != method:
            raise CheckpointError(
                f"{os.fspath(directory)!r} holds a {saved!r} adapter, not a {method!r} one; restore it with "
                f"method {saved!r} (its settings are in {_INFO}) or point at a {method!r} checkpoint")
    if like is not None:
        check_like(info["tree"], like)
    path = os.path.join(os.path.abspath(os.fspath(directory)), _ARRAYS)
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    # Without a sharding, a leaf lands on this process's first device: the devices the
    # adapter was saved from (another mesh, other processes) need not exist here.
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target_of(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                    sharding=sharding if isinstance(sharding, jax.sharding.Sharding) else here)

    try:
        if like is None:
            like = checkpointer.metadata(path).item_metadata.tree
            target = jax.tree.map(target_of, like, is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata))
        else:
            target = jax.tree.map(target_of, like)
        adapter = checkpointer.restore(path, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"corrupt checkpoint {os.fspath(directory)!r}: cannot read {_ARRAYS}/ ({type(e).__name__}: {e})") from e
    return adapter, info["metadata"]
