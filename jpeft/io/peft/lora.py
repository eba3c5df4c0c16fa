"""LoRA in the Hugging Face PEFT format: the codec :mod:`jpeft.io.peft` uses for ``peft_type: LORA``.

Per module PEFT stores ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)``
(torch orientation), and for embeddings ``lora_embedding_A`` ``(r, vocab)`` and
``lora_embedding_B`` ``(dim, r)``. jpeft's factors are Flax-oriented (``A: (in, r)``,
``B: (r, out)``), so each is transposed. Each weight's scaling is written exactly as
``lora_alpha = scale * r`` (plain LoRA scaling), so rsLoRA and per-rule alphas survive the
trip; ranks and alphas that differ from the most common ones go to ``rank_pattern`` and
``alpha_pattern``.

Embeddings of a model with tied input and output embeddings: PEFT's default adapts the
lookups only, and ``ensure_weight_tying: true`` ties the delta to the output head too;
jpeft's ``lora(ensure_weight_tying=...)`` means the same and is written and read under
that key. PEFT may save the base embedding next to its factors
(``embed_tokens.base_layer.weight``); loading accepts it when it is the model's own
weight and refuses it (naming it) when it differs.

Example:
    >>> CODEC.peft_type, CODEC.tensor_names[:2]
    ('LORA', ('lora_A.weight', 'lora_B.weight'))
"""

from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np

from jpeft import tree
from jpeft.errors import CheckpointError
from jpeft.io.peft import common
from jpeft.methods import lora_init
from jpeft.methods.dora import DoraWeight
from jpeft.methods.lora import LoraWeight, lora, weight_layouts
from jpeft import stack

_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
            "base_layer.weight")
_UNSUPPORTED = {
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
}


