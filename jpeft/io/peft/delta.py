"""LoHa and LoKr in the Hugging Face PEFT format (``peft_type: LOHA`` / ``LOKR``), one codec shape for both.

PEFT stores each factor of a module under its own name (``hada_w1_a``, ``lokr_w2_b``,
...; no ``.weight`` suffix) in torch orientation; jpeft's factors are Flax-oriented, so
each is transposed: an ``a*`` factor ``(*in, r)`` is flattened to ``(I, r)`` and written
``(r, I)``, a ``b*`` factor ``(r, *out)`` is written ``(O, r)``, a full Kronecker factor
``(in, out)`` is written ``(out, in)``. A multi-axis kernel is PEFT's 2-d ``Linear``
weight ``(O, I)`` with its input axes and its output axes flattened (row-major).

Config fields written: ``r``, ``alpha`` (the most common ones), ``rank_pattern`` /
``alpha_pattern`` for modules that differ, ``target_modules`` (the adapted modules),
and the settings jpeft runs with: ``rank_dropout: 0``, ``module_dropout: 0``,
``init_weights: true`` (and for LoKr ``decompose_both``, ``decompose_factor``,
``rank_dropout_scale: false``). Reading checks that every module has exactly the factors
PEFT would make for its ``r`` (and LoKr's ``decompose_*``), with their shapes; it refuses
``modules_to_save`` and adapters on a tied output head, and warns that PEFT's
``rank_dropout`` / ``module_dropout`` (training-time only: the saved adapter is exact
without them) are not reproduced when training on.

Example:
    >>> LOHA.peft_type, LOKR.tensor_names[:3]
    ('LOHA', ('lokr_w1', 'lokr_w1_a', 'lokr_w1_b'))
"""

from __future__ import annotations

import collections
import math
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from jpeft import tree
from jpeft.errors import CheckpointError
from jpeft.io.peft import common
from jpeft.layout import layouts_for
from jpeft.methods import delta
from jpeft.methods.loha import KIND as LOHA_KIND, loha
from jpeft.methods.lokr import _kind as lokr_kind, lokr
from jpeft import stack

_UNSUPPORTED = {"modules_to_save": "modules_to_save (fully trained extra modules)"}
_TRAINING_ONLY = ("rank_dropout", "module_dropout")


class Format(NamedTuple):
    """What differs between LoHa's and LoKr's PEFT files.

    Attributes:
        title: the method in messages.
        names: jpeft factor name -> PEFT tensor name.
        extra_config: ``wrapper -> {field: value}``: method-wide config fields (LoKr's ``decompose_*``).
        kind: ``config -> DeltaKind`` for a PEFT config (its factor shapes).
        build: ``(config, rules, model) -> Method``.
        describe: ``config -> str``: the config settings that decide a module's factors, for messages.
    """

    title: str
    names: dict[str, str]
    extra_config: Callable[[Any], dict]
    kind: Callable[[dict], delta.DeltaKind]
    build: Callable[..., Any]
    describe: Callable[[dict], str]


def _as_2d(name: str, factor: np.ndarray) -> np.ndarray:
    """A factor of one unstacked weight as PEFT's 2-d matrix in jpeft's orientation (before transposing)."""
    if name.startswith("a"):
        return factor.reshape(-1, factor.shape[-1])
    if name.startswith("b"):
        return factor.reshape(factor.shape[0], -1)
    return factor


