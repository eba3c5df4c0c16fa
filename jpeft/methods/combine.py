"""Weighted combination of LoRA adapters into a new one, as Hugging Face PEFT's ``add_weighted_adapter``.

Given LoRA adapters ``i`` with factors ``A_i (in, r_i)``, ``B_i (r_i, out)``, scales ``s_i``
and weights ``w_i``, :func:`combine_adapters` makes one LoRA adapter (scale 1: ``alpha =
rank``) by one of PEFT's combination types, per adapted weight:

* ``"cat"``: ``A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...]``, ``B = [B_1; B_2; ...]``: exactly
  ``sum_i w_i s_i A_i B_i``, of rank ``sum_i r_i``.
* ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: the
  ``A`` factors and the ``B`` factors are merged separately (:func:`merge_tensors`, PEFT's
  ``merge_utils``) with weights ``sign(w_i s_i) sqrt|w_i s_i|`` for ``A`` and ``sqrt|w_i s_i|``
  for ``B``. Like PEFT, this needs equal ranks and is not the weighted sum of the deltas
  (the products of different adapters' factors enter too): PEFT calls it a rough
  approximation.
* ``"svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
  ``"magnitude_prune_svd"``: the deltas ``s_i A_i B_i`` are merged (task arithmetic for
  ``"svd"``), then truncated to rank ``svd_rank`` (default: the largest adapter rank) by
  an SVD, optionally clamped at the ``svd_clamp`` quantile of the factors' entries.

``ties`` and ``magnitude_prune`` keep each tensor's ``density`` largest-magnitude entries;
``dare_*`` keep each entry with probability ``density`` and rescale by ``1 / density``
(random: give ``key``); ``ties`` and ``dare_ties`` then keep, per entry, the adapters
that agree with the majority sign (``majority_sign_method``: ``"total"`` sums the values,
``"frequency"`` counts signs) and average them. With one adapter every type is
``"linear"``, as in PEFT. Stacked layers are combined layer by layer, as PEFT sees them.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.zeros((6, 3))}}
    >>> lora = jpeft.lora(rank=1, alpha=2, targets=r"dense/kernel")
    >>> one = {"dense": {"kernel": {"a": jnp.ones((6, 1)), "b": jnp.ones((1, 3))}}}
    >>> two = {"dense": {"kernel": {"a": -jnp.ones((6, 1)), "b": jnp.ones((1, 3))}}}
    >>> method, adapter = combine_adapters(params, [(lora, one), (lora, two)], [1.0, 0.5], "cat")
    >>> method.merge(params, adapter)["dense"]["kernel"][0].tolist()   # 1.0 * 2 - 0.5 * 2
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree
from jpeft.errors import SettingError
from jpeft.methods.base import Method, refuse_rebased
from jpeft.methods.lora import LoraWeight, lora

TASK_ARITHMETIC = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Combination types that merge same-shape tensors (:func:`merge_tensors`)."""
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
"""Combination types that merge the deltas, then truncate them with an SVD."""
COMBINATION_TYPES = ("cat", *TASK_ARITHMETIC, *SVD)
_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_METHODS = ("total", "frequency")


# ----------------------------------------------------------------------------- merging tensors


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
    """``t`` with all but its ``int(density * t.size)`` largest-magnitude entries set to zero."""
    k = int(density * t.size)
    if k == 0:
        return jnp.zeros_like(t)
    _, keep = jax.lax.top_k(jnp.abs(t).reshape(-1), k)
    return (t.reshape(-1) * jnp.zeros(t.size, t.dtype).at[keep].set(1)).reshape(t.shape)


def _merge(stacked: jax.Array, weights: jax.Array, key: jax.Array, masks: jax.Array | None, *, combination: str,
           density: float | None, sign_method: str) -> jax.Array:
    """:func:`merge_tensors` on ``stacked (n, *shape)``: traced inside the jitted combinations."""
    w = weights.reshape(-1, *(1,) * (stacked.ndim - 1))
    if combination != "linear" and density is not None and density < 1:
        if combination.startswith("dare"):
            if masks is None:
                keys = jax.random.split(key, stacked.shape[0])
                masks = jax.vmap(lambda k: jax.random.bernoulli(k, density, stacked.shape[1:]))(keys)
            stacked = stacked * masks.astype(jnp.float32) / density
        else:
            stacked = jax.vmap(lambda t: _magnitude_prune(t, density))(stacked)
    if combination in ("ties", "dare_ties"):
        signs = jnp.sign(stacked)
        magnitude = stacked.sum(0) if sign_method == "total" else signs.sum(0)
        agree = signs == jnp.where(magnitude >= 0, 1.0, -1.0)
        return (stacked * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1.0)
    return (stacked * w).sum(0)


