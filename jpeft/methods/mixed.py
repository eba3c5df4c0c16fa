"""Many adapters over one base in one batch: each row of a batch runs its own adapter, or none.

:class:`MixedAdapters` holds named adapters in **slots** over one frozen base. Each row
of a batch names a slot (``-1``: the base alone), and one forward pass or one
generation call runs every row with its own adapter, as serving systems do for many
LoRA adapters at once (Punica, S-LoRA):

* **LoRA**: the slots' factors are stacked, zero-padded to one rank ``R``:
  ``A (S, *in, R)``, ``B (S, R, *out)`` and a scale per slot. :class:`LoraRows` gathers
  each row's factors and computes ``x @ W + s_row * ((x @ A_row) @ B_row)``: the
  base matmul is shared by all rows (a 4-bit base stays 4-bit). Padding is exact:
  the padded columns of ``A`` and rows of ``B`` are zeros, which add exactly nothing.
* **IA3**: :class:`Ia3Rows` scales each row by its slot's vectors (ones for the base).
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
    >>> logits, _ = model.forward(mix.apply(params, ["b", "base", "a"]), jnp.ones((3, 4), "int32"))
    >>> logits.shape
    (3, 4, 32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.methods.base import Method
from jpeft.methods.ia3 import Ia3Weight
from jpeft.methods.lora import LoraWeight, weight_layouts
from jpeft.models import hooks

BASE = "base"
"""The row name (besides ``None``) of a row that runs the base model alone."""


# ----------------------------------------------------------------------------- per-row weights


def _rows_and_valid(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(safe slot index, valid)`` per row: a base row (``-1``) reads slot 0 and is masked out."""
    valid = rows >= 0
    return jnp.where(valid, rows, 0), valid


def _per_row(v_B: jax.Array, ndim: int) -> jax.Array:
    """``(B,)`` -> ``(B, 1, ..., 1)`` of ``ndim`` axes, to broadcast against a row's values."""
    return v_B.reshape(v_B.shape[0], *(1,) * (ndim - 1))


def _check_rows(rows: jax.Array, batch: int, lead: int, what: str) -> None:
    if lead:
        raise ValueError(f"a per-row {what} with {lead} stack axes is used outside a scan over them; models use "
                         "stacked layers one layer at a time (jax.lax.scan)")
    if rows.shape[-1] != batch:
        raise ValueError(f"the batch has {batch} rows but the adapters were assigned to {rows.shape[-1]} rows; "
                         "give one slot (or -1 for the base) per row of this batch")


