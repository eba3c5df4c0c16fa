"""Adapter-only checkpoints with orbax: one ``CheckpointManager`` stack for every save jpeft makes.

A :class:`Store` is a folder of numbered saves, each holding two orbax items:

* ``state``: a dict of array trees (``{"adapter": ...}`` for a saved adapter; a trainer adds
  its optimizer state and RNG key), never the frozen base weights;
* ``meta``: JSON: ``{"format", "version", "metadata", "tree": {path: {shape, dtype}}}``,
  read and checked before any array is.

orbax writes each save into a temporary folder and renames it when complete, and the
manager deletes an older save only after a newer one is complete, so a save that fails
part way never costs the previous one (leftover temporary folders are removed the next
time the store is opened). In a multi-process run (``jax.distributed``) every process
calls the same functions and writes its own shards (to a file system all of them share).

:func:`save_adapter` / :func:`restore_adapter` keep one save (the newest) in a folder: the
form of a finished run's adapter.

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
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jpeft.errors import CheckpointError, CorruptCheckpointError

FORMAT = "jpeft-adapter"
VERSION = 2


def tree_spec(tree) -> dict[str, dict[str, Any]]:
    """``{"a/b/c": {"shape": [...], "dtype": "float32"}}`` for every leaf of ``tree``."""
    spec = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        spec[key] = {"shape": list(np.shape(leaf)), "dtype": str(np.dtype(leaf.dtype))}
    return spec


def check_like(saved: dict[str, dict], like) -> None:
    """Raise CheckpointError naming missing/unexpected keys and shape or dtype mismatches."""
    expected = tree_spec(like)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys (expected, not in checkpoint): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in checkpoint, not expected): {_some(unexpected)}")
    for key in sorted(set(expected) & set(saved)):
        want, got = expected[key], saved[key]
        if want["shape"] != got["shape"]:
            problems.append(f"shape mismatch at {key}: checkpoint {tuple(got['shape'])}, expected {tuple(want['shape'])}")
        elif want["dtype"] != got["dtype"]:
            problems.append(f"dtype mismatch at {key}: checkpoint {got['dtype']}, expected {want['dtype']}")
    if problems:
        shown = problems[:8] + ([f"... ({len(problems) - 8} more)"] if len(problems) > 8 else [])
        raise CheckpointError("checkpoint does not match the expected adapter:\n  " + "\n  ".join(shown))


def _first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, cut to ``limit`` characters (TensorStore errors run long)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text[:limit] + ("..." if len(text) > limit else "")


def _some(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _target(like: Any) -> Any:
    """``jax.ShapeDtypeStruct`` restore targets that keep each leaf's sharding.

    Without one, a leaf lands on this process's first device: the devices a checkpoint was
    saved from (another mesh, other processes) need not exist here.
    """
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target_of(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                    sharding=sharding if isinstance(sharding, jax.sharding.Sharding) else here)

    return jax.tree.map(target_of, like, is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata))


class Store:
    """Numbered saves of ``state`` (array trees) plus ``meta`` (JSON) in one folder.

    Args:
        directory: the folder (created when missing).
        keep: how many of the newest saves to keep.
        async_save: write in the background (``save`` returns once arrays are copied off
            the devices; :meth:`wait` blocks until they are on disk).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> store = Store(tempfile.mkdtemp(), keep=2, async_save=False)
        >>> store.save(5, {"adapter": {"w": jnp.ones(2)}}, {"note": "hi"})
        >>> store.latest_step(), store.read_meta(5)["metadata"]["note"]
        (5, 'hi')
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 1, async_save: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory!r} is a file, not a checkpoint folder")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        except OSError as err:
            raise CheckpointError(f"cannot use {self.directory!r} as a checkpoint folder: {err}") from None

    def steps(self) -> list[int]:
        """The steps of complete saves, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, metadata: dict, *, kind: str = FORMAT) -> None:
        """Start saving ``state`` (a dict of array trees) and ``metadata`` (JSON) as ``step``."""
        meta = {"format": kind, "version": VERSION, "metadata": metadata,
                "tree": {name: tree_spec(value) for name, value in state.items()}}
        try:
            json.dumps(meta)
        except TypeError as e:
            raise CheckpointError(f"checkpoint metadata must be JSON-serializable: {e}") from None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int, *, kind: str | None = FORMAT) -> dict:
        """The JSON record of save ``step`` (format, version, metadata, tree); ``kind``: the format it must have."""
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for a damaged or missing record
            raise CorruptCheckpointError(f"corrupt checkpoint {where!r}: its metadata cannot be read "
                                         f"({type(e).__name__}: {_first_line(e)})") from None
        if not isinstance(meta, dict) or "tree" not in meta or (kind is not None and meta.get("format") != kind):
            raise CheckpointError(f"{where!r} is not a {kind or 'jpeft'} checkpoint")
        return meta

    def restore(self, step: int, like: dict) -> dict:
        """The ``state`` of save ``step``, checked against ``like`` (``{name: tree}`` of arrays or shapes).

        Shapes are compared before anything is read; where ``like``'s leaves carry a
        sharding, each device reads its own shard.
        """
        where = os.path.join(self.directory, str(step))
        saved = self.read_meta(step, kind=None)["tree"]
        for name, tree in like.items():
            if name not in saved:
                raise CheckpointError(f"{where!r} holds no {name!r}")
            if not any(isinstance(x, ocp.metadata.ArrayMetadata) for x in jax.tree.leaves(
                    tree, is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata))):
                check_like(saved[name], tree)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_target(like))))["state"]
        except Exception as e:  # orbax raises many types for damaged files
            raise CorruptCheckpointError(f"corrupt checkpoint {where!r}: cannot read its arrays "
                                         f"({type(e).__name__}: {_first_line(e)})") from None

    def saved_tree(self, step: int, name: str) -> Any:
        """The array metadata (shapes, dtypes) orbax recorded for ``name`` in save ``step``: a restore target."""
        where = os.path.join(self.directory, str(step))
        try:
            item = self.manager.item_metadata(step)["state"]
            return getattr(item, "tree", item)[name]
        except Exception as e:  # orbax raises many types for a damaged or missing record
            raise CorruptCheckpointError(f"corrupt checkpoint {where!r}: cannot read its arrays' metadata "
                                         f"({type(e).__name__}: {_first_line(e)})") from None

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_adapter(directory: str | os.PathLike, adapter, *, metadata: dict) -> None:
    """Write ``adapter`` and JSON ``metadata`` to ``directory``, replacing an earlier save only once complete.

    Bad metadata is refused before anything is written; a save that fails part way leaves
    the previous save as it was and removes its own partial files.
    """
    directory = os.fspath(directory)
    try:
        json.dumps(metadata)
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata must be JSON-serializable: {e}") from None
    _refuse_other_folder(directory)
    store = Store(directory, keep=1)
    try:
        store.save((store.latest_step() or 0) + 1, {"adapter": adapter}, metadata)
        store.wait()
    except BaseException:
        remove_partial_saves(directory)
        raise
    finally:
        store.close()


def remove_partial_saves(directory: str | os.PathLike) -> list[str]:
    """Deletes the temporary folders of saves that did not complete; returns their names."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    partial = [n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n]
    for name in partial:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return partial


