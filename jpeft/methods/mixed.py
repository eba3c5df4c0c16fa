"""Many adapters over one base in one batch: each row of a batch runs its own adapter, or none.

:class:`MixedAdapters` holds named adapters in **slots** over one frozen base. Each row
of a batch names a slot (``-1``: the base alone), and one forward pass or one
generation call runs every row with its own adapter, as serving systems do for many
LoRA adapters at once (Punica, S-LoRA):

What a row runs comes from the adapters' own kinds, not from a list of methods here: a
method's weight wrapper registers how it differs per row (:mod:`jpeft.methods.rows`),
and a method that feeds the model's ``tokens`` hook (virtual tokens) mixes through the
model. Built in:

* **LoRA** (:class:`jpeft.methods.lora.LoraRows`): the slots' factors are stacked,
  zero-padded to one rank ``R``: ``A (*in, S, R)``, ``B (S, R, *out)`` and a scale per
  slot; row ``b`` computes ``x @ W + s_b * ((x @ A_b) @ B_b)``. The base matmul is shared
  by all rows (a 4-bit base stays 4-bit). Padding is exact: the padded columns of ``A``
  and rows of ``B`` are zeros, which add exactly nothing.
* **IA3** (:class:`jpeft.methods.ia3.Ia3Rows`): each row is scaled by its slot's vectors
  (ones for the base).
* **Prompt tuning / P-tuning**: each row gets its slot's virtual tokens, left-padded to the
  longest slot's and masked (the model's ``prompt`` hook takes a per-row value,
  :func:`jpeft.models.hooks.row_tokens`), so a row with fewer or no virtual tokens runs as
  if it had been alone.

Adapters of different kinds mix too (a row's slot is one adapter; the others add
nothing to it). Prefix tuning and bottleneck adapters cannot differ per row yet: run
them with :class:`jpeft.AdapterBank`.

The stacked arrays are a pytree (:attr:`MixedAdapters.slots`) with a fixed shape, and
the rows are an int array: a jitted function that takes both compiles once, and neither
assigning other rows nor loading another adapter into a slot (:meth:`MixedAdapters.load`,
"hot-swap") compiles it again, as long as the new adapter fits the slot (same weights,
rank at most ``R``, at most as many virtual tokens).

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                       num_layers=1, num_heads=4))
    >>> params = model.init(jax.random.key(0))
    >>> small, big = jpeft.lora(rank=2, model=model), jpeft.lora(rank=4, model=model)
    >>> mix = jpeft.MixedAdapters(params, {"a": (small, small.init(jax.random.key(1), params)),
    ...                                    "b": (big, big.init(jax.random.key(2), params))}, model=model)
    >>> mix.names, mix.rows(["b", "base", "a"]).tolist()
    (('a', 'b'), [1, -1, 0])
    >>> logits, _ = jax.jit(model.forward)(mix.apply(params, ["b", "base", "a"]), jnp.ones((3, 4), "int32"))
    >>> logits.shape
    (3, 4, 32)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree
from jpeft.errors import SettingError
from jpeft.layout import layouts_for
from jpeft.methods import rows as row_kinds
from jpeft.methods.base import Method, refuse_rebased
import jpeft.models.hooks as hooks

BASE = "base"
"""The row name (besides ``None``) of a row that runs the base model alone."""
STRATEGIES = ("auto", "dense", "gather")
"""How per-row LoRA weights compute (``MixedAdapters(strategy=...)``)."""


# ----------------------------------------------------------------------------- per-row virtual tokens


class _TokensPlan(NamedTuple):
    point: hooks.HookPoint
    length: int
    dtype: str


def _tokens_plan(values: list[jax.Array], point: hooks.HookPoint, limits: dict) -> _TokensPlan:
    n = max(int(v.shape[0]) for v in values)
    most = limits.get("max_virtual_tokens")
    if most is not None:
        if n > most:
            raise ValueError(f"an adapter has {n} virtual tokens, more than max_virtual_tokens={most}; raise it")
        n = most
    return _TokensPlan(point, n, jnp.dtype(jnp.result_type(*[v.dtype for v in values])).name)


def _tokens_stack(plan: _TokensPlan, values: list[jax.Array | None]) -> dict:
    """Virtual tokens left-padded to ``plan.length``, with a mask of each slot's real ones (host arrays)."""
    embeddings, masks, dtype = [], [], jnp.dtype(plan.dtype)
    for v in values:
        n = 0 if v is None else int(v.shape[0])
        if n > plan.length:
            raise ValueError(f"{n} virtual tokens are more than the slots' {plan.length}")
        pad = np.zeros((plan.length - n, plan.point.width), dtype)
        embeddings.append(pad if v is None else np.concatenate([pad, np.asarray(v, dtype)]))
        masks.append(np.arange(plan.length) >= plan.length - n)
    return {"embeddings": np.stack(embeddings), "mask": np.stack(masks)}


