"""Weight-delta methods: ``W + s * dW(factors)`` for a structured ``dW`` (LoHa, LoKr), built one way.

A :class:`DeltaKind` says what makes one such method: which factors a weight gets
for its (flattened) input and output sizes, how they start, what their logical axes are
and which :class:`DeltaWeight` subclass runs them. :func:`delta_method` turns a kind
into a :class:`jpeft.Method` with everything LoRA has: target rules with per-rule
``rank`` / ``alpha``, roles from the model's logical axes (:mod:`jpeft.layout`),
stacked layers as batch axes, adapter checks that name what does not fit, ``merge``,
a ``merge_blocker`` for quantized bases, logical axes for sharding, and a Hugging Face
PEFT codec (:mod:`jpeft.io.peft.delta`).

A kernel ``(*lead, *in, *out)`` is seen as the matrix ``(I, O)`` with ``I = prod(in)``
and ``O = prod(out)`` (row-major), which is how Hugging Face PEFT's 2-d ``Linear``
weight ``(O, I)`` sees it, transposed. Factors are stored Flax-oriented: an ``a*``
factor is on the input side ``(..., r)``, a ``b*`` factor on the output side ``(r, ...)``.

:class:`DeltaWeight` is the wrapped leaf :mod:`jpeft.ops` dispatches on. A kind that
can apply its ``dW`` to ``x`` without forming it (LoKr's Kronecker product) overrides
``_apply``; one whose ``dW`` is full-rank in general (LoHa) lets the op run
``x @ (W + s * dW)``, forming ``dW`` inside the op, one weight at a time. ``W`` is a
constant there: the step computes the gradient of ``W + s * dW``, which is ``dW``'s
own (full-size, needed anyway), and no gradient of ``W``.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
    >>> method = jpeft.loha(rank=2, alpha=2, targets=r".*/kernel")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> sorted(adapter["dense"]["kernel"])
    ['a1', 'a2', 'b1', 'b2']
    >>> type(method.apply(params, adapter)["dense"]["kernel"]).__name__
    'LohaWeight'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.errors import SettingError
from jpeft.layout import Layout, layout_of, layouts_for
from jpeft.methods.base import Method, flatten_axes

RANK_AXIS = "lora_rank"
"""The logical name of a factor's rank axis (replicated by the default sharding rules, as LoRA's)."""

Shapes = dict[str, tuple[int, ...]]


# ----------------------------------------------------------------------------- the wrapped leaf


@dataclasses.dataclass(frozen=True)
class DeltaWeight(ops.OverBase):
    """A weight plus a structured update ``s * dW(factors)``; subclasses say what ``dW`` is.

    ``factors`` hold the weight's leading stack axes first (one update per layer); the
    static ``inputs`` / ``outputs`` count the weight's input and output axes, so the
    number of leading axes follows when ``scan`` slices a layer off. ``base`` may itself
    be a wrapper (a quantized weight).
    """

    base: Any
    factors: dict
    rank: int = dataclasses.field(default=1, metadata=dict(static=True))
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    inputs: int = dataclasses.field(default=1, metadata=dict(static=True))
    outputs: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def lead(self) -> int:
        return len(self.shape) - self.inputs - self.outputs

    @property
    def in_size(self) -> int:
        return math.prod(self.shape[self.lead:self.lead + self.inputs])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.lead + self.inputs:]

    # -- what a subclass gives
    def _dense(self, factors: dict) -> jax.Array:
        """``dW`` of one (unstacked) weight as the ``(I, O)`` matrix, float32, without the scale."""
        raise NotImplementedError

    # ``_apply(self, x_NxI) -> (N..., O)``: ``x @ dW`` without forming ``dW``; ``None``: form ``dW`` in the op.
    _apply = None

    @staticmethod
    def factor_axes(name: str, in_axes: tuple, out_axes: tuple) -> tuple:
        """Logical axes of one unstacked factor, from its weight's input and output axes."""
        raise NotImplementedError

    # -- the ops
    def delta(self) -> jax.Array:
        """``s * dW`` in float32, of the weight's shape (leading stack axes included)."""
        dense = self._dense
        for _ in range(self.lead):
            dense = jax.vmap(dense)
        return (self.scale * dense(self.factors)).reshape(self.shape)

    def materialize(self, dtype=None) -> jax.Array:
        base = ops.as_array(self.base, jnp.float32)
        return (base + self.delta()).astype(dtype or self.dtype)

    def _unstacked(self, op: str) -> None:
        if self.lead:
            raise ValueError(f"{type(self).__name__}.{op}: the weight still has {self.lead} stack axes "
                             f"(shape {self.shape}); run it per layer (scan) or merge it")

    def _flat_delta(self, x_NxI: jax.Array) -> jax.Array:
        y = self._apply(x_NxI)
        return (self.scale * y).reshape(*x_NxI.shape[:-1], *self.out_shape).astype(x_NxI.dtype)

    def linear(self, x: jax.Array) -> jax.Array:
        self._unstacked("linear")
        if self._apply is None:
            return x @ self.materialize(x.dtype)
        return ops.linear(x, self.base) + self._flat_delta(x)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        self._unstacked("einsum")
        if self._apply is None:
            return jnp.einsum(subscripts, x, self.materialize(x.dtype))
        y = ops.einsum(subscripts, x, self.base)
        x_sub, w_in, w_out, out = ops.split_subscripts(subscripts, self.inputs)
        kept = "".join(c for c in x_sub if c not in w_in)
        x_in_last = jnp.einsum(f"{x_sub}->{kept}{w_in}", x)        # the weight's input axes last, in its order
        x_NxI = x_in_last.reshape(*x_in_last.shape[:len(kept)], self.in_size)
        return y + jnp.einsum(f"{kept}{w_out}->{out}", self._flat_delta(x_NxI))

    def partition_specs(self, axes: tuple, spec_for) -> "DeltaWeight":
        """Specs for the base (its own, if it is a wrapper) and for each factor (see :func:`factor_axes`)."""
        base = self.base.partition_specs(axes, spec_for) if ops.is_wrapper(self.base) else \
            spec_for(axes, self.base.shape, "base")
        lead = tuple(axes[:self.lead])
        in_axes, out_axes = tuple(axes[self.lead:self.lead + self.inputs]), tuple(axes[self.lead + self.inputs:])
        factors = {name: spec_for((*lead, *self.factor_axes(name, in_axes, out_axes)), f.shape, name)
                   for name, f in self.factors.items()}
        return dataclasses.replace(self, base=base, factors=factors)


