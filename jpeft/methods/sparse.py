"""Importance-ranked sparse fine-tuning (PIR): train only the weight entries that matter most for the task.

1. **Score** every entry of the candidate weights (``targets``, rules on per-layer paths as in
   :mod:`jpeft.methods.selective`) by a gradient-based importance accumulated over ``N``
   training batches (:func:`importance`): ``|w * g|`` (``"weight_gradient"``, the first-order
   Taylor estimate of the loss change when the entry is zeroed) or ``g ** 2``
   (``"fisher"``, the empirical Fisher diagonal).
2. **Keep** the top ``budget`` entries (:func:`top_entries`): across all candidates
   (``"global"``: whatever layer or weight they are in) or the same share of every weight
   (``"per_tensor"``).
3. **Train a sparse delta** (:func:`sparse_delta`): the adapter is ``{"values": (budget,)}``
   (float32, starting at zero); ``apply`` and ``merge`` add the values at their entries, so
   merging is exact. The saved form (``fold``) adds ``"indices": (budget,)`` int32: the
   entries' positions in the candidates laid end to end (sorted per-layer paths, row-major),
   so the saved adapter is ``8 * budget`` bytes of arrays and runs on its own: ``apply`` /
   ``merge`` take the indices from the adapter when it carries them.

Positions are counted over per-layer paths, so a saved adapter fits the model whether or
not it stacks its layers. Gradients and optimizer state exist for the ``budget`` values only;
the backward pass still forms each candidate weight's dense gradient transiently (XLA
computes it to gather the entries), so a step costs about what full fine-tuning of the
candidates costs in FLOPs, not in memory for optimizer state.

:func:`pir` is the registered method: its :attr:`jpeft.methods.base.Training.prepare` scores and selects
(the training program calls it with the loss and training batches), and returns the
:func:`sparse_delta` method to train.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jpeft
    >>> params = {"w": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
    >>> loss = lambda p, x: jnp.sum(x @ p["w"]["kernel"])
    >>> method = jpeft.pir(budget=2, targets=r".*/kernel").training.prepare(params, loss, [jnp.ones((1, 2))])
    >>> np.asarray(method.saved_form(method.init(None, params))["indices"]).tolist()   # |w * g|: the two largest w
    [4, 5]
    >>> method.merge(params, {"values": jnp.array([1.0, 2.0])})["w"]["kernel"].tolist()
    [[0.0, 1.0, 2.0], [3.0, 5.0, 7.0]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.errors import SettingError
from jpeft.methods import registry
from jpeft.methods.base import Method, Training
from jpeft.methods.selective import Slot, choose

SCORES = ("weight_gradient", "fisher")
ALLOCATIONS = ("global", "per_tensor")


def _candidates(params: Any, targets: tree.Targets, model: Any) -> dict[str, Slot]:
    slots = choose(params, targets, model)
    flat = tree.flatten(params)
    wrapped = sorted(p for p, s in slots.items() if ops.is_wrapper(flat[s.source]))
    if wrapped:
        raise ValueError(f"sparse fine-tuning adds a delta to plain weights, but {wrapped[0]!r} is a "
                         f"{type(flat[slots[wrapped[0]].source]).__name__} (a quantized base); load the base "
                         "unquantized, or narrow the targets")
    return slots


def importance(params: Any, loss_fn: Callable[[Any, Any], jax.Array], batches: Iterable[Any],
               targets: tree.Targets = r".*/kernel", *, score: str = "weight_gradient", num_batches: int = 4,
               model: Any = None) -> dict[str, jax.Array]:
    """``{per-layer path: scores}`` (float32, the weight's shape) of every weight ``targets`` select.

    ``score``: ``"weight_gradient"`` sums ``|w * dloss/dw|`` over the first ``num_batches``
    of ``batches``; ``"fisher"`` sums ``(dloss/dw) ** 2``. Gradients are taken with respect
    to the candidate weights only (a stacked weight as a whole, then split by layer).

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> scores = importance(params, lambda p, x: jnp.sum(p["w"] * x), [jnp.ones(2)] * 3, r"w", score="fisher")
        >>> scores["w"].tolist()
        [3.0, 3.0]
    """
    if score not in SCORES:
        raise SettingError("score", score, f"must be one of {', '.join(map(repr, SCORES))}", what="importance")
    slots = _candidates(params, targets, model)
    sources = {s.source for s in slots.values()}
    selected, rest = tree.split(params, tree.Rule(lambda path, leaf: path in sources))

    @jax.jit
    def accumulate(total, selected, rest, batch):
        grads = jax.grad(lambda sel: loss_fn(tree.combine(sel, rest), batch))(selected)
        if score == "fisher":
            term = jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)
        else:
            term = jax.tree.map(lambda w, g: jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32)), selected, grads)
        return jax.tree.map(jnp.add, total, term)

    total = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), selected)
    seen = 0
    for batch in batches:
        if seen == num_batches:
            break
        total = accumulate(total, selected, rest, batch)
        seen += 1
    if seen == 0:
        raise ValueError("importance needs at least one batch to score the weights")
    flat = tree.flatten(total)
    return {p: flat[s.source][s.layer] if s.sliced else flat[s.source] for p, s in slots.items()}


def _quotas(sizes: list[int], budget: int) -> list[int]:
    """``budget`` split over tensors in proportion to their sizes (largest remainders round up)."""
    total = sum(sizes)
    exact = [budget * n / total for n in sizes]
    quotas = [int(math.floor(x)) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: quotas[i] - exact[i])[:budget - sum(quotas)]:
        quotas[i] += 1
    return quotas


def top_entries(scores: Mapping[str, Any], budget: int, allocation: str = "global") -> np.ndarray:
    """Sorted positions (int64) of the ``budget`` highest scores, the scores laid end to end (sorted paths, row-major).

    ``allocation="global"`` ranks all entries together; ``"per_tensor"`` keeps the top
    entries of each tensor, ``budget`` shared in proportion to their sizes.

    Example:
        >>> import numpy as np
        >>> scores = {"a": np.array([0.1, 0.9, 0.2]), "b": np.array([0.8, 0.7, 0.05])}
        >>> top_entries(scores, 3).tolist(), top_entries(scores, 2, "per_tensor").tolist()
        ([1, 3, 4], [1, 3])
    """
    if allocation not in ALLOCATIONS:
        raise SettingError("allocation", allocation, f"must be one of {', '.join(map(repr, ALLOCATIONS))}",
                           what="top_entries")
    paths = sorted(scores)
    flats = [np.asarray(scores[p], np.float32).reshape(-1) for p in paths]
    sizes = [f.size for f in flats]
    total = sum(sizes)
    if not 1 <= budget <= total:
        raise SettingError("budget", budget, f"must be between 1 and the {total:,} entries of the candidate weights",
                           what="PIR")
    if allocation == "global":
        everything = np.concatenate(flats)
        chosen = np.argpartition(everything, total - budget)[total - budget:]
    else:
        offsets = np.cumsum([0, *sizes])
        chosen = np.concatenate([off + np.argpartition(f, f.size - q)[f.size - q:]
                                 for f, q, off in zip(flats, _quotas(sizes, budget), offsets) if q])
    return np.sort(chosen).astype(np.int64)


def _plan(slots: Mapping[str, Slot], indices: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{source path: (flat positions in the source leaf, positions in values)}`` of sorted entry ``indices``."""
    paths = list(slots)
    sizes = [math.prod(slots[p].leaf.shape) for p in paths]
    offsets = np.cumsum([0, *sizes])
    if indices.size and (indices[0] < 0 or indices[-1] >= offsets[-1] or np.any(np.diff(indices) <= 0)):
        raise ValueError(f"sparse adapter indices must be increasing positions in [0, {offsets[-1]:,}) (the "
                         "candidate weights' entries); this adapter was made for other weights, or is damaged")
    which = np.searchsorted(offsets, indices, side="right") - 1
    plan: dict[str, list] = {}
    for t in np.unique(which):
        slot = slots[paths[t]]
        rows = np.nonzero(which == t)[0]
        local = indices[rows] - offsets[t] + (slot.layer * sizes[t] if slot.sliced else 0)
        plan.setdefault(slot.source, []).append((local, rows))
    return {s: (np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))
            for s, parts in plan.items()}