_OPTIONS = ("combination", "density", "sign_method")
_merge_jit = jax.jit(_merge, static_argnames=_OPTIONS)


def merge_tensors(tensors: Sequence[jax.Array], weights: Sequence[float], combination: str = "linear", *,
                  density: float | None = None, majority_sign_method: str = "total", key: jax.Array | None = None,
                  masks: Sequence[jax.Array] | None = None) -> jax.Array:
    """One tensor from same-shape ``tensors`` and their ``weights``: PEFT's ``merge_utils`` functions.

    ``combination`` is one of :data:`TASK_ARITHMETIC`. ``density`` (in ``(0, 1]``; 1 prunes
    nothing) is the fraction kept by ``ties``, ``magnitude_prune`` and ``dare_*``. DARE's
    random keep-masks come from ``key``, or are given as ``masks`` (one per tensor).

    Example:
        >>> import jax.numpy as jnp
        >>> t = [jnp.array([3.0, -1.0, 0.5]), jnp.array([-2.0, -2.0, 1.0])]
        >>> merge_tensors(t, [1.0, 1.0]).tolist()
        [1.0, -3.0, 1.5]
        >>> merge_tensors(t, [1.0, 1.0], "ties", density=1.0).tolist()   # per entry: the majority sign's mean
        [3.0, -1.5, 0.75]
    """
    if combination not in TASK_ARITHMETIC:
        raise ValueError(f"combination {combination!r} must be one of {TASK_ARITHMETIC}")
    random = combination.startswith("dare") and density is not None and density < 1
    if random and masks is None and key is None:
        raise ValueError(f"{combination!r} prunes at random: give key= (a jax.random key)")
    stacked = jnp.stack([jnp.asarray(t, jnp.float32) for t in tensors])
    masks = None if masks is None or not random else jnp.stack([jnp.asarray(m, bool) for m in masks])
    return _merge_jit(stacked, jnp.asarray(weights, jnp.float32), jax.random.key(0) if key is None else key, masks,
                      combination=combination, density=density, sign_method=majority_sign_method)


# ----------------------------------------------------------------------------- checks


_WHAT = "combine_adapters:"


def _check(combination_type, weights, n, density, majority_sign_method, svd_rank, svd_clamp) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise SettingError("combination_type", combination_type, f"must be one of {COMBINATION_TYPES}", what=_WHAT)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} adapters: give one weight per adapter")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer))
           or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad[0]!r}")
    uses_density = combination_type.removesuffix("_svd") in _DENSITY
    if uses_density and density is None:
        raise ValueError(f"combination_type {combination_type!r} needs density= (the fraction of entries kept, "
                         "in (0, 1])")
    if density is not None:
        if not uses_density:
            raise ValueError(f"density applies to {', '.join(_DENSITY)} (and their _svd forms), not to "
                             f"{combination_type!r}; drop it")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise SettingError("density", density, "must be in (0, 1] (the fraction of entries kept)", what=_WHAT)
    if majority_sign_method not in _SIGN_METHODS:
        raise SettingError("majority_sign_method", majority_sign_method, f"must be one of {_SIGN_METHODS}", what=_WHAT)
    if not combination_type.endswith("svd") and (svd_rank is not None or svd_clamp is not None):
        raise ValueError(f"svd_rank and svd_clamp apply to the svd combination types, not to {combination_type!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise SettingError("svd_rank", svd_rank, "must be a positive int", what=_WHAT)
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 < svd_clamp <= 1):
        raise SettingError("svd_clamp", svd_clamp, "must be a quantile in (0, 1]", what=_WHAT)


def _lora_leaves(params: Any, entries: list[tuple[str, Method, Any]]) -> list[dict[str, LoraWeight]]:
    """Each adapter's ``{weight path: LoraWeight}`` (what its ``apply`` makes), checked to be LoRA."""
    flat_params = tree.flatten(params)
    out = []
    for name, method, adapter in entries:
        if not isinstance(method, Method):
            raise TypeError(f"adapter {name} must be a (jpeft.Method, adapter) pair, got {type(method).__name__}")
        refuse_rebased(method, f"combine_adapters: adapter {name}")
        try:
            applied = tree.flatten(method.apply(params, adapter))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"adapter {name} ({method.name}) does not fit these parameters: {err}") from None
        leaves = {}
        for path, leaf in applied.items():
            if path in flat_params and leaf is flat_params[path]:
                continue
            if not isinstance(leaf, LoraWeight) or leaf.base is not flat_params.get(path):
                raise ValueError(f"adapter {name} ({method.name}) is not a LoRA adapter (it turns {path!r} into a "
                                 f"{type(leaf).__name__}); combination makes a LoRA adapter from LoRA adapters")
            leaves[path] = leaf
        out.append(leaves)
    return out


