"""LoRA: low-rank updates ``W + s * A @ B`` of selected weights (Hu et al., 2021).

For a kernel ``W`` of shape ``(..., in, out)`` LoRA trains ``A: (..., in, r)`` and
``B: (..., r, out)`` (leading axes, e.g. stacked layers, are batch axes). In training,
:class:`LoraWeight` computes ``x @ W + s * ((dropout(x) @ A) @ B)``: the full-size
product ``A @ B`` and a gradient for ``W`` are never formed. ``B`` starts at zero so a
fresh adapter leaves the model unchanged.

Embedding tables (paths ending in ``embedding``, shape ``(vocab, dim)``) get
``A: (vocab, r)`` (zeros) and ``B: (r, dim)`` (normal), as Hugging Face PEFT does.

Scaling ``s`` is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora=True``
(Kalajdzievski, 2023).

Sharding: the factors live where their weight lives. For a weight with logical axes
``(*lead, in_axis, out_axis)``, ``A`` gets ``(*lead, in_axis, "lora_rank")`` and ``B``
``(*lead, "lora_rank", out_axis)``; the rank axis is normally replicated
(see :mod:`jpeft.sharding`).

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.methods.base import Method, flatten_axes

RANK_AXIS = "lora_rank"
_SETTINGS = ("rank", "alpha", "dropout", "use_rslora", "init")
_INITS = ("kaiming", "gaussian")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight(ops.WeightWrapper):
    """A weight plus its low-rank update, used by :mod:`jpeft.ops` without merging.

    ``base`` may itself be a wrapper (e.g. a quantized weight: that is QLoRA).
    """

    base: Any
    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    dropout_rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    is_embedding: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def _dropout(self, x: jax.Array) -> jax.Array:
        if self.dropout_key is None or self.dropout_rate == 0.0:
            return x
        keep = 1.0 - self.dropout_rate
        mask = jax.random.bernoulli(self.dropout_key, keep, x.shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)

    def linear(self, x: jax.Array) -> jax.Array:
        y = ops.linear(x, self.base)
        h_r = self._dropout(x) @ self.a.astype(x.dtype)
        return y + self.scale * (h_r @ self.b.astype(x.dtype))

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        rows = ops.embed(ids, self.base, dtype)
        delta = jnp.take(self.a, ids, axis=0).astype(dtype) @ self.b.astype(dtype)
        return rows + self.scale * delta

    def attend(self, x: jax.Array) -> jax.Array:
        # x @ (W + s A B).T  =  x @ W.T + s (x @ B.T) @ A.T
        y = ops.attend(x, self.base)
        return y + self.scale * ((x @ self.b.astype(x.dtype).T) @ self.a.astype(x.dtype).T)

    def materialize(self, dtype=None) -> jax.Array:
        base = ops.as_array(self.base, jnp.float32)
        delta = jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        out_dtype = dtype or self.base.dtype  # wrappers report the dtype they stand for
        return (base + self.scale * delta).astype(out_dtype)


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
        raise ValueError(f"LoRA rank must be a positive integer, got rank={s.rank!r} ({where})")
    if not s.alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got alpha={s.alpha!r} ({where})")
    if not 0.0 <= s.dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={s.dropout!r} ({where})")
    if s.init not in _INITS:
        raise ValueError(f"LoRA init must be one of {_INITS}, got init={s.init!r} ({where})")


def _is_embedding(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "embedding"


def _in_out(path: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """Splits a weight shape into (leading batch dims, in, out)."""
    if len(shape) < 2:
        raise ValueError(
            f"LoRA needs a weight of at least 2 dims (in, out), but the target {path!r} has "
            f"shape {shape}; narrow the target rule to kernels (e.g. '.*/kernel')"
        )
    return tuple(shape[:-2]), shape[-2], shape[-1]


def lora(
    rank: int = 8,
    alpha: float = 16.0,
    targets: tree.Targets = r".*/(q|k|v|o)_proj/kernel",
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    dtype=jnp.float32,
) -> Method:
    """Builds a LoRA method.

    Args:
        rank: rank ``r`` of the update (a :class:`jpeft.Rule` may override it).
        alpha: scaling numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)``).
        targets: which weights to adapt: regex(es) fullmatched against
            ``/``-joined paths, predicates, or :class:`jpeft.Rule` objects with
            per-rule ``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``init``.
        dropout: dropout rate on the LoRA input path (active when ``apply`` gets ``rng``).
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (A ~ U(-1/sqrt(in), 1/sqrt(in)), as PEFT) or
            ``"gaussian"`` (A ~ N(0, 1/r), as PEFT's "gaussian").
        dtype: dtype of the trainable factors.

    Returns:
        A :class:`jpeft.Method`. The adapter mirrors the targeted paths with
        ``{"a": A, "b": B}`` at each.
    """
    defaults = _Settings(rank, alpha, dropout, use_rslora, init)
    _check_settings(defaults, "method defaults")
    rules = tree.as_rules(targets)
    for rule in rules:
        unknown = set(rule.settings) - set(_SETTINGS)
        if unknown:
            raise ValueError(f"{rule!r} has unknown LoRA setting(s) {sorted(unknown)}; "
                             f"valid: {list(_SETTINGS)}")
        _check_settings(dataclasses.replace(defaults, **rule.settings), repr(rule))

    def settings_for(rule: tree.Rule) -> _Settings:
        return dataclasses.replace(defaults, **rule.settings)

    def resolve(params) -> dict[str, _Settings]:
        return {path: settings_for(rule) for path, rule in tree.assign(params, rules).items()}

    def init_fn(key: jax.Array, params: Any) -> dict:
        flat = tree.flatten(params)
        adapter = {}
        for i, (path, s) in enumerate(sorted(resolve(params).items())):
            lead, d_in, d_out = _in_out(path, tuple(flat[path].shape))
            if s.rank > min(d_in, d_out):
                raise ValueError(
                    f"LoRA rank {s.rank} is larger than the weight {path!r} of shape "
                    f"{tuple(flat[path].shape)} allows (at most {min(d_in, d_out)}); lower the rank"
                )
            key_a, key_b = jax.random.split(jax.random.fold_in(key, i))
            a_shape, b_shape = (*lead, d_in, s.rank), (*lead, s.rank, d_out)
            if _is_embedding(path):
                a = jnp.zeros(a_shape, dtype)
                b = jax.random.normal(key_b, b_shape, dtype)
            elif s.init == "kaiming":
                bound = 1.0 / math.sqrt(d_in)
                a = jax.random.uniform(key_a, a_shape, dtype, -bound, bound)
                b = jnp.zeros(b_shape, dtype)
            else:
                a = jax.random.normal(key_a, a_shape, dtype) / s.rank
                b = jnp.zeros(b_shape, dtype)
            adapter[path + "/a"], adapter[path + "/b"] = a, b
        return tree.unflatten(adapter)

    def _factors(params, adapter) -> tuple[dict, dict[str, _Settings]]:
        """Adapter factors by weight path, checked against the parameters."""
        flat_params = tree.flatten(params)
        factors: dict[str, dict[str, Any]] = {}
        for path, leaf in tree.flatten(adapter).items():
            weight_path, _, name = path.rpartition("/")
            if name not in ("a", "b"):
                raise ValueError(f"adapter leaf {path!r} is not a LoRA factor (expected .../a or .../b); "
                                 f"was this adapter made by another method?")
            factors.setdefault(weight_path, {})[name] = leaf
        settings = resolve(params)
        missing = sorted(set(settings) - set(factors))
        unexpected = sorted(set(factors) - set(flat_params))
        if unexpected or missing:
            raise ValueError(
                "LoRA adapter does not fit these parameters: "
                + (f"adapter weights not in the model: {unexpected[:5]}; " if unexpected else "")
                + (f"targeted weights with no adapter factors: {missing[:5]}; " if missing else "")
                + "was it made for another model or with other targets?"
            )
        for path, ab in factors.items():
            shape = tuple(flat_params[path].shape)
            lead, d_in, d_out = _in_out(path, shape)
            a, b = ab.get("a"), ab.get("b")
            if a is None or b is None:
                raise ValueError(f"LoRA adapter for {path!r} lacks factor {'a' if a is None else 'b'}")
            r = a.shape[-1]
            if tuple(a.shape) != (*lead, d_in, r) or tuple(b.shape) != (*lead, r, d_out):
                raise ValueError(
                    f"LoRA factors for {path!r} have shapes a={tuple(a.shape)}, b={tuple(b.shape)} "
                    f"but the weight has shape {shape}; the adapter was made for another model"
                )
            if r != settings[path].rank:
                # The factors decide the rank; keep alpha from the rule.
                settings[path] = dataclasses.replace(settings[path], rank=r)
        return factors, settings

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> dict:
        factors, settings = _factors(params, adapter)
        flat = tree.flatten(params)
        for i, path in enumerate(sorted(factors)):
            s = settings[path]
            key = None
            if rng is not None and s.dropout > 0:
                lead = tuple(factors[path]["a"].shape[:-2])
                key = jax.random.fold_in(rng, i)
                if lead:
                    key = jax.random.split(key, math.prod(lead)).reshape(lead)
            flat[path] = LoraWeight(
                base=flat[path], a=factors[path]["a"], b=factors[path]["b"], dropout_key=key,
                scale=s.scale, dropout_rate=s.dropout, is_embedding=_is_embedding(path),
            )
        return tree.unflatten(flat)

    def merge_fn(params: Any, adapter: Any) -> dict:
        applied = tree.flatten(apply_fn(params, adapter))
        return tree.unflatten({
            p: (v.materialize() if isinstance(v, LoraWeight) else v) for p, v in applied.items()
        })

    return Method("lora", init_fn, apply_fn, merge_fn, logical_axes)


def logical_axes(adapter: Any, param_axes: Any) -> dict:
    """Logical axes of LoRA factors from their weights' axes (the rank axis is ``"lora_rank"``).

    Example:
        >>> import jax.numpy as jnp
        >>> adapter = {"q_proj": {"kernel": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 4))}}}
        >>> logical_axes(adapter, {"q_proj": {"kernel": ("embed", "q_heads")}})["q_proj"]["kernel"]
        {'a': ('embed', 'lora_rank'), 'b': ('lora_rank', 'q_heads')}
    """
    weight_axes = flatten_axes(param_axes)
    out = {}
    for path in tree.flatten(adapter):
        weight_path, _, name = path.rpartition("/")
        if name not in ("a", "b"):
            raise ValueError(f"adapter leaf {path!r} is not a LoRA factor (expected .../a or .../b)")
        if weight_path not in weight_axes:
            raise ValueError(f"no logical axes for the weight {weight_path!r} of LoRA factor {path!r}; "
                             f"param_axes must cover every adapted weight")
        axes = weight_axes[weight_path]
        if len(axes) < 2:
            raise ValueError(f"the weight {weight_path!r} has logical axes {axes}; LoRA needs (..., in, out)")
        *lead, in_axis, out_axis = axes
        out[path] = (*lead, in_axis, RANK_AXIS) if name == "a" else (*lead, RANK_AXIS, out_axis)
    return tree.unflatten(out)