# ----------------------------------------------------------------------------- the stacked slots


class _Entry(NamedTuple):
    """One stacked thing: a weight path and a row kind's name, or a hook point (kind ``"tokens"``)."""

    where: str
    kind: str
    lead: int
    plan: Any


@jax.tree_util.register_pytree_node_class
class Slots:
    """The stacked adapters of a :class:`MixedAdapters`: arrays (the pytree's leaves) plus a static layout.

    Pass it to a jitted function as an argument and call :meth:`apply` inside: loading
    another adapter of the same layout changes only the arrays, so nothing recompiles.
    """

    def __init__(self, entries: Sequence[_Entry], states: Sequence[dict], count: int):
        self.entries, self.states, self.count = tuple(entries), list(states), int(count)

    def tree_flatten(self):
        return self.states, (self.entries, self.count)

    @classmethod
    def tree_unflatten(cls, aux, states):
        entries, count = aux
        return cls(entries, states, count)

    def apply(self, params: Any, rows: jax.Array) -> Any:
        """``params`` with per-row leaves: row ``b`` runs slot ``rows[b]`` (``-1``: the base alone).

        The base arrays are shared, not copied; works on traced values (inside ``jit``).
        """
        rows = jnp.asarray(rows)
        if rows.ndim != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
            raise ValueError(f"rows must be a 1-d int array (a slot per batch row, -1: the base), got "
                             f"{rows.dtype}{tuple(rows.shape)}; MixedAdapters.rows turns names into one")
        rows = rows.astype(jnp.int32)
        flat = tree.flatten(params)
        new, hook_values = {}, []
        for entry, state in zip(self.entries, self.states):
            if entry.kind == "tokens":
                idx, valid = row_kinds.rows_and_valid(rows)
                mask = jnp.take(state["mask"], idx, axis=0) & valid[:, None]
                hook_values.append((entry.plan.point, hooks.row_tokens(jnp.take(state["embeddings"], idx, axis=0),
                                                                         mask)))
                continue
            if entry.where not in flat:
                raise ValueError(f"these parameters have no weight {entry.where!r}, which the mixed adapters adapt; "
                                 "were the adapters made for another model?")
            base = new.get(entry.where, flat[entry.where])
            lead_shape = tuple(flat[entry.where].shape)[:entry.lead]
            row_ids = jnp.broadcast_to(rows, (*lead_shape, rows.shape[0]))
            new[entry.where] = row_kinds.kind_named(entry.kind).run(base, state, entry.plan, row_ids)
        out = tree.replace(params, new) if new else params
        for point, value in hook_values:
            out = hooks.attach(out, point, value)
        return out


