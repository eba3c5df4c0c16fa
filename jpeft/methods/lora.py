"""LoRA: low-rank updates ``W + s * A @ B`` of selected weights (Hu et al., 2021).

Roles come from the weights' logical axes (:mod:`jpeft.layout`; pass ``model=`` so
LoRA can ask the model): a kernel ``(*lead, *in, *out)`` trains ``A: (*lead, *in, r)``
and ``B: (*lead, r, *out)``, so an attention kernel ``(embed, heads, head_dim)`` gets
``A (embed, r)`` and ``B (r, heads, head_dim)``. Leading stack axes (scanned layers)
are batch axes: one independent pair per layer. Without a model, a weight
``(*lead, in, out)`` is taken as a kernel with one input and one output axis.

In training, :class:`LoraWeight` computes ``x @ W + s * ((dropout(x) @ A) @ B)``: the
full-size product ``A @ B`` and a gradient for ``W`` are never formed. ``B`` starts at
zero so a fresh adapter leaves the model unchanged. Embedding tables (``("vocab",
"embed")`` axes) get ``A: (vocab, r)`` at zero and ``B: (r, dim)`` normal, as Hugging
Face PEFT does. With tied embeddings the table is also the output head (``attend``):
by default the delta changes the input lookups only, as Hugging Face PEFT's default does
(its ``embed_tokens`` adapter wraps the embedding module, not the tied head);
``ensure_weight_tying=True`` (PEFT's option of the same name) applies it to the tied
head too, so input and output stay one matrix.

Scaling ``s`` is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora=True``
(Kalajdzievski, 2023).

Sharding: for a weight with logical axes ``(*lead, *in_axes, *out_axes)``, ``A`` gets
``(*lead, *in_axes, "lora_rank")`` and ``B`` ``(*lead, "lora_rank", *out_axes)``; the
rank axis is normally replicated (see :mod:`jpeft.sharding`).

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
    >>> method = jpeft.lora(rank=2, alpha=4, targets=r".*/kernel")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> adapter["dense"]["kernel"]["a"].shape, adapter["dense"]["kernel"]["b"].shape
    ((4, 2), (2, 3))
    >>> merged = method.merge(params, adapter)   # B == 0, so merged == params
    >>> bool((merged["dense"]["kernel"] == 1).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.errors import SettingError
from jpeft.layout import Layout, layouts_for
from jpeft.methods import lora_init, registry, rows
from jpeft.methods.dora import DoraWeight, init_magnitude
from jpeft.methods.base import Method, Rebase, Training, flatten_axes
from jpeft.methods.lora_weight import LoraWeight  # noqa: F401  (LoraWeight re-exported: jpeft.LoraWeight)
from jpeft.quant.array import is_quantized

RANK_AXIS = "lora_rank"
_SETTINGS = ("rank", "alpha", "dropout", "use_rslora", "init")
_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<K>", "olora")


@dataclasses.dataclass(frozen=True)
class _Settings:
    rank: int
    alpha: float
    dropout: float
    use_rslora: bool
    init: str

    @property
    def scale(self) -> float:
        denom = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.alpha / denom


def _check_settings(s: _Settings, where: str) -> None:
    if not isinstance(s.rank, (int, np.integer)) or isinstance(s.rank, bool) or s.rank <= 0:
        raise SettingError("rank", s.rank, "must be a positive integer", what=f"LoRA ({where})")
    if not s.alpha > 0:
        raise SettingError("alpha", s.alpha, "must be > 0", what=f"LoRA ({where})")
    if not 0.0 <= s.dropout < 1.0:
        raise SettingError("dropout", s.dropout, "must be in [0, 1)", what=f"LoRA ({where})")
    if not isinstance(s.init, str) or not (s.init in ("kaiming", "gaussian") or lora_init.changes_base(s.init)):
        raise SettingError("init", s.init, "must be one of " + ", ".join(map(repr, _INITS))
                           + " (K > 0: PiSSA's subspace iterations, e.g. pissa_niter_4)", what=f"LoRA ({where})")


def weight_layouts(params: Any, model: Any = None) -> dict[str, Layout]:
    """``{path: Layout}`` for every leaf: the model's (from logical axes) or the default for its shape."""
    return layouts_for(params, model=model)