def sparse_delta(indices: Any, targets: tree.Targets = r".*/kernel", *, name: str = "sparse_delta",
                 label: str | None = None, model: Any = None) -> Method:
    """A method training a delta on the given entries of the weights ``targets`` select.

    ``indices``: sorted positions in the candidates laid end to end (what :func:`top_entries`
    returns); ``None`` for a method whose entries come with each adapter (its saved form).

    Example:
        >>> import jax.numpy as jnp
        >>> method = sparse_delta([0, 3], r"w")
        >>> method.apply({"w": jnp.zeros((2, 2))}, {"values": jnp.array([1.0, 2.0])})["w"].tolist()
        [[1.0, 0.0], [0.0, 2.0]]
    """
    rules = tree.as_rules(targets)
    own = None if indices is None else np.asarray(indices, np.int64)
    budget = None if own is None else own.size

    def entries(adapter: Any) -> Any:
        if "indices" in adapter:
            return adapter["indices"]
        if own is None:
            raise ValueError(f"{name} has not chosen its entries yet: call method.training.prepare(params, loss_fn, batches) "
                             "first, or apply the saved adapter (it carries its indices)")
        return own

    def init_fn(key: jax.Array, params: Any) -> dict:
        del key
        slots = _candidates(params, rules, model)
        total = sum(math.prod(s.leaf.shape) for s in slots.values())
        if own is not None and own.size and own[-1] >= total:
            raise ValueError(f"{name}: entry {int(own[-1]):,} is beyond the {total:,} entries the targets select here; "
                             "the entries were chosen for another model or other targets")
        return {"values": jnp.zeros((0 if own is None else own.size,), jnp.float32)}

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        del rng
        values, where = adapter["values"], entries(adapter)
        if tuple(jnp.shape(where)) != tuple(values.shape):
            raise ValueError(f"{name}: {values.shape[0]} values but {jnp.shape(where)[0]} indices")
        slots = _candidates(params, rules, model)
        flat = tree.flatten(params)
        if isinstance(where, jax.core.Tracer):  # indices only known at run time: one flat delta over all candidates
            return _apply_traced(params, flat, slots, values, where)
        new = {}
        for source, (positions, rows) in _plan(slots, np.asarray(where, np.int64)).items():
            base = flat[source]
            delta = values[rows].astype(base.dtype)
            new[source] = base.reshape(-1).at[positions].add(delta, unique_indices=True).reshape(base.shape)
        return tree.replace(params, new)

    def fold(adapter: Any) -> dict:
        if "indices" in adapter:
            return adapter
        where = own if own is not None else np.full(adapter["values"].shape, -1)  # shapes only: not chosen yet
        return {"values": adapter["values"], "indices": jnp.asarray(where, jnp.int32)}

    label = label or (f"{name} {budget:,} entries" if budget is not None else name)
    return Method(name, init_fn, apply_fn, apply_fn, fold=fold, label=label)