# ----------------------------------------------------------------------------- one weight


def _as_layout(a: jax.Array, b: jax.Array, like_a: jax.Array, like_b: jax.Array, lead: int):
    """Combined ``a (L, in, r)``, ``b (L, r, out)`` back in the weight's factor layout (that of ``like_a/b``)."""
    r = a.shape[-1]
    return (a.reshape(*like_a.shape[:-1], r),
            b.reshape(*like_b.shape[:lead], r, *like_b.shape[lead + 1:]))


def _svd_factors(delta: jax.Array, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
    """PEFT's truncated SVD of a delta ``(in, out)``, done on its ``(out, in)`` transpose as PEFT does."""
    u, s, vh = jnp.linalg.svd(delta.T, full_matrices=False)
    u, vh = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    return vh.T, u.T  # a (in, rank), b (rank, out)


def _per_layer(stacked_NxL: jax.Array, weights: jax.Array, key: jax.Array, **options) -> jax.Array:
    """``(L, *shape)``: layer ``l`` merges ``stacked_NxL[:, l]`` with its own DARE key, as PEFT merges each module."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(stacked_NxL.shape[1]))
    return jax.vmap(lambda t, k: _merge(t, weights, k, None, **options), in_axes=(1, 0))(stacked_NxL, keys)


# Each takes every adapter's factors as matrices, a (L, in, r) and b (L, r, out) (stack axes flattened to L,
# input and output axes to one each): one compilation serves every weight of those matrix shapes.


@jax.jit
def _cat(a_list, b_list, scales):
    a = jnp.concatenate([a * s for a, s in zip(a_list, scales)], axis=-1)
    return a, jnp.concatenate(b_list, axis=-2)


@functools.partial(jax.jit, static_argnames=_OPTIONS)
def _task_arithmetic(a_list, b_list, scales, key, **options):
    """The factors merged separately, with weights ``sign(s) sqrt|s|`` for ``A`` and ``sqrt|s|`` for ``B``."""
    key_a, key_b = jax.random.split(key)
    a = _per_layer(jnp.stack(a_list), jnp.sign(scales) * jnp.sqrt(jnp.abs(scales)), key_a, **options)
    return a, _per_layer(jnp.stack(b_list), jnp.sqrt(jnp.abs(scales)), key_b, **options)


@functools.partial(jax.jit, static_argnames=(*_OPTIONS, "rank", "clamp"))
def _svd(a_list, b_list, scales, weights, key, *, rank, clamp, **options):
    """Each layer's deltas ``s_i A_i B_i`` merged with ``weights``, then truncated to ``rank`` by an SVD."""
    deltas = jnp.stack([s * jnp.einsum("lir,lro->lio", a, b) for a, b, s in zip(a_list, b_list, scales)])
    merged = _per_layer(deltas, weights, key, **options)
    return jax.vmap(lambda d: _svd_factors(d, rank, clamp))(merged)


def _combine_weight(path: str, index: int, leaves: list[LoraWeight | None], weights: Sequence[float],
                    combination_type: str, rank: int | None, density, sign_method, svd_clamp, key):
    """``(a, b)`` of the combined adapter at one weight, in that weight's factor layout (one compiled call)."""
    present = [(leaf, float(w)) for leaf, w in zip(leaves, weights) if leaf is not None]
    first = present[0][0]
    lead, shape = first.lead, tuple(first.shape)
    n_lead, d_in = math.prod(shape[:lead]), math.prod(first.a.shape[lead:-1])
    d_out = math.prod(first.b.shape[lead + 1:])
    a_list = [jnp.asarray(leaf.a, jnp.float32).reshape(n_lead, d_in, -1) for leaf, _ in present]
    b_list = [jnp.asarray(leaf.b, jnp.float32).reshape(n_lead, -1, d_out) for leaf, _ in present]
    in_layout = lambda ab: _as_layout(*ab, first.a, first.b, lead)
    scales = jnp.asarray([leaf.scale * w for leaf, w in present], jnp.float32)
    key = jax.random.fold_in(jax.random.key(0) if key is None else key, index)  # unused unless DARE prunes
    if combination_type == "cat":
        total = sum(int(a.shape[-1]) for a in a_list)
        if total > min(d_in, d_out):
            raise ValueError(f"'cat' makes rank {total} at {path!r}, more than its shape {shape} allows (at "
                             f"most {min(d_in, d_out)}); use 'svd' (exact up to that rank)")
        return in_layout(_cat(a_list, b_list, scales))
    options = dict(density=density, sign_method=sign_method)
    if combination_type in TASK_ARITHMETIC:
        ranks = sorted({int(a.shape[-1]) for a in a_list})
        if len(ranks) > 1:
            raise ValueError(f"the adapters have ranks {ranks} at {path!r}; {combination_type!r} merges the factors "
                             "entry by entry, so it needs equal ranks (as in PEFT): use 'cat' or 'svd'")
        return in_layout(_task_arithmetic(a_list, b_list, scales, key, combination=combination_type, **options))
    if rank > min(d_in, d_out):
        raise ValueError(f"svd_rank {rank} is larger than the weight {path!r} of shape {shape} allows (at most "
                         f"{min(d_in, d_out)}); lower svd_rank")
    base_type = combination_type.removesuffix("_svd")
    return in_layout(_svd(a_list, b_list, jnp.asarray([leaf.scale for leaf, _ in present], jnp.float32),
                          jnp.asarray([w for _, w in present], jnp.float32), key, rank=rank, clamp=svd_clamp,
                          combination="linear" if base_type == "svd" else base_type, **options))


# ----------------------------------------------------------------------------- the combination


def combine_adapters(
    params: Any,
    adapters: Sequence[tuple[Method, Any]] | Mapping[str, tuple[Method, Any]],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
    model: Any = None,
) -> tuple[Method, dict]:
    """A new LoRA ``(method, adapter)`` that combines LoRA adapters (see the module docstring).

    Args:
        params: the base parameters the adapters are for (arrays or ``jax.ShapeDtypeStruct``).
        adapters: ``[(method, adapter), ...]`` or ``{name: (method, adapter)}``; each a LoRA
            adapter (any ranks, alphas, rsLoRA, targets: the result adapts the union).
        weights: one finite weight per adapter (negative ones subtract).
        combination_type: one of :data:`COMBINATION_TYPES` (PEFT's names).
        svd_rank: the rank of an SVD combination (default: the largest adapter rank).
        svd_clamp: clamp an SVD combination's factors at this quantile of their entries.
        density: the fraction of entries ``ties``, ``dare_*`` and ``magnitude_prune`` keep.
        majority_sign_method: ``"total"`` or ``"frequency"`` (``ties``, ``dare_ties``).
        key: a ``jax.random`` key for DARE's random pruning.
        model: the :class:`jpeft.models.Model`, passed to the new LoRA method.

    Returns:
        ``(method, adapter)``: a LoRA method with ``alpha = rank`` per weight (scale 1, as
        PEFT's new adapter) and its factors.

    Raises:
        ValueError: for a weight or density out of range, a setting the type does not use,
            an adapter that is not LoRA or does not fit ``params``, or unequal ranks where the
            type needs equal ones.
    """
    named = list(adapters.items()) if isinstance(adapters, Mapping) else list(enumerate(adapters))
    if not named:
        raise ValueError("combine_adapters needs at least one adapter")
    entries = []
    for name, entry in named:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError(f"adapter {name!r} must be a (jpeft.Method, adapter) pair")
        entries.append((repr(name), *entry))
    weights = list(weights)
    _check(combination_type, weights, len(entries), density, majority_sign_method, svd_rank, svd_clamp)
    if combination_type.startswith("dare") and density is not None and density < 1 and key is None:
        raise ValueError(f"{combination_type!r} prunes at random: give key= (a jax.random key)")
    if len(entries) == 1:  # as PEFT: one adapter can only be scaled
        combination_type, density = "linear", None
    per_adapter = _lora_leaves(params, entries)
    paths = sorted({p for leaves in per_adapter for p in leaves})
    if not paths:
        raise ValueError("the adapters adapt no weight")
    tied_tables = set(model.tied_tables) if model is not None else set()
    tie_flags = {leaf.tie_output for leaves in per_adapter for path, leaf in leaves.items() if path in tied_tables}
    if len(tie_flags) > 1:
        raise ValueError("some adapters tie their embedding delta to the output head (ensure_weight_tying) and "
                         "others do not; combine adapters that agree")
    tie_output = tie_flags == {True}
    rank = svd_rank or max(int(leaf.a.shape[-1]) for leaves in per_adapter for leaf in leaves.values())
    out, rules = {}, []
    for index, path in enumerate(paths):
        at_path = [leaves.get(path) for leaves in per_adapter]
        a, b = _combine_weight(path, index, at_path, weights, combination_type, rank, density,
                               majority_sign_method, svd_clamp, key)
        out[f"{path}/a"], out[f"{path}/b"] = a, b
        r = int(a.shape[-1])
        rules.append(tree.Rule(re.escape(path), rank=r, alpha=float(r)))
    top = max(rule.settings["rank"] for rule in rules)
    method = lora(rank=top, alpha=float(top), targets=rules, ensure_weight_tying=tie_output, model=model)
    return method._replace(label=f"lora {combination_type} of {len(entries)}"), tree.unflatten(out)
