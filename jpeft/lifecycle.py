"""A method's life in a training run, in one place: start, stage boundaries, finish, loading it back.

A :class:`jpeft.Method` is three pure functions plus an optional
:class:`~jpeft.methods.base.Training` record of hooks (PIR chooses its weights from data,
PiSSA takes its fresh factors out of the base, ULMFiT trains by stages, AdaLoRA changes
its optimizer and adds a penalty and a summary). Every program that trains or runs a
method goes through this module, so each hook is honoured the same way in every task and
in every program that loads a trained adapter:

``start(method, params, key, ...)``
    ``prepare`` (on data) -> ``init`` -> ``rebase``: the method that trains, its fresh
    adapter, and the base it trains over.
``optimizer(method, base)`` and ``loss(method, params_loss)``
    The run's optimizer with the method's own transformation, and the training loss with
    its penalty.
``stage_at(method, step)`` and ``enter_stage(...)``
    Which method trains an optimizer step, and the move from one stage to the next.
``finish(method, base, adapter, steps)``
    The last stage, the parameters to run inference with (merged when exact and cheap),
    and the method's line about its trained adapter.
``saved_like(method, params, steps)`` and ``load_adapter(folder, model, params)``
    The abstract adapter a save of such a run holds, and a saved run's (or a Hugging Face
    PEFT folder's) ``(method, adapter)`` for the original base weights.

Example:
    >>> import jax, jax.numpy as jnp, optax, jpeft
    >>> from jpeft import lifecycle
    >>> params = {"dense": {"kernel": jnp.ones((4, 4))}}
    >>> begun = lifecycle.start(jpeft.lora(rank=2, targets=r".*/kernel"), params, jax.random.key(0))
    >>> loss = lifecycle.loss(begun.method, lambda p, x: jnp.sum(p["dense"]["kernel"].materialize() @ x))
    >>> grads = jax.grad(loss)(begun.adapter, begun.frozen, jnp.ones(4))
    >>> sorted(jpeft.tree.flatten(grads))
    ['dense/kernel/a', 'dense/kernel/b']
    >>> done = lifecycle.finish(begun.method, begun.base, begun.adapter, steps=1)
    >>> bool(jnp.allclose(done.params["dense"]["kernel"], params["dense"]["kernel"]))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import optax

from jpeft import checkpoint, tree
from jpeft.errors import CheckpointError
from jpeft.io.peft import load_peft
from jpeft.methods import registry
from jpeft.methods.base import Method, for_inference
from jpeft.quant.array import is_quantized

PEFT_CONFIG = "adapter_config.json"


class Started(NamedTuple):
    """What :func:`start` gives a run: the method that trains, its fresh adapter and what it trains over.

    ``base``: the parameters the adapter trains over (the loaded ones, or the method's
    rebased ones); ``frozen``: ``base`` without the leaves the adapter replaces (what a
    train step holds frozen).
    """

    method: Method
    adapter: Any
    base: Any
    frozen: Any


class Finished(NamedTuple):
    """What :func:`finish` gives a run: the method of its last stage, the inference parameters, the summary line."""

    method: Method
    params: Any
    summary: str | None


def frozen_part(params: Any, adapter: Any) -> Any:
    """The parameters a train step holds frozen: without those the adapter replaces (full fine-tuning, BitFit).

    Example:
        >>> import jax.numpy as jnp
        >>> frozen_part({"w": jnp.ones(2), "b": jnp.ones(2)}, {"b": jnp.zeros(2)})   # None: a hole the adapter fills
        {'b': None, 'w': Array([1., 1.], dtype=float32)}
    """
    replaced = set(tree.flatten(adapter)) & set(tree.flatten(params))
    return tree.without(params, adapter) if replaced else params


def start(method: Method, params: Any, key: jax.Array, *, loss_fn: Callable[[Any, Any], Any] | None = None,
          batches: Iterable[Any] | None = None) -> Started:
    """``prepare`` (when the method chooses its weights from data), ``init``, then ``rebase``.

    ``loss_fn(params, batch) -> scalar`` and ``batches`` are what a ``prepare`` hook scores
    with (PIR); a method with such a hook and no data is an error.

    Raises:
        ValueError: the method's settings do not fit ``params`` (a target that matches
            nothing, a rank larger than a weight), or it needs data that was not given.
    """
    prepare = method.training.prepare
    if prepare is not None:
        if loss_fn is None or batches is None:
            raise ValueError(f"{method.describe()} chooses what to train from data: start(..., loss_fn=, batches=)")
        method = prepare(params, loss_fn, batches)
    adapter = method.init(key, params)
    rebase = method.training.rebase
    base = params if rebase is None else rebase.base(params, adapter)
    return Started(method, adapter, base, frozen_part(base, adapter))


def optimizer(method: Method, base: optax.GradientTransformation) -> optax.GradientTransformation:
    """``base`` (a program's optimizer) with the method's own transformation, if it has one.

    A method with stages keeps one optimizer for all of them: the first stage's.

    Example:
        >>> import jax.numpy as jnp, jpeft
        >>> tx = optimizer(jpeft.lora(targets=".*"), optax.sgd(1.0))
        >>> tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))[0]["w"].tolist()
        [-1.0, -1.0]
    """
    wrap = method.training.optimizer
    if wrap is None:
        return base
    wrapped = wrap(base)
    if not isinstance(wrapped, optax.GradientTransformation):
        raise TypeError(f"{method.describe()}: training.optimizer(optimizer) must return an optax "
                        f"GradientTransformation, got {type(wrapped).__name__}")
    return wrapped


def loss(method: Method, params_loss: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    """``loss(adapter, frozen, batch, rng=None)``: ``params_loss`` of the adapted parameters, plus the method's penalty."""
    penalty = method.training.penalty

    def adapter_loss(adapter: Any, frozen: Any, batch: Any, rng: jax.Array | None = None) -> Any:
        value = params_loss(method.apply(frozen, adapter, rng=rng), batch)
        return value if penalty is None else value + penalty(adapter)

    return adapter_loss