def _apply_traced(params, flat, slots, values, where):
    """``apply`` with traced indices: scatter into one delta over every candidate, then cut it per weight."""
    sizes = [math.prod(s.leaf.shape) for s in slots.values()]
    delta = jnp.zeros(sum(sizes), jnp.float32).at[where].add(values)
    per_source: dict[str, dict[int | None, jax.Array]] = {}
    start = 0
    for (path, slot), size in zip(slots.items(), sizes):
        per_source.setdefault(slot.source, {})[slot.layer if slot.sliced else None] = \
            delta[start:start + size].reshape(slot.leaf.shape)
        start += size
    new = {}
    for source, parts in per_source.items():
        base = flat[source]
        if None in parts:
            new[source] = base + parts[None].astype(base.dtype)
        else:
            stacked = jnp.stack([parts.get(i, jnp.zeros(base.shape[1:], jnp.float32)) for i in range(base.shape[0])])
            new[source] = base + stacked.astype(base.dtype)
    return tree.replace(params, new)


def pir(
    budget: int = 921_600,
    targets: tree.Targets = r".*/kernel",
    score: Literal["weight_gradient", "fisher"] = "weight_gradient",
    allocation: Literal["global", "per_tensor"] = "global",
    score_batches: int = 4,
    *,
    model: Any = None,
) -> Method:
    """Importance-ranked sparse fine-tuning (see the module docstring).

    Args:
        budget: entries to train (the default equals LoRA r=8 on q/k/v/o of SmolLM2-135M:
            921,600).
        targets: candidate weights, rules on per-layer paths (default: every kernel).
        score: ``"weight_gradient"`` (``|w * g|``) or ``"fisher"`` (``g ** 2``), summed over batches.
        allocation: ``"global"`` (top entries anywhere) or ``"per_tensor"`` (the same share of each weight).
        score_batches: training batches the scores are accumulated over.
        model: the :class:`jpeft.models.Model` (roles and layers of the weights).

    Returns:
        A :class:`jpeft.Method` whose ``prepare(params, loss_fn, batches)`` scores the entries
        and returns the :func:`sparse_delta` method to train. Before that, ``init`` gives the
        adapter's shape and ``apply`` runs saved adapters (which carry their indices).
    """
    what = "PIR"
    for setting, value in (("budget", budget), ("score_batches", score_batches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingError(setting, value, "must be a positive integer", what=what)
    if score not in SCORES:
        raise SettingError("score", score, f"must be one of {', '.join(map(repr, SCORES))}", what=what)
    if allocation not in ALLOCATIONS:
        raise SettingError("allocation", allocation, f"must be one of {', '.join(map(repr, ALLOCATIONS))}", what=what)
    rules = tree.as_rules(targets)
    label = f"pir {budget:,} entries ({score}, {allocation})"

    def prepare(params: Any, loss_fn: Callable[[Any, Any], jax.Array], batches: Iterable[Any]) -> Method:
        total = sum(math.prod(s.leaf.shape) for s in _candidates(params, rules, model).values())
        if budget > total:
            raise SettingError("budget", budget, f"is more than the {total:,} entries the targets select", what=what)
        scores = importance(params, loss_fn, batches, rules, score=score, num_batches=score_batches, model=model)
        return sparse_delta(top_entries(scores, budget, allocation), rules, name="pir", label=label, model=model)

    unprepared = sparse_delta(None, rules, name="pir", label=label, model=model)

    def init_fn(key: jax.Array, params: Any) -> dict:
        unprepared.init(key, params)  # checks the targets
        return {"values": jnp.zeros((budget,), jnp.float32)}

    return unprepared._replace(init=init_fn, training=Training(prepare=prepare))


registry.register("pir", pir)
