"""What a task is to the runner, and tasks by name.

A task (write headlines with a decoder, write them with an encoder-decoder, classify
articles with an encoder, the next one) is a builder registered under a name, like a
method. Its keyword arguments are its config section (``classify: {classifier_input: cls}``),
validated from its signature by the same checks as a method's settings
(:func:`jpeft.methods.registry.check_arguments`); the arguments named in :data:`CONTEXT` are
what the runner has: the whole run config and the loaded model. The builder checks that the
model fits the task and reads its data; it returns a :class:`Task`, which the one runner
(:func:`train.run.run`) drives: batches, the loss, evaluation and its metrics row.

Registering a task is one call (see :mod:`train.tasks`)::

    def my_task(threshold: float = 0.5, *, run, loaded) -> Task: ...
    register("my_task", my_task)
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol

from jpeft.methods import registry
from jpeft.methods.base import Method

CONTEXT = ("run", "loaded")
"""Builder arguments the runner fills: ``run`` (the :class:`train.config.RunConfig`) and ``loaded``
(the :class:`train.loading.Loaded` model, parameters and tokenizer)."""


class Task(Protocol):
    """A task as the runner drives it.

    Attributes:
        loaded: the model, parameters and tokenizer to train (a task may add to them: a
            classification head).
        val_batches: fixed validation batches.
        metrics: the ``kind`` of its metrics rows in ``metrics.jsonl`` (``"rouge"``).
        scores_base: whether it scores the base model before training (when ``eval.base_model``).
    """

    loaded: Any
    val_batches: list
    metrics: str
    scores_base: bool

    def describe(self) -> str:
        """One line about the data, printed before training."""

    def with_method(self, method: Method) -> Method:
        """The method the run trains: ``method``, or it plus what the task trains whole (a new head)."""

    def batches_from(self, start: int) -> Iterator[Any]:
        """Endless training batches from batch ``start`` on (a pure function of the seed and ``start``)."""

    def loss_sums(self, params: Any, model: Any, batch: Any) -> tuple[Any, Any]:
        """``(sum of the losses, their count)`` of ``batch`` with ``params`` (jit-traced)."""

    def label(self, method: Method, adapter: Any) -> str:
        """The trained model's name in the metrics row."""

    def evaluate(self, label: str, params: Any, run_dir: str, *, trainable: int, percent: float) -> dict | None:
        """The metrics row of ``params`` (``None``: the run's settings ask for no evaluation)."""

    def metadata(self) -> dict:
        """What to record next to the saved adapter besides the method (e.g. the class names)."""

    def summary(self, rows: list[dict]) -> dict:
        """The task's entries of ``summary.json`` from its metrics rows."""

    def table(self, rows: list[dict]) -> str:
        """The rows as the text printed at the end of the run."""


class Registered(NamedTuple):
    name: str
    builder: Callable[..., Task]


_TASKS: dict[str, Registered] = {}


def register(name: str, builder: Callable[..., Task]) -> Callable[..., Task]:
    """Registers ``builder`` under ``name``; returns the builder."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a task name must be an identifier, got {name!r}")
    missing = [c for c in CONTEXT if c not in inspect.signature(builder).parameters]
    if missing:
        raise ValueError(f"task {name!r}: its builder must take {', '.join(missing)} (keyword arguments)")
    _TASKS[name] = Registered(name, builder)
    return builder


def names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def get(name: str) -> Registered:
    """The registration of ``name``; an unknown name is a :class:`registry.SettingsMappingError` listing the known ones."""
    if name not in _TASKS:
        close = difflib.get_close_matches(str(name), list(_TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise registry.SettingsMappingError(f"unknown task {name!r}{hint} (registered: {', '.join(names())})")
    return _TASKS[name]


def settings(name: str) -> dict[str, inspect.Parameter]:
    """The task builder's settings (its section's keys)."""
    return registry.arguments(get(name).builder, CONTEXT)


def defaults(name: str) -> dict[str, Any]:
    """The task builder's default for every setting that has one."""
    return {n: p.default for n, p in settings(name).items() if p.default is not inspect.Parameter.empty}


def check_settings(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """A task section validated against its builder's signature (see :func:`registry.check_arguments`)."""
    return registry.check_arguments(get(name).builder, given, what=name, context=CONTEXT)


def build(name: str, given: Mapping[str, Any], *, run: Any, loaded: Any) -> Task:
    """The task ``name`` built from its section ``given``, for the run config ``run`` and the ``loaded`` model."""
    return get(name).builder(**check_settings(name, given), run=run, loaded=loaded)
