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

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree
from jpeft.methods.base import Method
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
    stacked = jnp.stack([jnp.asarray(t, jnp.float32) for t in tensors])
    w = jnp.asarray(weights, jnp.float32).reshape(-1, *(1,) * (stacked.ndim - 1))
    if combination != "linear" and density is not None and density < 1:
        if combination.startswith("dare"):
            if masks is None:
                if key is None:
                    raise ValueError(f"{combination!r} prunes at random: give key= (a jax.random key)")
                masks = [jax.random.bernoulli(k, density, stacked.shape[1:])
                         for k in jax.random.split(key, stacked.shape[0])]
            stacked = stacked * jnp.stack([jnp.asarray(m, jnp.float32) for m in masks]) / density
        else:
            stacked = jnp.stack([_magnitude_prune(t, density) for t in stacked])
    if combination in ("ties", "dare_ties"):
        signs = jnp.sign(stacked)
        magnitude = stacked.sum(0) if majority_sign_method == "total" else signs.sum(0)
        agree = signs == jnp.where(magnitude >= 0, 1.0, -1.0)
        return (stacked * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1.0)
    return (stacked * w).sum(0)


# ----------------------------------------------------------------------------- checks


def _check(combination_type, weights, n, density, majority_sign_method, svd_rank, svd_clamp) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type {combination_type!r} must be one of {COMBINATION_TYPES}")
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
            raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {density!r}")
    if majority_sign_method not in _SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {_SIGN_METHODS}, got {majority_sign_method!r}")
    if not combination_type.endswith("svd") and (svd_rank is not None or svd_clamp is not None):
        raise ValueError(f"svd_rank and svd_clamp apply to the svd combination types, not to {combination_type!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 < svd_clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")


def _lora_leaves(params: Any, entries: list[tuple[str, Method, Any]]) -> list[dict[str, LoraWeight]]:
    """Each adapter's ``{weight path: LoraWeight}`` (what its ``apply`` makes), checked to be LoRA."""
    flat_params = tree.flatten(params)
    out = []
    for name, method, adapter in entries:
        if not isinstance(method, Method):
            raise TypeError(f"adapter {name} must be a (jpeft.Method, adapter) pair, got {type(method).__name__}")
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


def _as_matrices(leaf: LoraWeight) -> tuple[jax.Array, jax.Array]:
    """``a (L, in, r)`` and ``b (L, r, out)``: stack axes flattened to one, input and output axes to one each."""
    lead_shape = tuple(leaf.shape)[:leaf.lead]
    n_lead = math.prod(lead_shape)
    r = leaf.a.shape[-1]
    a = jnp.asarray(leaf.a, jnp.float32).reshape(n_lead, -1, r)
    b = jnp.asarray(leaf.b, jnp.float32).reshape(n_lead, r, -1)
    return a, b


def _svd_factors(delta: jax.Array, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
    """PEFT's truncated SVD of a delta ``(in, out)``, done on its ``(out, in)`` transpose as PEFT does."""
    u, s, vh = jnp.linalg.svd(delta.T, full_matrices=False)
    u, vh = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    return vh.T, u.T  # a (in, rank), b (rank, out)


def _combine_weight(path: str, index: int, leaves: list[LoraWeight | None], weights: Sequence[float],
                    combination_type: str, rank: int | None, density, sign_method, svd_clamp, key):
    """``(a, b)`` of the combined adapter at one weight, in that weight's factor layout."""
    present = [(leaf, float(w)) for leaf, w in zip(leaves, weights) if leaf is not None]
    first = present[0][0]
    lead, shape = first.lead, tuple(first.shape)
    mats = [_as_matrices(leaf) for leaf, _ in present]
    scales = [leaf.scale * w for leaf, w in present]
    if combination_type == "cat":
        a = jnp.concatenate([a * s for (a, _), s in zip(mats, scales)], axis=-1)
        b = jnp.concatenate([b for _, b in mats], axis=-2)
        if a.shape[-1] > min(a.shape[-2], b.shape[-1]):
            raise ValueError(f"'cat' makes rank {a.shape[-1]} at {path!r}, more than its shape {shape} allows (at "
                             f"most {min(a.shape[-2], b.shape[-1])}); use 'svd' (exact up to that rank)")
    elif combination_type in TASK_ARITHMETIC:
        ranks = sorted({int(a.shape[-1]) for a, _ in mats})
        if len(ranks) > 1:
            raise ValueError(f"the adapters have ranks {ranks} at {path!r}; {combination_type!r} merges the factors "
                             "entry by entry, so it needs equal ranks (as in PEFT): use 'cat' or 'svd'")
        w_a = [math.copysign(math.sqrt(abs(s)), s) for s in scales]
        w_b = [math.sqrt(abs(s)) for s in scales]
        keys = [None, None] if key is None else jax.random.split(jax.random.fold_in(key, index))
        merge = lambda ts, w, k, n: jnp.stack([
            merge_tensors([t[i] for t in ts], w, combination_type, density=density, majority_sign_method=sign_method,
                          key=None if k is None else jax.random.fold_in(k, i)) for i in range(n)])
        n_lead = mats[0][0].shape[0]
        a = merge([a for a, _ in mats], w_a, keys[0], n_lead)
        b = merge([b for _, b in mats], w_b, keys[1], n_lead)
    else:
        deltas = [s * jnp.einsum("lir,lro->lio", a, b) for (a, b), s in zip(mats, [leaf.scale for leaf, _ in present])]
        base_type = combination_type.removesuffix("_svd")
        base_type = "linear" if base_type == "svd" else base_type
        n_lead, d_in, d_out = deltas[0].shape
        if rank > min(d_in, d_out):
            raise ValueError(f"svd_rank {rank} is larger than the weight {path!r} of shape {shape} allows (at most "
                             f"{min(d_in, d_out)}); lower svd_rank")
        factors = []
        for i in range(n_lead):
            k = None if key is None else jax.random.fold_in(jax.random.fold_in(key, index), i)
            merged = merge_tensors([d[i] for d in deltas], [w for _, w in present], base_type, density=density,
                                   majority_sign_method=sign_method, key=k)
            factors.append(_svd_factors(merged, rank, svd_clamp))
        a, b = jnp.stack([f[0] for f in factors]), jnp.stack([f[1] for f in factors])
    r = int(a.shape[-1])
    d_in = first.a.shape[lead:-1]
    d_out = first.b.shape[lead + 1:]
    return a.reshape(*shape[:lead], *d_in, r), b.reshape(*shape[:lead], r, *d_out)


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