def stage_at(method: Method, step: int) -> Method:
    """The method that trains optimizer step ``step`` (1-based): ``method``, or the last of its stages begun by then."""
    stages = method.training.stages
    starts = [first for first, _ in stages]
    if any(not isinstance(a, int) or a < 2 for a in starts) or starts != sorted(set(starts)):
        raise ValueError(f"{method.name}: stage starts {starts} must be increasing steps >= 2 (step 1 is the "
                         "method's own)")
    current = method
    for first, stage in stages:
        if first <= step:
            current = stage
    return current


def stage_number(method: Method, step: int) -> int:
    """How many stage boundaries ``step`` is past (0 for the method's own)."""
    return sum(first <= step for first, _ in method.training.stages)


def enter_stage(current: Method, stage: Method, frozen: Any, adapter: Any, key: jax.Array) -> tuple[Any, Any]:
    """``(adapter, frozen)`` of ``stage``, continuing ``current``'s training.

    The current adapter is merged into the parameters and the next stage's ``init`` runs on
    them: weights that stay trainable keep their trained values, new ones start from the
    (frozen) parameters. What the next adapter replaces leaves the frozen tree.
    """
    params = current.merge(frozen, adapter)
    adapter = stage.init(key, params)
    return adapter, frozen_part(params, adapter)


def finish(method: Method, base: Any, adapter: Any, *, steps: int) -> Finished:
    """The method of the stage that trained step ``steps``, the parameters to run inference with, the summary.

    ``base``: :attr:`Started.base` (the parameters the adapter trained over). The inference
    parameters are ``merge``'s when merging is exact and cheap, else ``apply``'s
    (:func:`jpeft.for_inference`).
    """
    last = stage_at(method, steps)
    summary = method.training.summary
    text = summary(adapter) if summary is not None else None
    return Finished(last, for_inference(last, frozen_part(base, adapter), adapter), text or None)


