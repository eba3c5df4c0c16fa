"""Per-row weights: how a method's weight wrapper runs a different adapter in every batch row.

:class:`jpeft.MixedAdapters` stacks many adapters into **slots** and lets each batch row
pick one (or the base). It knows no method by name: a weight wrapper type (the leaf a
method's ``apply`` puts in place of a weight, such as :class:`jpeft.LoraWeight`) takes
part by registering a :class:`RowKind` next to its own definition, as LoRA
(:mod:`jpeft.methods.lora`) and IA3 (:mod:`jpeft.methods.ia3`) do. Leaves of an
unregistered type cannot differ per row, and a mix that meets one says so.

A row kind has three steps: ``plan`` reads the single-adapter leaves that share one
weight and fixes the slots' layout (e.g. the largest rank), ``stack`` turns one leaf per
slot into arrays with a slot axis, and ``run`` wraps the base weight, the stacked arrays
and the rows' slot indices (``-1``: none) into the per-row leaf a model runs.

Example:
    >>> import jpeft
    >>> kind_of(jpeft.LoraWeight).name, kind_of(jpeft.Ia3Weight).name, kind_of(int)
    ('lora', 'ia3', None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class RowKind(NamedTuple):
    """How single-adapter leaves of one wrapper type stack into slots and run per row.

    Attributes:
        name: the kind's name (``"lora"``); one weight holds at most one entry per kind.
        plan: ``(leaves, lead, limits) -> plan``: a hashable layout of the stacked slots
            that fits every leaf (e.g. the largest rank). ``lead`` is the weight's number of
            stack axes (scanned layers); ``limits`` holds :class:`jpeft.MixedAdapters`'s
            settings (``max_rank``, ``strategy``, ...); a ValueError names a leaf that
            exceeds them.
        stack: ``(plan, leaves or None per slot, lead_shape) -> {name: array}``, each with a
            slot axis (see ``slot_axes``; ``None``: an empty slot, which changes nothing); a
            ValueError names a leaf that does not fit the plan.
        run: ``(base, state, plan, rows) -> leaf``: the per-row leaf the model runs;
            ``rows`` is ``(*lead, B)`` int32, a slot per batch row, ``-1`` for none.
        slot_axes: ``(plan, lead) -> {name: axis}`` where ``stack``'s arrays have their slot
            axis, for a layout that suits the computation (LoRA's ``A`` keeps it next to the
            rank); ``None``: right after the ``lead`` axes, for every array.
    """

    name: str
    plan: Callable[..., Any]
    stack: Callable[..., dict]
    run: Callable[..., Any]
    slot_axes: Callable[..., dict] | None = None


_KINDS: dict[type, RowKind] = {}


def register(leaf_type: type, kind: RowKind) -> RowKind:
    """Lets leaves of ``leaf_type`` (a method's weight wrapper) differ per row in a :class:`jpeft.MixedAdapters`."""
    clash = [t.__name__ for t, k in _KINDS.items() if k.name == kind.name and t is not leaf_type]
    if clash:
        raise ValueError(f"the row kind name {kind.name!r} is taken by {clash[0]}; give {leaf_type.__name__}'s "
                         "kind another name")
    _KINDS[leaf_type] = kind
    return kind


def kind_of(leaf_or_type: Any) -> RowKind | None:
    """The registered :class:`RowKind` of a leaf (or a leaf type), or ``None``."""
    return _KINDS.get(leaf_or_type if isinstance(leaf_or_type, type) else type(leaf_or_type))


def kind_named(name: str) -> RowKind:
    """The registered :class:`RowKind` called ``name``."""
    return next(k for k in _KINDS.values() if k.name == name)


def slot_axes(kind: RowKind, plan: Any, lead: int, names) -> dict[str, int]:
    """``{name: slot axis}`` of a kind's stacked arrays (see :attr:`RowKind.slot_axes`)."""
    return kind.slot_axes(plan, lead) if kind.slot_axes is not None else {name: lead for name in names}


def registered() -> tuple[str, ...]:
    """The names of the wrapper types that can differ per row."""
    return tuple(t.__name__ for t in _KINDS)


# ----------------------------------------------------------------------------- helpers for row kinds


def rows_and_valid(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(safe slot index, valid)`` per row: a base row (``-1``) reads slot 0 and is masked out."""
    valid = rows >= 0
    return jnp.where(valid, rows, 0), valid


def per_row(v_B: jax.Array, ndim: int) -> jax.Array:
    """``(B,)`` -> ``(B, 1, ..., 1)`` of ``ndim`` axes, to broadcast against a row's values.

    Example:
        >>> per_row(jnp.arange(3), 3).shape
        (3, 1, 1)
    """
    return v_B.reshape(v_B.shape[0], *(1,) * (ndim - 1))


def check_rows(rows: jax.Array, batch: int, lead: int, what: str) -> None:
    """A ValueError unless ``rows`` assigns one slot to each of ``batch`` rows, outside any stack axis."""
    if lead:
        raise ValueError(f"a per-row {what} with {lead} stack axes is used outside a scan over them; models use "
                         "stacked layers one layer at a time (jax.lax.scan)")
    if rows.shape[-1] != batch:
        raise ValueError(f"the batch has {batch} rows but the adapters were assigned to {rows.shape[-1]} rows; "
                         "give one slot (or -1 for the base) per row of this batch")


def no_single_array(self, dtype=None) -> jax.Array:
    """``materialize`` of a per-row wrapper: there is no one weight to return."""
    del dtype
    raise TypeError(f"a {type(self).__name__} runs a different adapter in every row, so it has no single weight "
                    "array: run it through jpeft.ops (jpeft's models do), or merge one adapter with method.merge")