def _no_single_array(self, dtype=None) -> jax.Array:
    del dtype
    raise TypeError(f"a {type(self).__name__} runs a different adapter in every row, so it has no single weight "
                    "array: run it through jpeft.ops (jpeft's models do), or merge one adapter with method.merge")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraRows(ops.WeightWrapper):
    """A weight with a different LoRA update in every batch row (see the module docstring).

    ``a (*lead, S, *in, R)``, ``b (*lead, S, R, *out)``, ``scale (*lead, S)``, ``rows (*lead, B)``
    (slot per row, ``-1``: none); ``head_scale`` is the scale on a tied output head (zero for
    slots that adapt an embedding's lookups only). The first axis of an op's input is the
    batch row. ``base`` may be a wrapper (a 4-bit weight, or another per-row wrapper).
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scale: jax.Array
    head_scale: jax.Array
    rows: jax.Array
    tie_output: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def lead(self) -> int:
        return self.a.ndim + self.b.ndim - len(self.shape) - 4

    def _factors(self, batch: int, dtype, scale: jax.Array):
        _check_rows(self.rows, batch, self.lead, "LoRA weight")
        idx, valid = _rows_and_valid(self.rows)
        a = jnp.take(self.a, idx, axis=0).astype(dtype)
        b = jnp.take(self.b, idx, axis=0).astype(dtype)
        return a, b, jnp.where(valid, jnp.take(scale, idx), 0).astype(dtype)

    def linear(self, x: jax.Array) -> jax.Array:
        y = ops.linear(x, self.base)
        a, b, s = self._factors(x.shape[0], x.dtype, self.scale)
        h = jnp.einsum("b...i,bir->b...r", x, a)
        return y + _per_row(s, y.ndim) * jnp.einsum("b...r,bro->b...o", h, b)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        y = ops.einsum(subscripts, x, self.base)
        a, b, s = self._factors(x.shape[0], x.dtype, self.scale)
        x_sub, w_in, w_out, out = ops.split_subscripts(subscripts, a.ndim - 2)
        row = x_sub[0]
        if row in w_in or row not in out:
            raise ValueError(f"einsum {subscripts!r}: a per-row weight needs the input's first axis (the batch row) "
                             "kept in the output")
        r = ops.free_letter(subscripts)
        kept = "".join(c for c in x_sub if c not in w_in)
        h = jnp.einsum(f"{x_sub},{row}{w_in}{r}->{kept}{r}", x, a)
        return y + _per_row(s, y.ndim) * jnp.einsum(f"{kept}{r},{row}{r}{w_out}->{out}", h, b)

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        rows_out = ops.embed(ids, self.base, dtype)
        _check_rows(self.rows, ids.shape[0], self.lead, "LoRA table")
        idx, valid = _rows_and_valid(self.rows)
        a_rows = self.a[idx.reshape(-1, *(1,) * (ids.ndim - 1)), ids].astype(dtype)  # (B, ..., R)
        b = jnp.take(self.b, idx, axis=0).astype(dtype)
        s = jnp.where(valid, jnp.take(self.scale, idx), 0).astype(dtype)
        return rows_out + _per_row(s, rows_out.ndim) * jnp.einsum("b...r,brd->b...d", a_rows, b)

    def attend(self, x: jax.Array) -> jax.Array:
        y = ops.attend(x, self.base)
        if not self.tie_output:
            return y
        a, b, s = self._factors(x.shape[0], x.dtype, self.head_scale)
        h = jnp.einsum("b...d,brd->b...r", x, b)
        return y + _per_row(s, y.ndim) * jnp.einsum("b...r,bvr->b...v", h, a)

    materialize = _no_single_array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ia3Rows(ops.WeightWrapper):
    """A weight (or bias) whose outputs, or inputs, are scaled by a different IA3 vector in every row.

    ``scale (*lead, S, *vec)``, ``rows (*lead, B)`` (``-1``: scale one). ``on_input`` and
    ``outputs`` mean what they mean for :class:`jpeft.Ia3Weight`.
    """

    base: Any
    scale: jax.Array
    rows: jax.Array
    on_input: bool = dataclasses.field(default=False, metadata=dict(static=True))
    outputs: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return getattr(self.base, "dtype", jnp.float32)

    def _scales(self, batch: int, ndim: int, dtype) -> jax.Array:
        """Each row's vector, shaped to broadcast against an ``ndim``-axis input or output."""
        _check_rows(self.rows, batch, self.rows.ndim - 1, "IA3 weight")
        idx, valid = _rows_and_valid(self.rows)
        s = jnp.take(self.scale, idx, axis=0)
        s = jnp.where(_per_row(valid, s.ndim), s, 1).astype(dtype)
        return s.reshape(s.shape[0], *(1,) * (ndim - s.ndim), *s.shape[1:])

    def linear(self, x: jax.Array) -> jax.Array:
        if self.on_input:
            return ops.linear(x * self._scales(x.shape[0], x.ndim, x.dtype), self.base)
        y = ops.linear(x, self.base)
        return y * self._scales(y.shape[0], y.ndim, y.dtype)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        if self.on_input:
            return ops.einsum(subscripts, x * self._scales(x.shape[0], x.ndim, x.dtype), self.base)
        y = ops.einsum(subscripts, x, self.base)
        return y * self._scales(y.shape[0], y.ndim, y.dtype)

    def add_bias(self, y: jax.Array) -> jax.Array:
        return y + ops.as_array(self.base, y.dtype) * self._scales(y.shape[0], y.ndim, y.dtype)

    materialize = _no_single_array


