"""AdaLoRA in the Hugging Face PEFT format (``peft_type: ADALORA``), cut to the kept ranks with ``rank_pattern``.

PEFT stores per module ``lora_A`` ``(r, I)``, ``lora_E`` ``(r, 1)`` and ``lora_B`` ``(O, r)``
(no ``.weight`` suffix; torch orientation). jpeft's factors are Flax-oriented (``a (*in, R)``,
``e (R,)``, ``b (R, *out)``, ``R = init_r``), so each is flattened and transposed. As PEFT
saves a trained AdaLoRA adapter, only the kept triplets are written (``r`` = the module's
kept rank) and ``adapter_config.json``'s ``rank_pattern`` maps ``<module>.lora_E`` to the
``init_r`` booleans of which were kept; PEFT's ``from_pretrained`` resizes its modules by
them. jpeft's kept triplets are where ``e != 0`` (:func:`jpeft.methods.adalora.rank_pattern`);
a fresh adapter (all ``e`` zero) is written at full rank without a pattern.

Reading puts the kept factors back at their positions among ``init_r`` and zeroes the
rest (``e = 0`` there: the same outputs, and the same pattern when saved again). The
schedule settings (``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``orth_reg_weight``, ``total_step``) are written and read back. PEFT has one ``init_r`` and
one ``lora_alpha`` for all modules: an adapter with per-rule ranks or alphas is refused.

Example:
    >>> CODEC.peft_type, CODEC.tensor_names
    ('ADALORA', ('lora_A', 'lora_B', 'lora_E'))
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jpeft import tree
from jpeft.errors import CheckpointError
from jpeft.io.peft import common
from jpeft.methods.adalora import AdaloraWeight, _scale, adalora, rank_pattern
from jpeft.layout import layouts_for
from jpeft import stack

_TENSORS = ("lora_A", "lora_B", "lora_E")
_SCHEDULE = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")
_UNSUPPORTED = {"modules_to_save": "modules_to_save (fully trained extra modules)",
                "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers", "use_dora": "DoRA"}


def _export(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    fields = {("lora_alpha" if k == "alpha" else k): v for k, v in method.settings.items()}
    if fields["total_step"] is None:
        raise ValueError("PEFT's AdaLoraConfig requires total_step; build the method with "
                         "adalora(..., total_step=N), the number of steps it was trained for")
    init_r, alpha = fields["init_r"], fields["lora_alpha"]
    kept = rank_pattern(adapter)
    applied = tree.flatten(method.apply(params, adapter))
    tensors, pattern, targets = {}, {}, set()
    for path, weight in sorted((p, w) for p, w in applied.items() if isinstance(w, AdaloraWeight)):
        if weight.rank != init_r or not math.isclose(weight.scale, _scale(init_r, alpha), rel_tol=1e-12):
            raise ValueError(f"{path!r} has rank {weight.rank} and scale {weight.scale}, but PEFT's AdaLoRA has "
                             f"one init_r ({init_r}) and lora_alpha ({alpha}) for all modules; save an adapter "
                             "without per-rule rank or alpha")
        factors = {n: np.asarray(f, np.float32) for n, f in weight.factors.items()}
        keep = np.ones(factors["e"].shape, bool) if kept is None else kept[path]
        layers = [(path, factors, keep)]
        if stack.in_stack(path):
            layers = [(stack.unstacked_path(path, i), {n: f[i] for n, f in factors.items()}, keep[i])
                      for i in range(weight.shape[0])]
        for layer_path, f, k in layers:
            module = common.module_of(model, layer_path)
            a_IxR, b_RxO = f["a"].reshape(-1, init_r), f["b"].reshape(init_r, -1)
            tensors[f"{module}.lora_A"] = a_IxR[:, k].T
            tensors[f"{module}.lora_E"] = f["e"][k][:, None]
            tensors[f"{module}.lora_B"] = b_RxO[k].T
            targets.add(module)
            if kept is not None:
                pattern[f"{module}.lora_E"] = [bool(x) for x in k]
    if not tensors:
        return {}, {}
    config = {**fields, "target_modules": sorted(targets), "rank_pattern": pattern or None,
              "lora_dropout": 0.0, "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}
    return tensors, config


def _load(config: dict, modules: dict[str, dict[str, np.ndarray]], params: Any, model,
          problems: list[str]) -> tuple[Any, dict]:
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{what} are not supported ({key}={config[key]!r})")
    init_r, alpha = int(config.get("init_r", 12)), float(config.get("lora_alpha", 8))
    pattern = {k.removesuffix(".default"): v for k, v in (config.get("rank_pattern") or {}).items()}
    flat_params = common.unstacked_leaves(params)
    layouts = layouts_for(params, model=model)
    stacked = any(stack.in_stack(p) for p in tree.flatten(params))
    leaves, settings = {}, {}
    for path, tensors in sorted(modules.items()):
        module = common.module_of(model, path)
        if path not in flat_params:
            problems.append(f"{module}: an AdaLoRA adapter for the tied output head, which jpeft does not adapt")
            continue
        final = stack.stacked_path(path)[0] if stacked else path
        layout, shape = layouts[final], tuple(flat_params[path].shape)
        if layout.kind != "kernel":
            problems.append(f"{module}: AdaLoRA adapts linear layers only, and this weight is a {layout.kind}")
            continue
        lead = layout.lead - (1 if final != path else 0)
        d_in, d_out = shape[lead:lead + layout.inputs], shape[lead + layout.inputs:]
        size_in, size_out = math.prod(d_in), math.prod(d_out)
        keep = pattern.get(f"{module}.lora_E")
        keep = np.ones(init_r, bool) if keep is None else np.asarray(keep, bool).reshape(-1)
        if keep.shape != (init_r,):
            problems.append(f"{module}: rank_pattern has {keep.size} entries, but init_r is {init_r}")
            continue
        r = int(keep.sum())
        want = {"lora_A": (r, size_in), "lora_E": (r, 1), "lora_B": (size_out, r)}
        if set(tensors) != set(want):
            problems.append(f"{module}: has {', '.join(sorted(tensors))}, but AdaLoRA makes "
                            f"{', '.join(sorted(want))}")
            continue
        bad = [f"{t} {tuple(v.shape)} (want {want[t]})" for t, v in sorted(tensors.items()) if tuple(v.shape) != want[t]]
        if bad:
            problems.append(f"{module}: {', '.join(bad)} do not fit a weight {size_out} x {size_in} with "
                            f"{r} of init_r={init_r} triplets kept")
            continue
        a_IxR, e_R, b_RxO = (np.zeros((size_in, init_r), np.float32), np.zeros(init_r, np.float32),
                             np.zeros((init_r, size_out), np.float32))
        a_IxR[:, keep], e_R[keep], b_RxO[keep] = tensors["lora_A"].T, tensors["lora_E"][:, 0], tensors["lora_B"].T
        leaves[f"{path}/a"] = a_IxR.reshape(*d_in, init_r)
        leaves[f"{path}/e"] = e_R
        leaves[f"{path}/b"] = b_RxO.reshape(init_r, *d_out)
        settings.setdefault(final, set()).add((init_r, alpha))
    if problems:
        return None, {}
    schedule = {k: config[k] for k in _SCHEDULE if config.get(k) is not None}
    method = adalora(init_r=init_r, alpha=alpha, targets=common.rank_rules(settings), model=model, **schedule)
    return method, leaves


CODEC = common.PeftCodec("ADALORA", _TENSORS, _export, _load, "AdaLoRA factors")