def _export(fmt: Format):
    def export(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
        applied = tree.flatten(method.apply(params, adapter))
        tensors, ranks, alphas, extra = {}, {}, {}, {}
        for path, weight in sorted((p, w) for p, w in applied.items() if isinstance(w, delta.DeltaWeight)):
            factors = {n: np.asarray(f, np.float32) for n, f in weight.factors.items()}
            layers = [(path, factors)]
            if stack.in_stack(path):
                count = weight.shape[0]
                layers = [(stack.unstacked_path(path, i), {n: f[i] for n, f in factors.items()}) for i in range(count)]
            for layer_path, layer_factors in layers:
                module = common.module_of(model, layer_path)
                for name, factor in layer_factors.items():
                    tensors[f"{module}.{fmt.names[name]}"] = _as_2d(name, factor).T
                ranks[module], alphas[module] = int(weight.rank), float(weight.scale * weight.rank)
            extra = fmt.extra_config(weight)
        if not tensors:
            return {}, {}
        rank = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
        config = {
            "r": rank, "alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
            "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
            "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, "use_effective_conv2d": False,
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
            **extra,
        }
        return tensors, config
    return export


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches the end of a module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load(fmt: Format):
    def load(config: dict, modules: dict[str, dict[str, np.ndarray]], params: Any, model,
             problems: list[str]) -> tuple[Any, dict]:
        for key, what in _UNSUPPORTED.items():
            if config.get(key):
                raise CheckpointError(f"{what} are not supported ({key}={config[key]!r})")
        used = [k for k in _TRAINING_ONLY if config.get(k)]
        if used:
            warnings.warn(f"the {fmt.title} adapter was trained with " + ", ".join(f"{k}={config[k]}" for k in used)
                          + "; its outputs load exactly, but jpeft trains on without them", stacklevel=3)
        kind = fmt.kind(config)
        flat_params = common.unstacked_leaves(params)
        layouts = layouts_for(params, model=model)
        stacked = any(stack.in_stack(p) for p in tree.flatten(params))
        by_peft_name = {v: k for k, v in fmt.names.items()}
        leaves, settings = {}, collections.defaultdict(set)
        for path, tensors in sorted(modules.items()):
            module = common.module_of(model, path)
            if path not in flat_params:
                problems.append(f"{module}: a {fmt.title} adapter for the tied output head, which jpeft does not "
                                "adapt apart from the embedding table")
                continue
            final = stack.stacked_path(path)[0] if stacked else path
            layout, shape = layouts[final], tuple(flat_params[path].shape)
            if layout.kind != "kernel":
                problems.append(f"{module}: {fmt.title} adapts linear layers only, and this weight is a {layout.kind}")
                continue
            lead = layout.lead - (1 if final != path else 0)      # a stacked weight's layer axis is gone here
            d_in, d_out = shape[lead:lead + layout.inputs], shape[lead + layout.inputs:]
            r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("alpha", 8)))
            want_2d = kind.factor_shapes((math.prod(d_in),), (math.prod(d_out),), r)
            want = {fmt.names[n] for n in want_2d}
            if set(tensors) != want:
                problems.append(f"{module}: has {', '.join(sorted(tensors))}, but r={r}{fmt.describe(config)} on a "
                                f"weight {math.prod(d_out)} x {math.prod(d_in)} makes {', '.join(sorted(want))}")
                continue
            bad = [f"{t} {tuple(v.shape)} (want {want_2d[by_peft_name[t]][::-1]})" for t, v in sorted(tensors.items())
                   if tuple(v.shape)[::-1] != want_2d[by_peft_name[t]]]
            if bad:
                problems.append(f"{module}: factors {', '.join(bad)} do not fit a weight of shape {shape} at r={r}")
                continue
            full = kind.factor_shapes(d_in, d_out, r)
            for t, v in tensors.items():
                leaves[f"{path}/{by_peft_name[t]}"] = v.T.reshape(full[by_peft_name[t]])
            settings[final].add((r, alpha))
        if problems:
            return None, {}
        rules = common.rank_rules(settings)
        return fmt.build(config, rules, model), leaves
    return load


def codec(peft_type: str, fmt: Format) -> common.PeftCodec:
    """The :class:`~jpeft.io.peft.common.PeftCodec` of a weight-delta method, for ``peft_type``."""
    return common.PeftCodec(peft_type, tuple(sorted(fmt.names.values())), _export(fmt), _load(fmt),
                            f"{fmt.title} factors")


# ----------------------------------------------------------------------------- LoHa, LoKr


def _loha_build(config: dict, rules, model):
    return loha(rank=int(config.get("r", 8)), alpha=float(config.get("alpha", 8)), targets=rules, model=model)


def _loha_kind(config: dict) -> delta.DeltaKind:
    return LOHA_KIND


def _lokr_options(config: dict) -> dict:
    return {"decompose_both": bool(config.get("decompose_both", False)),
            "decompose_factor": int(config.get("decompose_factor", -1))}


def _lokr_build(config: dict, rules, model):
    return lokr(rank=int(config.get("r", 8)), alpha=float(config.get("alpha", 8)), targets=rules, model=model,
                **_lokr_options(config))


def _lokr_kind(config: dict) -> delta.DeltaKind:
    return lokr_kind(**_lokr_options(config))


LOHA = codec("LOHA", Format(
    "LoHa", {"a1": "hada_w1_b", "b1": "hada_w1_a", "a2": "hada_w2_b", "b2": "hada_w2_a"},
    extra_config=lambda w: {}, kind=_loha_kind, build=_loha_build, describe=lambda c: ""))

LOKR = codec("LOKR", Format(
    "LoKr", {"w1": "lokr_w1", "a1": "lokr_w1_b", "b1": "lokr_w1_a",
             "w2": "lokr_w2", "a2": "lokr_w2_b", "b2": "lokr_w2_a"},
    extra_config=lambda w: {"decompose_both": w.decompose_both, "decompose_factor": w.decompose_factor,
                            "rank_dropout_scale": False},
    kind=_lokr_kind, build=_lokr_build,
    describe=lambda c: "".join(f", {k}={v}" for k, v in _lokr_options(c).items())))