def low_rank_axes(name: str, in_axes: tuple, out_axes: tuple) -> tuple:
    """Axes of LoRA-shaped factors: ``a*`` ``(*in, r)`` keeps the weight's input axes, ``b*`` ``(r, *out)`` its
    output axes, the rank axis is :data:`RANK_AXIS` (replicated by default, as LoRA's).

    Example:
        >>> low_rank_axes("a1", ("embed",), ("heads", "head_dim")), low_rank_axes("b2", ("embed",), ("mlp",))
        (('embed', 'lora_rank'), ('lora_rank', 'mlp'))
    """
    return (*in_axes, RANK_AXIS) if name.startswith("a") else (RANK_AXIS, *out_axes)


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """PEFT's ``kaiming_uniform_(w, a=sqrt(5))`` for a factor of torch fan-in ``fan_in``: ``U(+-1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# ----------------------------------------------------------------------------- a kind of delta


class DeltaKind(NamedTuple):
    """What makes one weight-delta method.

    Attributes:
        name: the method's name (``"loha"``).
        title: its name in messages (``"LoHa"``).
        factor_shapes: ``(d_in, d_out, rank) -> {factor: shape}`` for one unstacked weight
            with input axes ``d_in`` and output axes ``d_out``.
        init: ``(key, {factor: shape with lead axes}, I, O, rank, dtype) -> {factor: array}``
            (``I``, ``O``: the flattened input and output sizes).
        wrapper: the :class:`DeltaWeight` subclass that runs the factors.
        label: ``rank -> str`` for result tables.
        options: method-wide settings the wrapper carries as static fields (``((name, value), ...)``).
        scale: ``(rank, alpha) -> s``; ``None``: ``alpha / rank`` (LoHa's, LoKr's). AdaLoRA's is
            ``alpha / (rank + 1e-5)``, PEFT's ``scaling / (ranknum + 1e-5)``.
    """

    name: str
    title: str
    factor_shapes: Callable[[tuple, tuple, int], Shapes]
    init: Callable[..., dict]
    wrapper: type
    label: Callable[[int], str]
    options: tuple = ()
    scale: Callable[[int, float], float] | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """One weight's rank and alpha; the scale is ``alpha / rank`` (Hugging Face PEFT's, for LoHa and LoKr)."""

    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


RULE_SETTINGS = ("rank", "alpha")


def check_settings(s: Settings, what: str) -> None:
    if not isinstance(s.rank, (int, np.integer)) or isinstance(s.rank, bool) or s.rank <= 0:
        raise SettingError("rank", s.rank, "must be a positive integer", what=what)
    if not (isinstance(s.alpha, (int, float, np.floating)) and math.isfinite(s.alpha) and s.alpha > 0):
        raise SettingError("alpha", s.alpha, "must be a finite number > 0", what=what)


def split_weight(kind: DeltaKind, path: str, shape: tuple[int, ...], layout: Layout):
    """``(lead, d_in, d_out)`` of a targeted weight, or a ValueError naming it when it is not a kernel."""
    if layout.kind != "kernel" or len(shape) < 2:
        raise ValueError(f"{kind.title} adapts kernels (linear layers) only, as Hugging Face PEFT does, but the target "
                         f"{path!r} of shape {shape} is a {layout.kind}; narrow the target rule to kernels "
                         "(e.g. '.*/(q|k|v|o)_proj/kernel')")
    return layout.split(shape)


def delta_method(kind: DeltaKind, rank: int, alpha: float, targets: tree.Targets, *, dtype=jnp.float32,
                 model: Any = None, **fields: Any) -> Method:
    """A :class:`jpeft.Method` for ``kind`` (see the module docstring); ``fields``: further
    :class:`Method` fields (AdaLoRA's ``training`` and ``settings``)."""
    defaults = Settings(rank, alpha)
    check_settings(defaults, kind.title)
    rules = tree.as_rules(targets)
    for rule in rules:
        unknown = set(rule.settings) - set(RULE_SETTINGS)
        if unknown:
            raise ValueError(f"{rule!r} has unknown {kind.title} setting(s) {sorted(unknown)}; "
                             f"valid: {list(RULE_SETTINGS)}")
        check_settings(dataclasses.replace(defaults, **rule.settings), f"{kind.title} ({rule!r})")

    def resolve(params) -> dict[str, Settings]:
        return {p: dataclasses.replace(defaults, **r.settings) for p, r in tree.assign(params, rules).items()}

    def expected(params) -> dict[str, tuple[Settings, Layout, Shapes]]:
        """Per targeted weight: its settings, layout and factor shapes (with lead axes)."""
        flat, layouts, out = tree.flatten(params), layouts_for(params, model=model), {}
        for path, s in sorted(resolve(params).items()):
            shape = tuple(flat[path].shape)
            lead, d_in, d_out = split_weight(kind, path, shape, layouts[path])
            shapes = {n: (*lead, *f) for n, f in kind.factor_shapes(d_in, d_out, s.rank).items()}
            out[path] = (s, layouts[path], shapes)
        return out

    def init_fn(key: jax.Array, params: Any) -> dict:
        adapter = {}
        for i, (path, (s, layout, shapes)) in enumerate(expected(params).items()):
            _, d_in, d_out = layout.split(tuple(tree.flatten(params)[path].shape))
            factors = kind.init(jax.random.fold_in(key, i), shapes, math.prod(d_in), math.prod(d_out), s.rank, dtype)
            adapter.update({f"{path}/{n}": v for n, v in factors.items()})
        return tree.unflatten(adapter)

    def factors_of(params, adapter) -> tuple[dict[str, dict], dict]:
        """The adapter's factors by weight path, checked against what ``params`` and the settings expect."""
        want = expected(params)
        factors: dict[str, dict] = {}
        for path, leaf in tree.flatten(adapter).items():
            weight_path, _, name = path.rpartition("/")
            factors.setdefault(weight_path, {})[name] = leaf
        missing, unexpected = sorted(set(want) - set(factors)), sorted(set(factors) - set(want))
        if missing or unexpected:
            raise ValueError(
                f"{kind.title} adapter does not fit these parameters: "
                + (f"adapter entries for weights that are not targeted here: {unexpected[:5]}; " if unexpected else "")
                + (f"targeted weights with no factors: {missing[:5]}; " if missing else "")
                + "was it made for another model, with other targets or by another method?")
        for path, (s, _, shapes) in want.items():
            have = {n: tuple(f.shape) for n, f in factors[path].items()}
            if have != shapes:
                raise ValueError(f"{kind.title} factors of {path!r} are {have}, but rank {s.rank} on a weight of "
                                 f"shape {tuple(tree.flatten(params)[path].shape)} makes {shapes}; the adapter was "
                                 "made for another model or with other settings")
        return factors, want

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        del rng  # no training-time randomness (PEFT's rank/module dropout are not implemented)
        factors, want = factors_of(params, adapter)
        flat, wrapped = tree.flatten(params), {}
        for path, (s, layout, _) in want.items():
            n_out = len(flat[path].shape) - layout.lead - layout.inputs
            scale = s.scale if kind.scale is None else kind.scale(s.rank, s.alpha)
            wrapped[path] = kind.wrapper(base=flat[path], factors=factors[path], rank=s.rank, scale=scale,
                                         inputs=layout.inputs, outputs=n_out, **dict(kind.options))
        return tree.replace(params, wrapped)

    def merge_fn(params: Any, adapter: Any) -> Any:
        applied = tree.flatten(apply_fn(params, adapter))
        return tree.replace(params, {p: w.materialize() for p, w in applied.items() if isinstance(w, DeltaWeight)})

    def merge_blocker(params: Any) -> str | None:
        flat = tree.flatten(params)
        wrapped = sorted(p for p in resolve(params) if ops.is_wrapper(flat[p]))
        if wrapped:
            return (f"merging would turn the {type(flat[wrapped[0]]).__name__} base of {wrapped[0]!r} (and "
                    f"{len(wrapped) - 1} more) into a float weight; run the adapter with apply instead")
        return None

    def logical_axes(adapter: Any, param_axes: Any) -> dict:
        weight_axes, known = flatten_axes(param_axes), (model.layouts() if model is not None else {})
        out = {}
        for path in tree.flatten(adapter):
            weight_path, _, name = path.rpartition("/")
            if weight_path not in weight_axes:
                raise ValueError(f"no logical axes for the weight {weight_path!r} of {kind.title} factor {path!r}; "
                                 "param_axes must cover every adapted weight")
            axes = weight_axes[weight_path]
            layout = known.get(weight_path) or layout_of(axes)
            cut = layout.lead + layout.inputs
            out[path] = (*axes[:layout.lead], *kind.wrapper.factor_axes(name, axes[layout.lead:cut], axes[cut:]))
        return tree.unflatten(out)

    return Method(kind.name, init_fn, apply_fn, merge_fn, logical_axes, merge_blocker=merge_blocker,
                  label=kind.label(rank), **fields)
