"""LoRA in the Hugging Face PEFT format: the codec :mod:`jpeft.io.peft_format` uses for ``peft_type: LORA``.

Per module PEFT stores ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)``
(torch orientation), and for embeddings ``lora_embedding_A`` ``(r, vocab)`` and
``lora_embedding_B`` ``(dim, r)``. jpeft's factors are Flax-oriented (``A: (in, r)``,
``B: (r, out)``), so each is transposed. Each weight's scaling is written exactly as
``lora_alpha = scale * r`` (plain LoRA scaling), so rsLoRA and per-rule alphas survive the
trip; ranks and alphas that differ from the most common ones go to ``rank_pattern`` and
``alpha_pattern``.

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
from jpeft.io import peft_format
import jpeft.models.stack as stack

_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
}


def _export(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    from jpeft.methods.lora import LoraWeight, weight_layouts

    applied = tree.flatten(method.apply(params, adapter))
    layouts = weight_layouts(params, model)
    tensors, ranks, alphas = {}, {}, {}
    for path, weight in sorted((p, w) for p, w in applied.items() if isinstance(w, LoraWeight)):
        a, b = np.asarray(weight.a, np.float32), np.asarray(weight.b, np.float32)
        layers = [(path, a, b)]
        if stack.in_stack(path):
            layers = [(stack.unstacked_path(path, i), a[i], b[i]) for i in range(a.shape[0])]
        for layer_path, a_2d, b_2d in layers:
            if a_2d.ndim != 2 or b_2d.ndim != 2:
                raise ValueError(f"cannot write LoRA factors of shapes {a_2d.shape}, {b_2d.shape} for {layer_path!r}: "
                                 "PEFT modules are 2-d (Linear, Embedding)")
            module = peft_format.module_of(model, layer_path)
            if layouts[path].kind == "table":
                tensors[f"{module}.lora_embedding_A"], tensors[f"{module}.lora_embedding_B"] = a_2d.T, b_2d.T
            else:
                tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a_2d.T, b_2d.T
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
    from jpeft.methods.lora import lora

    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{what} are not supported ({key}={config[key]!r})")
    flat_params = peft_format.unstacked_leaves(params)
    stacked = any(stack.in_stack(p) for p in tree.flatten(params))
    leaves, settings = {}, collections.defaultdict(set)
    for path, tensors in sorted(modules.items()):
        module = peft_format.module_of(model, path)
        embedding = "lora_embedding_A" in tensors or "lora_embedding_B" in tensors
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        missing = [n for n in names if n not in tensors]
        if missing:
            problems.append(f"{module}: {', '.join(missing)} is missing")
            continue
        a, b = tensors[names[0]].T, tensors[names[1]].T
        r, shape = a.shape[1], tuple(flat_params[path].shape)
        if len(shape) != 2 or a.shape != (shape[0], r) or b.shape != (r, shape[1]):
            problems.append(f"{module}: factors {tensors[names[0]].shape} and {tensors[names[1]].shape} do not fit "
                            f"a weight of shape {shape}")
            continue
        leaves[f"{path}/a"], leaves[f"{path}/b"] = a, b
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        final = stack.stacked_path(path)[0] if stacked else path
        settings[final].add((r, float(alpha)))
    if problems:
        return None, {}
    uneven = sorted(p for p, s in settings.items() if len(s) > 1)
    if uneven:
        raise CheckpointError(f"the PEFT adapter has per-layer ranks or alphas for {peft_format.listing(uneven)}, "
                              "which stacked (scan_layers=True) params cannot hold; load it onto unstacked params")
    rules = [tree.Rule(re.escape(p), rank=r, alpha=a) for p, ((r, a),) in sorted(settings.items())]
    method = lora(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                  use_rslora=bool(config.get("use_rslora", False)), targets=rules, model=model)
    return method, leaves


CODEC = peft_format.register_codec(peft_format.PeftCodec("LORA", _TENSORS, _export, _load, "LoRA factors"))