def saved_like(method: Method, params: Any, steps: int) -> Any:
    """The abstract adapter (shapes, dtypes) a run of ``method`` that took ``steps`` steps saves."""
    last = stage_at(method, steps)
    return jax.eval_shape(lambda p: last.saved_form(last.init(jax.random.key(0), p)), params)


def adapter_format(folder: str | Path) -> str:
    """``"peft"`` or ``"jpeft"``: what kind of adapter folder ``folder`` is (nothing is read but names).

    Raises:
        CheckpointError: not a folder, or neither kind.
    """
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError("no such folder; give a jpeft adapter folder (python -m train writes "
                              "run_dir/adapter) or a PEFT folder (adapter_config.json)")
    if (path / PEFT_CONFIG).is_file():
        return "peft"
    if not any(p.name.isdigit() for p in path.iterdir()):
        raise CheckpointError(f"is neither a jpeft adapter folder (python -m train writes run_dir/adapter) nor a "
                              f"PEFT folder ({PEFT_CONFIG})")
    return "jpeft"


def load_adapter(folder: str | Path, model: Any, params: Any, *, tokenizer: Any = None) -> tuple[Method, Any]:
    """``(method, adapter)`` of a saved run's adapter folder or a PEFT folder, for ``model``'s ``params``.

    A saved run's metadata names its method and settings; the method is rebuilt through the
    registry and the adapter restored against its shapes (a save of a method with stages
    holds its last stage). An adapter trained over a rebased base (PiSSA) is returned in the
    form that runs on ``params`` themselves (the method's ``rebase.over_original``), which
    needs the seed of the run's fresh adapter (recorded in the metadata as ``seed``).

    Raises:
        CheckpointError: the folder is neither kind, names an unknown method, or does not
            fit ``params``.
    """
    path = Path(folder)
    if adapter_format(path) == "peft":
        return load_peft(path, model, params)
    metadata = checkpoint.read_metadata(path)["metadata"]
    name = metadata.get("method") if isinstance(metadata, dict) else None
    if name not in registry.names():
        raise CheckpointError(f"its metadata names the method {name!r}, which is not registered "
                              f"(known: {', '.join(registry.names())})")
    settings = {k: v for k, v in metadata.items() if k in registry.settings(name)}
    steps = int(metadata.get("steps", 1))
    try:
        method = registry.build(name, settings, model=model, tokenizer=tokenizer, total_step=steps)
        like = saved_like(method, params, steps)
    except (registry.SettingsMappingError, ValueError) as err:
        raise CheckpointError(f"its {name} settings {settings} do not fit this base model: {err}") from None
    rebase = method.training.rebase
    if rebase is not None:
        _check_rebuildable(method, metadata, params)
    try:
        adapter, _ = checkpoint.restore_adapter(path, like=like, method=name)
    except CheckpointError as err:
        raise CheckpointError(f"does not fit this base model (was it trained on another?): {err}") from None
    method = stage_at(method, steps)
    if rebase is None:
        return method, adapter
    fresh = method.init(jax.random.key(int(metadata["seed"])), params)
    return rebase.over_original(params, adapter, fresh)


def _check_rebuildable(method: Method, metadata: dict, params: Any) -> None:
    """Refuses an adapter trained over a rebased base that cannot be run on ``params``."""
    if "seed" not in metadata:
        raise CheckpointError(f"a {method.describe()} adapter goes with the base its init rebased (PiSSA's residual "
                              "W - s*A0@B0), and its metadata has no seed to rebuild the fresh adapter (saved by an "
                              "older jpeft); convert it with the method's training.rebase.over_original and load that")
    if any(is_quantized(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_quantized)):
        raise CheckpointError(f"a {method.describe()} adapter trained over a re-quantized residual base runs only "
                              "over that base; load the model without model.quantize to run it on the float weights")