def _abstract(params: Any) -> Any:
    """Shapes and dtypes only (quantized leaves keep their structure): what stacking needs to keep."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), params)


def _changes(like: Any, name: str, method: Method, adapter: Any, model: Any) -> dict[tuple[str, str], Any]:
    """``{(where, kind): leaf}``: what adapter ``name`` changes in the parameters, by kind."""
    if not isinstance(method, Method):
        raise TypeError(f"adapter {name!r} must be a (jpeft.Method, adapter) pair, got {type(method).__name__}")
    refuse_rebased(method, f"MixedAdapters: adapter {name!r}")
    try:
        applied = method.apply(like, adapter)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"adapter {name!r} ({method.name}) does not fit these parameters: {err}") from None
    out = {}
    for point in (model.hooks.values() if model is not None else ()):
        value = hooks.read(applied, point)
        if value is None:
            continue
        if point.kind != "tokens":
            raise ValueError(f"adapter {name!r} ({method.name}) feeds the model's {point.name!r} hook point (kind "
                             f"{point.kind!r}), which cannot differ per row: only virtual tokens (a 'tokens' hook) and "
                             f"weights wrapped in {', '.join(row_kinds.registered())} can. Run it on its own "
                             "(jpeft.AdapterBank)")
        out[(point.name, "tokens")] = value
    flat_like = tree.flatten(like)
    for path, leaf in tree.flatten(applied).items():
        if hooks.HOOKS in path.split("/"):
            if model is None:
                raise ValueError(f"adapter {name!r} ({method.name}) feeds a hook point ({path!r}): pass model= so "
                                 "its virtual tokens can be mixed per row")
            continue
        if path in flat_like and leaf is flat_like[path]:
            continue
        kind = row_kinds.kind_of(leaf)
        if kind is None or path not in flat_like or getattr(leaf, "base", None) is not flat_like[path]:
            raise ValueError(
                f"adapter {name!r} ({method.name}) turns {path!r} into a {type(leaf).__name__}, which cannot differ "
                f"per row (per-row kinds: {', '.join(row_kinds.registered())}, and virtual tokens); run it on "
                "its own (jpeft.AdapterBank) or merge it into the base")
        out[(path, kind.name)] = leaf
    return out


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name == BASE:
        raise ValueError(f"an adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
    return name


class MixedAdapters:
    """Named adapters in slots over one base; each batch row picks one (see the module docstring).

    Args:
        params: the frozen base parameters (float or quantized; only shapes are kept).
        adapters: ``{name: (method, adapter)}`` or a :class:`jpeft.AdapterBank`.
        model: the :class:`jpeft.models.Model` (needed for prompt adapters and stacked layers).
        slots: how many slots to hold (default: one per adapter); free slots take later loads.
        max_rank: the LoRA rank of the slots (default: the largest adapter's); loading an
            adapter of a higher rank then needs a new mix.
        max_virtual_tokens: the same for prompt adapters' virtual tokens.
        strategy: how per-row LoRA runs (:class:`jpeft.methods.lora.LoraRows`): ``"gather"``
            (each row's own factors), ``"dense"`` (every slot's factors at once, other slots'
            masked off per row), or ``"auto"``: gather, dense for a single slot. The results
            are the same; the speed is not.
    """

    def __init__(self, params: Any, adapters: Mapping[str, tuple[Method, Any]] | Any, *, model: Any = None,
                 slots: int | None = None, max_rank: int | None = None, max_virtual_tokens: int | None = None,
                 strategy: str = "auto"):
        adapters = {name: adapters[name] for name in adapters.names} if hasattr(adapters, "names") else adapters
        names = [_check_name(n) for n in adapters]
        if not names:
            raise ValueError("MixedAdapters needs at least one adapter")
        count = len(names) if slots is None else slots
        if not isinstance(count, int) or isinstance(count, bool) or count < len(names):
            raise SettingError("slots", slots, f"cannot hold the {len(names)} adapters given; give at least that many",
                               what="MixedAdapters:")
        for setting, value in (("max_rank", max_rank), ("max_virtual_tokens", max_virtual_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SettingError(setting, value, "must be a positive int or None", what="MixedAdapters:")
        if strategy not in STRATEGIES:
            raise SettingError("strategy", strategy, f"must be one of {STRATEGIES}", what="MixedAdapters:")
        self._like, self._model = _abstract(params), model
        self._limits = {"max_rank": max_rank, "max_virtual_tokens": max_virtual_tokens, "strategy": strategy}
        changes = {}
        for name in names:
            entry = adapters[name]
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise TypeError(f"adapter {name!r} must be a (jpeft.Method, adapter) pair")
            changes[name] = _changes(self._like, name, *entry, model)
        slot_changes = [changes[n] for n in names] + [{}] * (count - len(names))
        keys = sorted({key for c in slot_changes for key in c})
        layouts = layouts_for(self._like, model=model)
        flat = tree.flatten(self._like)
        entries, states = [], []
        for where, kind in keys:
            per_slot = [c.get((where, kind)) for c in slot_changes]
            present = [x for x in per_slot if x is not None]
            try:
                if kind == "tokens":
                    plan = _tokens_plan(present, model.hook(where), self._limits)
                    entries.append(_Entry(where, kind, 0, plan))
                    states.append(_on_device(_tokens_stack(plan, per_slot)))
                    continue
                lead = layouts[where].lead
                plan = row_kinds.kind_named(kind).plan(present, lead, self._limits)
                entries.append(_Entry(where, kind, lead, plan))
                states.append(_on_device(row_kinds.kind_named(kind).stack(plan, per_slot,
                                                                          tuple(flat[where].shape)[:lead])))
            except ValueError as err:
                raise ValueError(f"the adapters at {where!r} cannot share a batch: {err}") from None
        self._slots = Slots(entries, states, count)
        self._names = tuple(names) + (None,) * (count - len(names))
        self._methods = {n: adapters[n][0] for n in names}

    # ------------------------------------------------------------------ reading

    @property
    def slots(self) -> Slots:
        """The stacked adapters (a pytree): pass them to jitted functions with the rows."""
        return self._slots

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names in slot order (free slots left out)."""
        return tuple(n for n in self._names if n is not None)

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return len(self._names)

    def slot(self, name: str) -> int:
        """The slot that holds adapter ``name``."""
        if name not in self.names:
            raise ValueError(f"no adapter named {name!r} in this mix; it holds {list(self.names)} "
                             f"(or {BASE!r} for the base model alone)")
        return self._names.index(name)

    def rows(self, names: Sequence[str | None]) -> np.ndarray:
        """The int32 row assignment for a batch: a slot per name, ``-1`` for ``"base"`` / ``None``.

        Raises:
            ValueError: naming an unknown adapter and listing the ones there are.
        """
        if isinstance(names, str):
            raise TypeError("rows takes one name per batch row (a list), not a single string")
        return np.asarray([-1 if n is None or n == BASE else self.slot(n) for n in names], np.int32)

    def apply(self, params: Any, rows: Sequence[str | None] | jax.Array) -> Any:
        """The parameters for one batch: row ``b`` runs adapter ``rows[b]`` (a name, or a slot index).

        Equivalent to ``self.slots.apply(params, self.rows(names))``; inside ``jit``, pass
        ``self.slots`` and the rows as arguments instead.
        """
        if len(rows) and all(r is None or isinstance(r, str) for r in list(rows)):
            rows = self.rows(rows)
        return self._slots.apply(params, rows)

    def __repr__(self) -> str:
        held = ", ".join(f"{n!r}: {self._methods[n].describe()}" for n in self.names)
        return f"MixedAdapters({{{held}}}, slots={self.capacity})"

    # ------------------------------------------------------------------ hot-swap

    def load(self, name: str, method: Method, adapter: Any) -> "MixedAdapters":
        """A new mix with adapter ``name`` loaded into its slot (or a free one): the slots keep their shapes.

        So functions compiled for this mix's :attr:`slots` run the new one without compiling
        again. Raises a ValueError when the adapter does not fit the slots (a higher rank,
        more virtual tokens, a weight no slot adapts) or when no slot is free.
        """
        name = _check_name(name)
        if name in self.names:
            slot = self._names.index(name)
        elif None in self._names:
            slot = self._names.index(None)
        else:
            raise ValueError(f"all {self.capacity} slots are taken ({list(self.names)}); unload one, or build a "
                             f"MixedAdapters with slots={self.capacity + 1} (a new shape: compiles once more)")
        changes = _changes(self._like, name, method, adapter, self._model)
        known = {(e.where, e.kind) for e in self._slots.entries}
        extra = sorted(set(changes) - known)
        if extra:
            raise ValueError(f"adapter {name!r} ({method.name}) adapts {extra[0][0]!r} ({extra[0][1]}), which no slot "
                             "of this mix holds; build a MixedAdapters that includes such an adapter (compiles once "
                             "more)")
        out = self._with_slot(slot, changes, f"adapter {name!r} ({method.name})")
        out._names = self._names[:slot] + (name,) + self._names[slot + 1:]
        out._methods = {**{n: m for n, m in self._methods.items() if n in out._names}, name: method}
        return out

    def unload(self, name: str) -> "MixedAdapters":
        """A new mix with adapter ``name``'s slot emptied (rows that pick it would run the base)."""
        slot = self.slot(name)
        out = self._with_slot(slot, {}, f"adapter {name!r}")
        out._names = self._names[:slot] + (None,) + self._names[slot + 1:]
        out._methods = {n: m for n, m in self._methods.items() if n != name}
        return out

    def _with_slot(self, slot: int, changes: dict, what: str) -> "MixedAdapters":
        flat = tree.flatten(self._like)
        ones = []
        for entry in self._slots.entries:
            leaf = changes.get((entry.where, entry.kind))
            try:
                if entry.kind == "tokens":
                    ones.append(_tokens_stack(entry.plan, [leaf]))
                else:
                    lead_shape = tuple(flat[entry.where].shape)[:entry.lead]
                    ones.append(row_kinds.kind_named(entry.kind).stack(entry.plan, [leaf], lead_shape))
            except ValueError as err:
                raise ValueError(f"{what} does not fit the slots at {entry.where!r}: {err}; build a new "
                                 "MixedAdapters for it (compiles once more)") from None
        axes = tuple(tuple(sorted(_slot_axes(entry, state).items()))
                     for entry, state in zip(self._slots.entries, self._slots.states))
        states = _put_slot(self._slots.states, ones, jnp.int32(slot), axes=axes)
        out = object.__new__(MixedAdapters)
        out.__dict__.update(self.__dict__)
        out._slots = Slots(self._slots.entries, states, self._slots.count)
        return out


def _on_device(state: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in state.items()}


def _slot_axes(entry: _Entry, state: dict) -> dict[str, int]:
    if entry.kind == "tokens":
        return {name: 0 for name in state}
    return row_kinds.slot_axes(row_kinds.kind_named(entry.kind), entry.plan, entry.lead, state)


@functools.partial(jax.jit, static_argnames=("axes",))
def _put_slot(states: list[dict], ones: list[dict], slot: jax.Array, *, axes: tuple) -> list[dict]:
    """``states`` with slot ``slot`` set to ``ones``' only slot (``axes``: each array's slot axis).

    One compiled update per layout of the slots, whichever slot and adapter: hot-swapping compiles once.
    """
    return [{k: jax.lax.dynamic_update_index_in_dim(v, jnp.asarray(one[k], v.dtype), slot, axis=dict(entry)[k])
             for k, v in state.items()} for state, one, entry in zip(states, ones, axes)]