def _factor_shapes(path: str, shape: tuple[int, ...], layout: Layout, rank: int):
    """``(a_shape, b_shape, is_table)`` for a weight, or a ValueError naming it."""
    if layout.kind == "vector" or len(shape) < 2:
        raise ValueError(f"LoRA needs a weight of at least 2 dims (a kernel or an embedding table), but the target "
                         f"{path!r} has shape {shape}; narrow the target rule to kernels (e.g. '.*/kernel')")
    lead, d_in, d_out = layout.split(shape)
    if rank > min(math.prod(d_in), math.prod(d_out)):
        raise ValueError(f"LoRA rank {rank} is larger than the weight {path!r} of shape {shape} allows "
                         f"(at most {min(math.prod(d_in), math.prod(d_out))}); lower the rank")
    return (*lead, *d_in, rank), (*lead, rank, *d_out), layout.kind == "table"


def lora(
    rank: int = 8,
    alpha: float = 16.0,
    targets: tree.Targets = r".*/(q|k|v|o)_proj/kernel",
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    use_dora: bool = False,
    ensure_weight_tying: bool = False,
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """Builds a LoRA method (or DoRA with ``use_dora=True``).

    Args:
        rank: rank ``r`` of the update (a :class:`jpeft.Rule` may override it).
        alpha: scaling numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)``).
        targets: which weights to adapt: regex(es) fullmatched against
            ``/``-joined paths, predicates, or :class:`jpeft.Rule` objects with
            per-rule ``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``init``.
        dropout: dropout rate on the LoRA input path (active when ``apply`` gets ``rng``).
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (A ~ U(-1/sqrt(in), 1/sqrt(in)), as PEFT), ``"gaussian"``
            (A ~ N(0, 1/r), as PEFT's "gaussian"), or one that takes the factors out of the
            weight (:mod:`jpeft.methods.lora_init`): ``"pissa"``, ``"pissa_niter_K"``,
            ``"olora"``. With those the frozen base changes too: train against
            ``method.training.rebase.base(params, adapter)`` (the fresh adapter's residual base;
            :func:`jpeft.lifecycle.start` does it).
        use_dora: DoRA (:mod:`jpeft.methods.dora`): a trainable magnitude per output
            feature besides ``A`` and ``B``; kernels only.
        ensure_weight_tying: an adapted embedding table that is also the (tied) output
            head changes the head too (default: the input lookups only, as PEFT's default).
        dtype: dtype of the trainable factors.
        model: the :class:`jpeft.models.Model` whose parameters are adapted: each weight's
            role (kernel axes, embedding table) comes from its logical axes.

    Returns:
        A :class:`jpeft.Method`. The adapter mirrors the targeted paths with
        ``{"a": A, "b": B}`` at each (and ``"m"``, the magnitude ``(*lead, *out)``, with DoRA).
    """
    defaults = _Settings(rank, alpha, dropout, use_rslora, init)
    _check_settings(defaults, "method defaults")
    if not isinstance(use_dora, bool):
        raise SettingError("use_dora", use_dora, "must be true or false", what="LoRA")
    rules = tree.as_rules(targets)
    for rule in rules:
        unknown = set(rule.settings) - set(_SETTINGS)
        if unknown:
            raise ValueError(f"{rule!r} has unknown LoRA setting(s) {sorted(unknown)}; "
                             f"valid: {list(_SETTINGS)}")
        _check_settings(dataclasses.replace(defaults, **rule.settings), repr(rule))
    leaves = ("a", "b", "m") if use_dora else ("a", "b")

    def resolve(params) -> dict[str, _Settings]:
        return {path: dataclasses.replace(defaults, **rule.settings) for path, rule in tree.assign(params, rules).items()}

    def init_fn(key: jax.Array, params: Any) -> dict:
        flat, layouts = tree.flatten(params), weight_layouts(params, model)
        adapter = {}
        for i, (path, s) in enumerate(sorted(resolve(params).items())):
            layout = layouts[path]
            a_shape, b_shape, is_table = _factor_shapes(path, tuple(flat[path].shape), layout, s.rank)
            key_a, key_b = jax.random.split(jax.random.fold_in(key, i))
            if is_table and (use_dora or lora_init.changes_base(s.init)):
                fix = ("leave it out of the targets (DoRA applies to every target of the method)" if use_dora else
                       "leave it out of the targets, or give it a Rule with init='kaiming'")
                raise ValueError(f"{path!r} is an embedding table; {'DoRA' if use_dora else f'init={s.init!r}'} "
                                 f"adapts kernels only: {fix}")
            if lora_init.changes_base(s.init):
                a, b = _base_factors(path, flat[path], s, layout, key_a, dtype)
            elif is_table:
                a, b = jnp.zeros(a_shape, dtype), jax.random.normal(key_b, b_shape, dtype)
            elif s.init == "kaiming":
                fan_in = math.prod(a_shape[len(a_shape) - 1 - layout.inputs:-1])
                bound = 1.0 / math.sqrt(fan_in)
                a, b = jax.random.uniform(key_a, a_shape, dtype, -bound, bound), jnp.zeros(b_shape, dtype)
            else:
                a, b = jax.random.normal(key_a, a_shape, dtype) / s.rank, jnp.zeros(b_shape, dtype)
            adapter[path + "/a"], adapter[path + "/b"] = a, b
            if use_dora:  # the norm of the weight the fresh adapter runs (PiSSA's: W_res + s A B = W)
                adapter[path + "/m"] = init_magnitude(flat[path], layout.lead, layout.inputs, a, b, s.scale, dtype)
        return tree.unflatten(adapter)

    def _factors(params, adapter) -> tuple[dict, dict[str, _Settings]]:
        """Adapter factors by weight path, checked against the parameters."""
        flat_params = tree.flatten(params)
        factors: dict[str, dict[str, Any]] = {}
        for path, leaf in tree.flatten(adapter).items():
            weight_path, _, name = path.rpartition("/")
            if name not in leaves:
                raise ValueError(f"adapter leaf {path!r} is not a {'DoRA' if use_dora else 'LoRA'} factor (expected "
                                 f"{' or '.join('.../' + n for n in leaves)}); was this adapter made by another method"
                                 f"{' (plain LoRA? build it with use_dora=False)' if name == 'm' else ''}?")
            factors.setdefault(weight_path, {})[name] = leaf
        settings = resolve(params)
        missing = sorted(set(settings) - set(factors))
        unexpected = sorted(set(factors) - set(flat_params))
        if unexpected or missing:
            raise ValueError(
                "LoRA adapter does not fit these parameters: "
                + (f"adapter weights not in the model: {unexpected[:5]}; " if unexpected else "")
                + (f"targeted weights with no adapter factors: {missing[:5]}; " if missing else "")
                + "was it made for another model or with other targets?")
        layouts = weight_layouts(params, model)
        for path, ab in factors.items():
            lacking = [n for n in leaves if ab.get(n) is None]
            if lacking:
                raise ValueError(f"{'DoRA' if use_dora else 'LoRA'} adapter for {path!r} lacks {lacking[0]!r}"
                                 + (" (the magnitude: was it saved by plain LoRA?)" if lacking[0] == "m" else ""))
            a, b = ab["a"], ab["b"]
            shape, r = tuple(flat_params[path].shape), a.shape[-1] if a.ndim else 0
            want = _factor_shapes(path, shape, layouts[path], r)[:2] if r else None
            if (tuple(a.shape), tuple(b.shape)) != want:
                raise ValueError(f"LoRA factors for {path!r} have shapes a={tuple(a.shape)}, b={tuple(b.shape)} "
                                 f"but the weight has shape {shape}; the adapter was made for another model")
            if use_dora:
                lead, d_in, d_out = layouts[path].split(shape)
                if tuple(ab["m"].shape) != (*lead, *d_out):
                    raise ValueError(f"DoRA magnitude for {path!r} has shape {tuple(ab['m'].shape)}, the weight's "
                                     f"output features {(*lead, *d_out)}; the adapter was made for another model")
            if path in settings and r != settings[path].rank:
                settings[path] = dataclasses.replace(settings[path], rank=r)  # the factors decide the rank
        return factors, settings

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        factors, settings = _factors(params, adapter)
        flat, wrapped = tree.flatten(params), {}
        layouts = weight_layouts(params, model) if rng is not None else {}
        for i, path in enumerate(sorted(factors)):
            s, key = settings[path], None
            if rng is not None and s.dropout > 0:  # one key per stacked weight, so scan slices them
                key = jax.random.fold_in(rng, i)
                lead_shape = tuple(flat[path].shape)[:layouts[path].lead]
                if lead_shape:
                    key = jax.random.split(key, math.prod(lead_shape)).reshape(lead_shape)
            wrapped[path] = LoraWeight(base=flat[path], a=factors[path]["a"], b=factors[path]["b"],
                                       dropout_key=key, scale=s.scale, dropout_rate=s.dropout,
                                       tie_output=ensure_weight_tying)
            if use_dora:
                wrapped[path] = DoraWeight(wrapped[path], factors[path]["m"])
        return tree.replace(params, wrapped)

    def merge_fn(params: Any, adapter: Any) -> Any:
        factors, _ = _factors(params, adapter)
        applied = tree.flatten(apply_fn(params, adapter))
        return tree.replace(params, {p: applied[p].materialize() for p in factors})

    def merge_blocker(params: Any) -> str | None:
        flat = tree.flatten(params)
        resolved = resolve(params)
        wrapped = sorted(p for p in resolved if ops.is_wrapper(flat[p]))
        if wrapped:
            return (f"merging would turn the {type(flat[wrapped[0]]).__name__} base of {wrapped[0]!r} (and "
                    f"{len(wrapped) - 1} more) into a float weight; run the adapter with apply instead")
        tied = set(model.tied_tables) if model is not None else set()
        tables = [p for p in resolved if p in tied]
        if tables and not ensure_weight_tying:
            return (f"{tables[0]!r} is adapted for its lookups only; merging it would change the tied output head "
                    "too: run the adapter with apply (or build it with ensure_weight_tying=True)")
        return None

    def rebase_fn(params: Any, adapter: Any) -> Any:
        """The frozen base that goes with the *fresh* ``adapter``: ``W - s * A @ B`` where the init took them."""
        factors, settings = _factors(params, adapter)
        flat = tree.flatten(params)
        return tree.replace(params, {
            path: lora_init.residual(flat[path], factors[path]["a"], factors[path]["b"], s.scale)
            for path, s in settings.items() if lora_init.changes_base(s.init)})

    rebases = lora_init.changes_base(init) or any(lora_init.changes_base(r.settings.get("init", "")) for r in rules)
    name = "dora" if use_dora else "lora"
    label = f"{name} r={rank}" + (" rslora" if use_rslora else "") + (f" {init}" if lora_init.changes_base(init) else "")
    method = Method(name, init_fn, apply_fn, merge_fn, logical_axes, merge_blocker=merge_blocker, label=label)
    if not rebases:
        return method

    def over_original(params: Any, trained: Any, fresh: Any) -> tuple[Method, Any]:
        return as_plain_lora(method, params, trained, fresh, model=model)

    return method._replace(training=Training(rebase=Rebase(rebase_fn, over_original)))


def _base_factors(path: str, weight, s: _Settings, layout: Layout, key, dtype):
    """PiSSA / OLoRA factors of ``weight`` (shapes only for an abstract one).

    A 4-bit (or int8) base gives its factors from its dequantized values, as PEFT's PiSSA on a
    bitsandbytes layer does; :func:`lora_init.residual` then quantizes the residual again.
    """
    if is_quantized(weight):
        weight = (jax.ShapeDtypeStruct(weight.shape, weight.dtype)
                  if isinstance(weight.codes, jax.ShapeDtypeStruct) else weight.materialize())
    elif ops.is_wrapper(weight):
        raise ValueError(f"init={s.init!r} reads the float weight of {path!r}, which is a "
                         f"{type(weight).__name__}: give it a plain or quantized weight")
    make = lambda w, k: lora_init.factors(w, s.init, rank=s.rank, scale=s.scale, lead=layout.lead,  # noqa: E731
                                          inputs=layout.inputs, key=k)
    if isinstance(weight, jax.ShapeDtypeStruct):
        a, b = jax.eval_shape(make, weight, key)
        return jax.ShapeDtypeStruct(a.shape, dtype), jax.ShapeDtypeStruct(b.shape, dtype)
    a, b = make(weight, key)
    return a.astype(dtype), b.astype(dtype)


def dora(
    rank: int = 8,
    alpha: float = 16.0,
    targets: tree.Targets = r".*/(q|k|v|o)_proj/kernel",
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """DoRA: ``jpeft.lora(..., use_dora=True)``, registered under its own name (see :mod:`jpeft.methods.dora`).

    Example:
        >>> import jax, jax.numpy as jnp, jpeft
        >>> method = jpeft.dora(rank=2, targets=r".*")
        >>> sorted(method.init(jax.random.key(0), {"w": jnp.ones((4, 3))})["w"])
        ['a', 'b', 'm']
    """
    return lora(rank, alpha, targets, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=True,
                dtype=dtype, model=model)


def logical_axes(adapter: Any, param_axes: Any) -> dict:
    """Logical axes of LoRA factors from their weights' axes (the rank axis is ``"lora_rank"``).

    The factor shapes say where the weight's input axes end: ``a`` keeps the weight's
    leading and input axes, ``b`` its leading and output axes.

    Example:
        >>> import jax.numpy as jnp
        >>> adapter = {"q": {"kernel": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 4, 3))}}}
        >>> logical_axes(adapter, {"q": {"kernel": ("embed", "heads", "head_dim")}})["q"]["kernel"]
        {'a': ('embed', 'lora_rank'), 'b': ('lora_rank', 'heads', 'head_dim')}
    """
    weight_axes = flatten_axes(param_axes)
    flat = tree.flatten(adapter)
    out = {}
    for path, leaf in flat.items():
        weight_path, _, name = path.rpartition("/")
        if name not in ("a", "b", "m"):
            raise ValueError(f"adapter leaf {path!r} is not a LoRA factor (expected .../a, .../b or DoRA's .../m)")
        if weight_path not in weight_axes:
            raise ValueError(f"no logical axes for the weight {weight_path!r} of LoRA factor {path!r}; "
                             f"param_axes must cover every adapted weight")
        axes = weight_axes[weight_path]
        a_ndim, b_ndim = flat[weight_path + "/a"].ndim, flat[weight_path + "/b"].ndim
        lead = a_ndim + b_ndim - len(axes) - 2
        cut = a_ndim - 1  # leading + input axes
        if lead < 0 or cut > len(axes):
            raise ValueError(f"LoRA factors of {weight_path!r} do not fit its logical axes {axes}")
        if name == "m":  # DoRA's magnitude: the weight's leading and output axes
            out[path] = (*axes[:lead], *axes[cut:])
        else:
            out[path] = (*axes[:cut], RANK_AXIS) if name == "a" else (*axes[:lead], RANK_AXIS, *axes[cut:])
    return tree.unflatten(out)


# ----------------------------------------------------------------------------- PiSSA / OLoRA as plain LoRA


def as_plain_lora(method, params, adapter, initial, *, model=None):
    """A trained PiSSA / OLoRA adapter as a plain LoRA adapter for the *original* weights: ``(method, adapter)``.

    With ``W = W_res + s A0 B0`` (the fresh adapter ``initial``) and ``W_res + s A B`` after
    training, the update to ``W`` is ``s (A B - A0 B0) = s [A, A0] [B; -B0]``: rank ``2r``,
    the same scale (PEFT's ``path_initial_model_for_weight_conversion``, whose config has
    ``r`` and ``lora_alpha`` doubled). Weights whose fresh ``B`` was zero (a plain init
    under another rule) keep their factors. ``params`` are either the original or the
    rebased parameters (only shapes are read). The result runs with ``apply`` / ``merge``
    on the original parameters and is written by :func:`jpeft.io.peft.save_peft`.
    """
    applied, fresh = tree.flatten(method.apply(params, adapter)), tree.flatten(method.apply(params, initial))
    rules, out, ranks, tie = [], {}, [], False
    for path in sorted(p for p, w in applied.items() if _adapted(w)):
        w, w0 = applied[path], fresh[path]
        if not isinstance(w, LoraWeight):
            raise ValueError(f"{path!r} is a {type(w).__name__}: only plain LoRA updates (no DoRA magnitude) have a "
                             "plain LoRA form")
        a, b = w.a, w.b
        if np.any(np.asarray(w0.b) != 0):
            a = jnp.concatenate([w.a, w0.a.astype(w.a.dtype)], axis=-1)
            b = jnp.concatenate([w.b, -w0.b.astype(w.b.dtype)], axis=w.lead)
        rank = int(a.shape[-1])
        rules.append(_rule(path, rank, w.scale * rank))
        out[path + "/a"], out[path + "/b"] = a, b
        ranks.append(rank)
        tie = tie or w.tie_output
    if not rules:
        raise ValueError("the adapter adapts no weight")
    rank = max(set(ranks), key=ranks.count)
    plain = lora(rank=rank, alpha=rules[0].settings["alpha"], targets=rules, model=model, ensure_weight_tying=tie)
    return plain, tree.unflatten(out)


def _adapted(leaf) -> bool:
    """A LoRA (or DoRA) update that ``apply`` put in place of a weight."""
    return isinstance(leaf, (LoraWeight, DoraWeight))


def _rule(path: str, rank: int, alpha: float):
    return tree.Rule(re.escape(path), rank=rank, alpha=float(alpha))


# ----------------------------------------------------------------------------- many adapters in one batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraRows(ops.OverBase):
    """A weight with a different LoRA update in every batch row (:class:`jpeft.MixedAdapters`).

    ``a (*lead, *in, S, R)``, ``b (*lead, S, R, *out)``: ``S`` slots of factors zero-padded
    to one rank ``R`` (the padded columns of ``A`` and rows of ``B`` add exactly nothing);
    ``scale (*lead, S)``; ``rows (*lead, B)``: a slot per batch row, ``-1`` for none;
    ``head_scale``: the scale on a tied output head (zero for slots that adapt an
    embedding's lookups only). The first axis of an op's input is the batch row; ``base``
    may be a wrapper (a 4-bit weight stays 4-bit: its matmul is shared by all rows).

    Row ``b`` computes ``x @ W + s[rows[b]] * (x @ A[rows[b]]) @ B[rows[b]]``, one of two ways
    (``strategy``; both exact):

    * ``"gather"`` (``"auto"`` with more than one slot): each row's own factors gathered,
      then a batched matmul: ``R`` columns of work per row, whatever the number of slots.
    * ``"dense"`` (``"auto"`` with one slot): ``x`` times every slot's ``A`` at once (``A``
      is laid out ``(in, S * R)`` for that: one plain matmul), each row's columns of other
      slots zeroed, then one matmul with every ``B`` ``(S * R, out)``: no gather, but
      ``S * R`` columns of work per row. On a 2-core CPU at SmolLM2 shapes (8 rows, 8
      slots) it decoded slower than gathering (``benchmarks/multi_adapter.py``); it may
      pay where gathers are slow and matmuls cheap.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scale: jax.Array
    head_scale: jax.Array
    rows: jax.Array
    tie_output: bool = dataclasses.field(default=False, metadata=dict(static=True))
    strategy: str = dataclasses.field(default="auto", metadata=dict(static=True))

    @property
    def lead(self) -> int:
        return self.a.ndim + self.b.ndim - len(self.shape) - 4

    def _dense(self, batch: int) -> bool:
        rows.check_rows(self.rows, batch, self.lead, "LoRA weight")
        return self.strategy == "dense" or (self.strategy == "auto" and self.a.shape[-2] == 1)

    def _flat(self, dtype) -> tuple[jax.Array, jax.Array]:
        """``a (*in, S * R)`` and ``b (S * R, *out)``: every slot's factors as one (free reshapes)."""
        a = self.a.reshape(*self.a.shape[:-2], -1).astype(dtype)
        return a, self.b.reshape(-1, *self.b.shape[2:]).astype(dtype)

    def _own_slots(self, h: jax.Array, scale: jax.Array) -> jax.Array:
        """``h (B, ..., S * R)`` with each row's columns of other slots zeroed and its own scaled."""
        slots, r = self.a.shape[-2:]
        own_BxS = self.rows[:, None] == jnp.arange(slots)[None, :]  # a base row (-1) owns none
        w = jnp.where(own_BxS, scale[None, :], 0).astype(h.dtype)
        w = w.reshape(w.shape[0], *(1,) * (h.ndim - 2), slots, 1)
        return (h.reshape(*h.shape[:-1], slots, r) * w).reshape(h.shape)

    def _gathered(self, dtype, scale: jax.Array):
        """Each row's ``a (*in, B, R)``, ``b (B, R, *out)`` and scale ``(B,)`` (zero for base rows)."""
        idx, valid = rows.rows_and_valid(self.rows)
        a = jnp.take(self.a, idx, axis=self.a.ndim - 2).astype(dtype)
        b = jnp.take(self.b, idx, axis=0).astype(dtype)
        return a, b, jnp.where(valid, jnp.take(scale, idx), 0).astype(dtype)

    def linear(self, x: jax.Array) -> jax.Array:
        y = ops.linear(x, self.base)
        if self._dense(x.shape[0]):
            a, b = self._flat(x.dtype)
            return y + self._own_slots(x @ a, self.scale) @ b
        a, b, s = self._gathered(x.dtype, self.scale)
        h = jnp.einsum("b...i,ibr->b...r", x, a)
        return y + rows.per_row(s, y.ndim) * jnp.einsum("b...r,bro->b...o", h, b)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        y = ops.einsum(subscripts, x, self.base)
        x_sub, w_in, w_out, out = ops.split_subscripts(subscripts, self.a.ndim - 2)
        row = x_sub[0]
        if row in w_in or row not in out:
            raise ValueError(f"einsum {subscripts!r}: a per-row weight needs the input's first axis (the batch row) "
                             "kept in the output")
        r = ops.free_letter(subscripts)
        kept = "".join(c for c in x_sub if c not in w_in)
        if self._dense(x.shape[0]):
            a, b = self._flat(x.dtype)  # r: the S * R columns of every slot
            h = self._own_slots(jnp.einsum(f"{x_sub},{w_in}{r}->{kept}{r}", x, a), self.scale)
            return y + jnp.einsum(f"{kept}{r},{r}{w_out}->{out}", h, b)
        a, b, s = self._gathered(x.dtype, self.scale)
        h = jnp.einsum(f"{x_sub},{w_in}{row}{r}->{kept}{r}", x, a)
        return y + rows.per_row(s, y.ndim) * jnp.einsum(f"{kept}{r},{row}{r}{w_out}->{out}", h, b)

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        out = ops.embed(ids, self.base, dtype)
        rows.check_rows(self.rows, ids.shape[0], self.lead, "LoRA table")
        idx, valid = rows.rows_and_valid(self.rows)
        a_rows = self.a[ids, idx.reshape(-1, *(1,) * (ids.ndim - 1))].astype(dtype)  # (B, ..., R): looked-up rows
        b = jnp.take(self.b, idx, axis=0).astype(dtype)
        s = jnp.where(valid, jnp.take(self.scale, idx), 0).astype(dtype)
        return out + rows.per_row(s, out.ndim) * jnp.einsum("b...r,brd->b...d", a_rows, b)

    def attend(self, x: jax.Array) -> jax.Array:
        y = ops.attend(x, self.base)
        if not self.tie_output:
            return y
        # x @ (W + s A B).T  =  x @ W.T + s (x @ B.T) @ A.T, per row
        if self._dense(x.shape[0]):
            a, b = self._flat(x.dtype)  # a (vocab, S * R), b (S * R, dim)
            return y + self._own_slots(x @ b.T, self.head_scale) @ a.T
        a, b, s = self._gathered(x.dtype, self.head_scale)
        h = jnp.einsum("b...d,brd->b...r", x, b)
        return y + rows.per_row(s, y.ndim) * jnp.einsum("b...r,vbr->b...v", h, a)

    materialize = rows.no_single_array


class _RowsPlan(NamedTuple):
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    rank: int
    tie: bool
    dtype: str
    strategy: str


def _rows_plan(leaves: list[LoraWeight], lead: int, limits: dict) -> _RowsPlan:
    shapes = {(tuple(x.a.shape[lead:-1]), tuple(x.b.shape[lead + 1:])) for x in leaves}
    if len(shapes) != 1:
        raise ValueError(f"LoRA factors of one weight have different input/output shapes {sorted(shapes)}")
    rank = max(int(x.a.shape[-1]) for x in leaves)
    max_rank = limits.get("max_rank")
    if max_rank is not None:
        if rank > max_rank:
            raise ValueError(f"an adapter has rank {rank}, more than max_rank={max_rank}; raise max_rank")
        rank = max_rank
    strategy = limits.get("strategy") or "auto"  # MixedAdapters checked it
    (inputs, outputs), = shapes
    dtype = jnp.result_type(*[x.a.dtype for x in leaves], *[x.b.dtype for x in leaves])
    return _RowsPlan(inputs, outputs, rank, any(x.tie_output for x in leaves), jnp.dtype(dtype).name, strategy)


def _rows_stack(plan: _RowsPlan, leaves: list[LoraWeight | None], lead_shape: tuple[int, ...]) -> dict:
    """The slots' factors, zero-padded to the plan's rank (host arrays: stacking compiles nothing)."""
    lead, big, dtype = len(lead_shape), plan.rank, jnp.dtype(plan.dtype)
    a_list, b_list, scales, head_scales = [], [], [], []
    for x in leaves:
        if x is None:
            a_list.append(np.zeros((*lead_shape, *plan.inputs, big), dtype))
            b_list.append(np.zeros((*lead_shape, big, *plan.outputs), dtype))
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
        pad_a = [(0, 0)] * (x.a.ndim - 1) + [(0, big - r)]                          # extra columns of A: zeros
        pad_b = [(0, 0)] * lead + [(0, big - r)] + [(0, 0)] * (x.b.ndim - lead - 1)  # extra rows of B: zeros
        a_list.append(np.pad(np.asarray(x.a, dtype), pad_a))
        b_list.append(np.pad(np.asarray(x.b, dtype), pad_b))
        scales.append(float(x.scale))
        head_scales.append(float(x.scale) if x.tie_output else 0.0)
    per_slot = lambda v: np.broadcast_to(np.asarray(v, np.float32), (*lead_shape, len(v)))
    return {"a": np.stack(a_list, axis=-2), "b": np.stack(b_list, axis=lead),  # a (*lead, *in, S, R)
            "scale": per_slot(scales), "head_scale": per_slot(head_scales)}


def _rows_slot_axes(plan: _RowsPlan, lead: int) -> dict[str, int]:
    return {"a": lead + len(plan.inputs), "b": lead, "scale": lead, "head_scale": lead}


def _rows_run(base, state: dict, plan: _RowsPlan, rows_: jax.Array) -> LoraRows:
    return LoraRows(base, state["a"], state["b"], state["scale"], state["head_scale"], rows_, tie_output=plan.tie,
                    strategy=plan.strategy)


rows.register(LoraWeight, rows.RowKind("lora", _rows_plan, _rows_stack, _rows_run, _rows_slot_axes))


registry.register("lora", lora)
registry.register("dora", dora)
