"""Training checkpoints: the adapter, the optimizer state, the step and the RNG key.

A :class:`jpeft.checkpoint.Store` (the one orbax stack jpeft has) in
``<run_dir>/checkpoints`` keeps the newest ``checkpoint.keep`` saves, one every
``checkpoint.every`` steps plus the last one, written in the background
(``checkpoint.async_save``). Each save holds

* ``state``: ``{"adapter", "opt_state", "rng"}`` arrays (never the frozen weights);
* ``meta``: JSON with the step, the data position (batches consumed, seed, batch size),
  the schedule settings and the adapter's shapes, checked before any array is read.

The data order and the dropout keys are pure functions of ``(seed, step)``, so a
run resumed from step ``k`` computes exactly what an uninterrupted one would.
Arrays are restored straight onto the shardings of the current mesh, which may
differ from the mesh they were saved from.

:meth:`Checkpoints.resume_point` picks the checkpoint to resume from: the newest one
that can be read. A newer one whose files are damaged (a truncated array file, garbled
metadata) is skipped with a warning naming it, and set aside as ``corrupt-<step>`` when
the run goes ahead; if none can be read the run is refused. A checkpoint that reads
fine but belongs to another run (another method, adapter shape, seed, batch size or
schedule) is never skipped: the resume is refused with the differing values.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from jpeft.checkpoint import CheckpointError, Store, check_like
from jpeft.errors import CorruptCheckpointError

FORMAT = "jpeft-train-state"


class Restored(NamedTuple):
    step: int
    adapter: Any
    opt_state: Any
    rng: jax.Array
    meta: dict


class Checkpoints:
    """Periodic, asynchronous saves of the training state to ``directory``.

    Example:
        >>> ckpts = Checkpoints("/tmp/run/checkpoints", every=50, keep=2)   # doctest: +SKIP
        >>> ckpts.save(50, adapter, opt_state, rng, seed=0, batch_size=8)   # doctest: +SKIP
        >>> ckpts.restore(like_adapter, like_opt_state, seed=0, batch_size=8).step  # doctest: +SKIP
        50
    """

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.store = Store(directory, keep=keep, async_save=async_save)
        self.directory = self.store.directory
        self.every, self.keep, self.async_save = every, keep, async_save

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint (an interrupted save does not count)."""
        return self.store.latest_step()

    def due(self, step: int, last_step: int) -> bool:
        """Whether ``step`` is saved: every ``every`` steps, and the last one."""
        return step == last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, adapter, opt_state, rng, *, seed: int, batch_size: int,
             schedule: dict | None = None, method: str | None = None) -> None:
        """Start saving (returns once the arrays are copied off the devices, when asynchronous).

        ``schedule``: the settings that shape the optimizer's course (``train.steps``,
        ``lr``, ...); :meth:`restore` refuses a run whose settings differ.
        """
        meta = {"step": step, "seed": seed, "batch_size": batch_size, "method": method,
                "data_position": {"batches": step, "examples": step * batch_size}, "schedule": schedule or {}}
        state = {"adapter": adapter, "opt_state": opt_state, "rng": np.asarray(jax.random.key_data(rng))}
        self.store.save(step, state, meta, kind=FORMAT)

    def restore(self, adapter_like, opt_state_like, *, seed: int, batch_size: int,
                schedule: dict | None = None, step: int | None = None, method: str | None = None) -> Restored:
        """The state saved at ``step`` (default: the latest), placed as ``*_like`` say.

        ``*_like`` are arrays or ``jax.ShapeDtypeStruct`` with shardings (the target
        layout). A checkpoint of another adapter shape, seed, batch size or ``schedule``
        setting is a :class:`CheckpointError` naming the difference, raised before any
        array is read.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory!r}")
        where = os.path.join(self.directory, str(step))
        info = self.store.read_meta(step, kind=FORMAT)
        meta = info["metadata"]
        if method is not None and meta.get("method") not in (None, method):
            raise CheckpointError(f"{where!r} was saved by a {meta['method']!r} run, this run trains {method!r}; "
                                  "resume with the same method, or start a new run_dir")
        try:
            check_like(info["tree"]["adapter"], adapter_like)
        except CheckpointError as e:
            raise CheckpointError(f"{where!r} was saved for another adapter or base model: {e}") from None
        for key, want in (("seed", seed), ("batch_size", batch_size)):
            if meta[key] != want:
                raise CheckpointError(f"{where!r} was saved with train.{key}={meta[key]}, this run has {want};"
                                      f" resume with the same value (the data order depends on it)")
        saved_schedule, schedule = meta.get("schedule", {}), schedule or {}
        changed = sorted(k for k in saved_schedule.keys() & schedule.keys() if saved_schedule[k] != schedule[k])
        if changed:
            diffs = ", ".join(f"train.{k}={saved_schedule[k]!r} (this run: {schedule[k]!r})" for k in changed)
            raise CheckpointError(f"{where!r} was saved with {diffs}; a resumed run must keep the settings that "
                                  "shape the learning-rate schedule and the optimizer, or it is not the run it "
                                  "continues. Resume with the saved values, or start a new run_dir")
        rng_like = jax.ShapeDtypeStruct((2,), np.uint32, sharding=_replicated(adapter_like))
        state = self.store.restore(step, {"adapter": adapter_like, "opt_state": opt_state_like, "rng": rng_like})
        return Restored(step, state["adapter"], state["opt_state"], jax.random.wrap_key_data(state["rng"]), meta)

    def resume_point(self, adapter_like, opt_state_like, **expected) -> tuple[Restored | None, list[int]]:
        """``(the newest readable checkpoint, restored; the newer steps skipped as corrupt)``.

        ``(None, [])`` when there is no checkpoint. ``expected`` (seed, batch_size, schedule,
        method) is checked as by :meth:`restore`; a mismatch is raised, not skipped.

        Raises:
            CheckpointError: when checkpoints exist but none can be read, or the newest
                readable one belongs to another run.
        """
        skipped, reasons = [], []
        for step in reversed(self.store.steps()):
            try:
                restored = self.restore(adapter_like, opt_state_like, step=step, **expected)
            except CorruptCheckpointError as err:
                skipped.append(step)
                reasons.append(str(err))
                continue
            if skipped:
                warnings.warn(f"skipped unreadable checkpoint(s) {skipped} in {self.directory}; resuming from step "
                              f"{step} ({reasons[0]})", stacklevel=2)
            return restored, skipped
        if skipped:
            raise CheckpointError(f"no checkpoint in {self.directory!r} can be read (steps {skipped}: {reasons[0]}); "
                                  "start a new run_dir")
        return None, []

    def set_aside(self, steps: list[int]) -> None:
        """Rename unreadable saves to ``corrupt-<step>`` (kept for inspection, ignored from now on)."""
        if not steps:
            return
        self.store.close()
        for step in steps:
            src = os.path.join(self.directory, str(step))
            if os.path.isdir(src):
                os.rename(src, os.path.join(self.directory, f"corrupt-{step}"))
        self.store = Store(self.directory, keep=self.keep, async_save=self.async_save)

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.store.wait()

    def close(self) -> None:
        self.store.close()


def _replicated(tree):
    """A replicated sharding on the mesh of ``tree``'s first leaf."""
    from jax.sharding import NamedSharding, PartitionSpec

    leaf_sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    if isinstance(leaf_sharding, NamedSharding):
        return NamedSharding(leaf_sharding.mesh, PartitionSpec())
    return leaf_sharding  # one device (or None: the default device)


def saved_step(run_dir: str) -> int | None:
    """The newest finished checkpoint's step in ``<run_dir>/checkpoints``, read from folder names only."""
    directory = os.path.join(run_dir, "checkpoints")
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []
    return max(steps, default=None)


def for_run(run_dir: str, cfg) -> Checkpoints:
    """The run's :class:`Checkpoints` from its ``checkpoint`` config section."""
    c = cfg.checkpoint
    return Checkpoints(os.path.join(run_dir, "checkpoints"), every=c.every, keep=c.keep, async_save=c.async_save)