# ----------------------------------------------------------------------------- kinds of per-row leaves


class RowKind(NamedTuple):
    """How single-adapter leaves of one type stack into slots and run per row.

    Attributes:
        name: the kind's name (``"lora"``).
        plan: ``(leaves, lead, limits) -> plan``: the hashable layout of the stacked slots that
            fits every leaf (e.g. the largest rank); ``limits`` are :class:`MixedAdapters`'s
            ``max_rank``/``max_virtual_tokens`` (a ValueError when a leaf exceeds them).
        stack: ``(plan, leaves or None per slot, lead_shape) -> {name: array}`` with the slot
            axis after the ``lead_shape`` axes; a ValueError names a leaf that does not fit.
        run: ``(base, state, plan, rows) -> leaf``: the per-row leaf the model runs.
    """

    name: str
    plan: Callable[..., Any]
    stack: Callable[..., dict]
    run: Callable[..., Any]


_KINDS: dict[type, RowKind] = {}


def register_rows(leaf_type: type, kind: RowKind) -> RowKind:
    """Lets leaves of ``leaf_type`` (a method's wrapper) differ per row in a :class:`MixedAdapters`."""
    _KINDS[leaf_type] = kind
    return kind


class _LoraPlan(NamedTuple):
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    rank: int
    tie: bool
    dtype: str


def _lora_plan(leaves: list[LoraWeight], lead: int, limits: dict) -> _LoraPlan:
    shapes = {(tuple(x.a.shape[lead:-1]), tuple(x.b.shape[lead + 1:])) for x in leaves}
    if len(shapes) != 1:
        raise ValueError(f"LoRA factors of one weight have different input/output shapes {sorted(shapes)}")
    rank = max(int(x.a.shape[-1]) for x in leaves)
    max_rank = limits.get("max_rank")
    if max_rank is not None:
        if rank > max_rank:
            raise ValueError(f"an adapter has rank {rank}, more than max_rank={max_rank}; raise max_rank")
        rank = max_rank
    (inputs, outputs), = shapes
    dtype = jnp.result_type(*[x.a.dtype for x in leaves], *[x.b.dtype for x in leaves])
    return _LoraPlan(inputs, outputs, rank, any(x.tie_output for x in leaves), jnp.dtype(dtype).name)


def _lora_stack(plan: _LoraPlan, leaves: list[LoraWeight | None], lead_shape: tuple[int, ...]) -> dict:
    lead, big = len(lead_shape), plan.rank
    a_list, b_list, scales, head_scales = [], [], [], []
    for x in leaves:
        if x is None:
            a_list.append(jnp.zeros((*lead_shape, *plan.inputs, big), plan.dtype))
            b_list.append(jnp.zeros((*lead_shape, big, *plan.outputs), plan.dtype))
            scales.append(0.0)
            head_scales.append(0.0)
            continue
        r = int(x.a.shape[-1])
        if r > big:
            raise ValueError(f"rank {r} is more than the slots' rank {big}")
        if (tuple(x.a.shape[lead:-1]), tuple(x.b.shape[lead + 1:])) != (plan.inputs, plan.outputs):
            raise ValueError(f"factors {tuple(x.a.shape)} and {tuple(x.b.shape)} do not fit the slots' "
                             f"(*, {plan.inputs}, r) and (*, r, {plan.outputs})")
        if x.tie_output and not plan.tie:
            raise ValueError("it ties its embedding delta to the output head, which these slots do not")
        pad_a = [(0, 0)] * (x.a.ndim - 1) + [(0, big - r)]                     # extra columns of A: zeros
        pad_b = [(0, 0)] * lead + [(0, big - r)] + [(0, 0)] * (x.b.ndim - lead - 1)  # extra rows of B: zeros
        a_list.append(jnp.pad(jnp.asarray(x.a, plan.dtype), pad_a))
        b_list.append(jnp.pad(jnp.asarray(x.b, plan.dtype), pad_b))
        scales.append(float(x.scale))
        head_scales.append(float(x.scale) if x.tie_output else 0.0)
    per_slot = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (*lead_shape, len(v)))
    return {"a": jnp.stack(a_list, axis=lead), "b": jnp.stack(b_list, axis=lead),
            "scale": per_slot(scales), "head_scale": per_slot(head_scales)}