def _export(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    if method.training.rebase is not None:
        raise ValueError(f"{method.describe()}: this adapter goes with a rebased base (W - s*A0@B0), not the model's "
                         "own weights; convert it first with jpeft.methods.lora.as_plain_lora(method, params, "
                         "adapter, initial) and save that (a plain LoRA of rank 2r, as PEFT's conversion)")
    applied = tree.flatten(method.apply(params, adapter))
    layouts = weight_layouts(params, model)
    tensors, ranks, alphas, tied, dora = {}, {}, {}, False, False
    for path, weight in sorted((p, w) for p, w in applied.items() if isinstance(w, (LoraWeight, DoraWeight))):
        m = None
        if isinstance(weight, DoraWeight):
            weight, m, dora = weight.lora, np.asarray(weight.m, np.float32), True
        tied = tied or (weight.tie_output and layouts[path].kind == "table")
        a, b = np.asarray(weight.a, np.float32), np.asarray(weight.b, np.float32)
        layers = [(path, a, b, m)]
        if stack.in_stack(path):
            layers = [(stack.unstacked_path(path, i), a[i], b[i], None if m is None else m[i])
                      for i in range(a.shape[0])]
        for layer_path, a_2d, b_2d, m_1d in layers:
            if a_2d.ndim != 2 or b_2d.ndim != 2:
                raise ValueError(f"cannot write LoRA factors of shapes {a_2d.shape}, {b_2d.shape} for {layer_path!r}: "
                                 "PEFT modules are 2-d (Linear, Embedding)")
            module = common.module_of(model, layer_path)
            if layouts[path].kind == "table":
                tensors[f"{module}.lora_embedding_A"], tensors[f"{module}.lora_embedding_B"] = a_2d.T, b_2d.T
                head = model.tied_tables.get(layer_path) if model is not None else None
                if head is not None and weight.tie_output:  # PEFT writes the tied head's copy too
                    head_module = common.module_of(model, head)
                    tensors[f"{head_module}.lora_A.weight"], tensors[f"{head_module}.lora_B.weight"] = b_2d, a_2d
            else:
                tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a_2d.T, b_2d.T
            if m_1d is not None:
                if m_1d.ndim != 1:
                    raise ValueError(f"cannot write a DoRA magnitude of shape {m_1d.shape} for {layer_path!r}: PEFT "
                                     "modules are 2-d")
                tensors[f"{module}.lora_magnitude_vector"] = m_1d
            ranks[module] = int(a_2d.shape[-1])
            alphas[module] = float(weight.scale * a_2d.shape[-1])
    if not tensors:
        return {}, {}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False, "bias": "none",
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
        "ensure_weight_tying": tied,
        "use_dora": dora,
    }
    return tensors, config


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches the end of a module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load(config: dict, modules: dict[str, dict[str, np.ndarray]], params: Any, model,
          problems: list[str]) -> tuple[Any, dict]:
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{what} are not supported ({key}={config[key]!r})")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and lora_init.changes_base(init.lower()):
        raise CheckpointError(f"the adapter was saved with init_lora_weights={init!r}: its factors go with PEFT's "
                              "residual base (W - s*A0@B0), not the model's weights. Save it from PEFT with "
                              "path_initial_model_for_weight_conversion (a plain LoRA of rank 2r) and load that")
    use_dora = bool(config.get("use_dora", False))
    flat_params = common.unstacked_leaves(params)
    stacked = any(stack.in_stack(p) for p in tree.flatten(params))
    tied = bool(config.get("ensure_weight_tying", False))
    heads = {head: table for table, head in (model.tied_tables if model is not None else {}).items()}
    leaves, settings = {}, collections.defaultdict(set)
    for head, tensors in sorted((p, t) for p, t in modules.items() if p in heads):
        table = heads.pop(head)
        copy_of = modules.get(table, {})
        same = (tied and "lora_embedding_A" in copy_of and "lora_A.weight" in tensors and "lora_B.weight" in tensors
                and np.allclose(tensors["lora_A.weight"], copy_of["lora_embedding_B"].T)
                and np.allclose(tensors["lora_B.weight"], copy_of["lora_embedding_A"].T))
        if not same:
            problems.append(f"{common.module_of(model, head)}: an adapter for the output head, which this model "
                            f"ties to {table!r}; jpeft reads it only as the tied copy of that table's adapter "
                            "(ensure_weight_tying: true)")
    modules = {p: t for p, t in modules.items() if p in flat_params}
    for path, tensors in sorted(modules.items()):
        module = common.module_of(model, path)
        embedding = "lora_embedding_A" in tensors or "lora_embedding_B" in tensors
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if use_dora and embedding:
            problems.append(f"{module}: a DoRA embedding, which jpeft does not adapt (DoRA adapts kernels only)")
            continue
        if use_dora:
            names = (*names, "lora_magnitude_vector")
        elif "lora_magnitude_vector" in tensors:
            problems.append(f"{module}: a DoRA magnitude (lora_magnitude_vector) in an adapter whose config has no "
                            "use_dora: true")
            continue
        missing = [n for n in names if n not in tensors]
        if missing:
            problems.append(f"{module}: {', '.join(missing)} is missing")
            continue
        tensors = {k: v for k, v in tensors.items() if k != "base_layer.weight" or
                   _check_base(module, v, flat_params[path], embedding, problems)}
        a, b = tensors[names[0]].T, tensors[names[1]].T
        r, shape = a.shape[1], tuple(flat_params[path].shape)
        if len(shape) != 2 or a.shape != (shape[0], r) or b.shape != (r, shape[1]):
            problems.append(f"{module}: factors {tensors[names[0]].shape} and {tensors[names[1]].shape} do not fit "
                            f"a weight of shape {shape}")
            continue
        leaves[f"{path}/a"], leaves[f"{path}/b"] = a, b
        if use_dora:
            m = tensors["lora_magnitude_vector"]
            if m.shape != (shape[1],):
                problems.append(f"{module}: lora_magnitude_vector has shape {m.shape}, the module has {shape[1]} "
                                "output features")
                continue
            leaves[f"{path}/m"] = m
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        final = stack.stacked_path(path)[0] if stacked else path
        settings[final].add((r, float(alpha)))
    if problems:
        return None, {}
    rules = common.rank_rules(settings)
    method = lora(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                  use_rslora=bool(config.get("use_rslora", False)), targets=rules, model=model,
                  ensure_weight_tying=bool(config.get("ensure_weight_tying", False)), use_dora=use_dora)
    return method, leaves


def _check_base(module: str, stored: np.ndarray, weight, embedding: bool, problems: list[str]) -> bool:
    """A base weight PEFT saved next to the factors: fine (False: drop it) if it is the model's own.

    Anything else is appended to ``problems``; the return value is always False (it is never kept).
    """
    import jax

    expected = tuple(weight.shape) if embedding else tuple(weight.shape)[::-1]  # Linear weights are (out, in)
    if tuple(stored.shape) != expected:
        problems.append(f"{module}: base_layer.weight has shape {tuple(stored.shape)}, the model's weight "
                        f"{expected}; the adapter was saved with another (resized?) base")
    elif not (isinstance(weight, jax.ShapeDtypeStruct) or hasattr(weight, "materialize")):
        ours = np.asarray(weight, np.float32) if embedding else np.asarray(weight, np.float32).T
        if not np.allclose(ours, stored, rtol=1e-3, atol=1e-3):
            problems.append(f"{module}: the adapter carries its own base weights (base_layer.weight) that differ from "
                            "the model's; load the base model it was trained on (jpeft does not replace base weights "
                            "from an adapter)")
    return False


CODEC = common.PeftCodec("LORA", _TENSORS, _export, _load, "LoRA factors")