def _refuse_other_folder(directory: str) -> None:
    """A folder with files that are not saves of a store is not ours to write into."""
    if not os.path.isdir(directory):
        return
    foreign = [n for n in os.listdir(directory) if not n.isdigit() and not n.startswith(".")
               and "orbax-checkpoint-tmp" not in n]
    if foreign:
        raise CheckpointError(f"{directory!r} holds other files ({_some(sorted(foreign))}); it is not a jpeft "
                              "adapter folder, so nothing is written there. Choose another folder.")


def _open_existing(directory: str) -> Store:
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint at {directory!r}: " + ("it is a file, not a checkpoint folder"
                                                                     if os.path.exists(directory) else
                                                                     "the directory does not exist"))
    if os.path.isfile(os.path.join(directory, "jpeft.json")):
        raise CheckpointError(f"{directory!r} is an adapter saved by jpeft 0.1 (adapter/ + jpeft.json), which this "
                              "version does not read; save it again with this version")
    store = Store(directory, keep=1)
    if store.latest_step() is None:
        store.close()
        raise CheckpointError(f"{directory!r} is not a jpeft adapter checkpoint (no complete save in it)")
    return store


def read_metadata(directory: str | os.PathLike) -> dict:
    """The newest save's info record (format, version, metadata, tree) in ``directory``."""
    store = _open_existing(os.fspath(directory))
    try:
        info = store.read_meta(store.latest_step())
    finally:
        store.close()
    info["tree"] = info["tree"].get("adapter", {})
    return info


def restore_adapter(directory: str | os.PathLike, *, like=None, method: str | None = None) -> tuple[Any, dict]:
    """``(adapter, metadata)`` from ``directory``.

    ``like`` (e.g. ``jax.eval_shape(method.init, key, params)``) is checked key by
    key and shape by shape before anything is read, and fixes the restored
    tree's structure, dtypes and, where its leaves carry one, shardings (each
    device reads its own shard). ``method``: the method name the adapter must
    have been saved with (``metadata["method"]``); another one is an error.
    """
    directory = os.fspath(directory)
    store = _open_existing(directory)
    try:
        step = store.latest_step()
        info = store.read_meta(step)
        if method is not None:
            saved = info["metadata"].get("method") if isinstance(info.get("metadata"), dict) else None
            if saved != method:
                raise CheckpointError(
                    f"{directory!r} holds a {saved!r} adapter, not a {method!r} one; restore it with method "
                    f"{saved!r} (its settings are in the checkpoint's metadata) or point at a {method!r} checkpoint")
        if like is None:
            like = {"adapter": store.saved_tree(step, "adapter")}
        else:
            like = {"adapter": like}
        state = store.restore(step, like)
    finally:
        store.close()
    return state["adapter"], info["metadata"]