def _lora_run(base, state: dict, plan: _LoraPlan, rows: jax.Array) -> LoraRows:
    return LoraRows(base, state["a"], state["b"], state["scale"], state["head_scale"], rows, tie_output=plan.tie)


class _Ia3Plan(NamedTuple):
    vector: tuple[int, ...]
    on_input: bool
    outputs: int
    dtype: str


def _ia3_plan(leaves: list[Ia3Weight], lead: int, limits: dict) -> _Ia3Plan:
    del limits
    kinds = {(tuple(x.scale.shape[lead:]), x.on_input, x.outputs) for x in leaves}
    if len(kinds) != 1:
        raise ValueError("IA3 adapters scale this weight in different ways (its inputs in one, its outputs in "
                         f"another: {sorted(kinds)}), which one batch cannot hold")
    (vector, on_input, outputs), = kinds
    return _Ia3Plan(vector, on_input, outputs, jnp.dtype(jnp.result_type(*[x.scale.dtype for x in leaves])).name)


def _ia3_stack(plan: _Ia3Plan, leaves: list[Ia3Weight | None], lead_shape: tuple[int, ...]) -> dict:
    vectors = []
    for x in leaves:
        if x is None:
            vectors.append(jnp.ones((*lead_shape, *plan.vector), plan.dtype))
            continue
        if (tuple(x.scale.shape[len(lead_shape):]), x.on_input, x.outputs) != plan[:3]:
            raise ValueError(f"its IA3 vector {tuple(x.scale.shape)} (on_input={x.on_input}) does not fit the slots' "
                             f"{plan.vector} (on_input={plan.on_input})")
        vectors.append(jnp.asarray(x.scale, plan.dtype))
    return {"scale": jnp.stack(vectors, axis=len(lead_shape))}


def _ia3_run(base, state: dict, plan: _Ia3Plan, rows: jax.Array) -> Ia3Rows:
    return Ia3Rows(base, state["scale"], rows, on_input=plan.on_input, outputs=plan.outputs)


LORA = register_rows(LoraWeight, RowKind("lora", _lora_plan, _lora_stack, _lora_run))
IA3 = register_rows(Ia3Weight, RowKind("ia3", _ia3_plan, _ia3_stack, _ia3_run))


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
    """Virtual tokens left-padded to ``plan.length``, with a mask of each slot's real ones."""
    embeddings, masks = [], []
    for v in values:
        n = 0 if v is None else int(v.shape[0])
        if n > plan.length:
            raise ValueError(f"{n} virtual tokens are more than the slots' {plan.length}")
        pad = jnp.zeros((plan.length - n, plan.point.width), plan.dtype)
        embeddings.append(pad if v is None else jnp.concatenate([pad, jnp.asarray(v, plan.dtype)]))
        masks.append(np.arange(plan.length) >= plan.length - n)
    return {"embeddings": jnp.stack(embeddings), "mask": jnp.asarray(np.stack(masks))}


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
        kinds = {k.name: k for k in _KINDS.values()}
        new, hook_values = {}, []
        for entry, state in zip(self.entries, self.states):
            if entry.kind == "tokens":
                idx, valid = _rows_and_valid(rows)
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
            new[entry.where] = kinds[entry.kind].run(base, state, entry.plan, row_ids)
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
                             f"{point.kind!r}), which cannot differ per row: only LoRA, IA3 and virtual tokens (prompt "
                             "tuning, P-tuning) can. Run it on its own (jpeft.AdapterBank)")
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
        kind = _KINDS.get(type(leaf))
        if kind is None or path not in flat_like or getattr(leaf, "base", None) is not flat_like[path]:
            raise ValueError(
                f"adapter {name!r} ({method.name}) turns {path!r} into a {type(leaf).__name__}, which cannot differ "
                f"per row (per-row kinds: {', '.join(t.__name__ for t in _KINDS)}, and virtual tokens); run it on "
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
    """

    def __init__(self, params: Any, adapters: Mapping[str, tuple[Method, Any]] | Any, *, model: Any = None,
                 slots: int | None = None, max_rank: int | None = None, max_virtual_tokens: int | None = None):
        adapters = {name: adapters[name] for name in adapters.names} if hasattr(adapters, "names") else adapters
        names = [_check_name(n) for n in adapters]
        if not names:
            raise ValueError("MixedAdapters needs at least one adapter")
        count = len(names) if slots is None else slots
        if not isinstance(count, int) or count < len(names):
            raise ValueError(f"slots={slots!r} cannot hold the {len(names)} adapters given; give at least that many")
        for setting, value in (("max_rank", max_rank), ("max_virtual_tokens", max_virtual_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{setting} must be a positive int or None, got {value!r}")
        self._like, self._model = _abstract(params), model
        self._limits = {"max_rank": max_rank, "max_virtual_tokens": max_virtual_tokens}
        changes = {}
        for name in names:
            entry = adapters[name]
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise TypeError(f"adapter {name!r} must be a (jpeft.Method, adapter) pair")
            changes[name] = _changes(self._like, name, *entry, model)
        slot_changes = [changes[n] for n in names] + [{}] * (count - len(names))
        keys = sorted({key for c in slot_changes for key in c})
        layouts = weight_layouts(self._like, model)
        flat = tree.flatten(self._like)
        kinds = {k.name: k for k in _KINDS.values()}
        entries, states = [], []
        for where, kind in keys:
            per_slot = [c.get((where, kind)) for c in slot_changes]
            present = [x for x in per_slot if x is not None]
            try:
                if kind == "tokens":
                    plan = _tokens_plan(present, model.hook(where), self._limits)
                    entries.append(_Entry(where, kind, 0, plan))
                    states.append(_tokens_stack(plan, per_slot))
                    continue
                lead = layouts[where].lead
                plan = kinds[kind].plan(present, lead, self._limits)
                entries.append(_Entry(where, kind, lead, plan))
                states.append(kinds[kind].stack(plan, per_slot, tuple(flat[where].shape)[:lead]))
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
                             "of this mix holds; build a MixedAdapters that includes such an adapter (compiles once more)")
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
        kinds = {k.name: k for k in _KINDS.values()}
        flat = tree.flatten(self._like)
        states = []
        for entry, state in zip(self._slots.entries, self._slots.states):
            leaf = changes.get((entry.where, entry.kind))
            try:
                if entry.kind == "tokens":
                    one = _tokens_stack(entry.plan, [leaf])
                else:
                    lead_shape = tuple(flat[entry.where].shape)[:entry.lead]
                    one = kinds[entry.kind].stack(entry.plan, [leaf], lead_shape)
            except ValueError as err:
                raise ValueError(f"{what} does not fit the slots at {entry.where!r}: {err}; build a new "
                                 "MixedAdapters for it (compiles once more)") from None
            lead = (slice(None),) * entry.lead  # the slot axis comes after the stack axes
            states.append({k: v.at[(*lead, slot)].set(one[k][(*lead, 0)]) for k, v in state.items()})
        out = object.__new__(MixedAdapters)
        out.__dict__.update(self.__dict__)
        out._slots = Slots(self._slots.entries, states, self._slots.count)
        return out
