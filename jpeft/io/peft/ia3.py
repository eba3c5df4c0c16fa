"""IA3 in the Hugging Face PEFT format (``peft_type: IA3``), both directions.

Per module PEFT stores one vector ``ia3_l`` (no ``.weight`` suffix): ``(out, 1)`` for a layer
whose output it scales (keys, values), ``(1, in)`` for a module listed in
``feedforward_modules``, whose input it scales (the feed-forward intermediate activation).
jpeft's vector has the kernel's output (or input) axes, flattened row-major here as PEFT's
2-d ``Linear`` sees the weight.

Written config: ``target_modules`` and ``feedforward_modules`` (the adapted modules by their
full names), ``init_ia3_weights: true``, ``fan_in_fan_out: false``. Reading decides which
modules scale their input by ``feedforward_modules`` as PEFT does (a list: a module name that
ends with an entry; a string: a regex that matches the whole name), checks that the vector's
shape says the same, and refuses ``fan_in_fan_out``.

Example:
    >>> CODEC.peft_type, CODEC.tensor_names
    ('IA3', ('ia3_l',))
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from jpeft import tree
from jpeft.errors import CheckpointError
from jpeft.io.peft import common
from jpeft.methods.ia3 import Ia3Weight, ia3
from jpeft import stack

_TENSOR = "ia3_l"


def _export(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    applied = tree.flatten(method.apply(params, adapter))
    kernels = tree.flatten(adapter)  # ".../kernel/ia3_l": the bias of a kernel is scaled by the same vector
    tensors, targets, feedforward = {}, [], []
    for path, weight in sorted((p, w) for p, w in applied.items() if isinstance(w, Ia3Weight)):
        if f"{path}/{_TENSOR}" not in kernels:
            continue
        vec = np.asarray(weight.scale, np.float32)
        layers = [(path, vec)]
        if stack.in_stack(path):
            layers = [(stack.unstacked_path(path, i), vec[i]) for i in range(vec.shape[0])]
        for layer_path, v in layers:
            module = common.module_of(model, layer_path)
            flat = v.reshape(-1)
            tensors[f"{module}.{_TENSOR}"] = flat[None, :] if weight.on_input else flat[:, None]
            targets.append(module)
            if weight.on_input:
                feedforward.append(module)
    if not tensors:
        return {}, {}
    config = {"target_modules": sorted(targets), "feedforward_modules": sorted(feedforward),
              "init_ia3_weights": True, "fan_in_fan_out": False, "modules_to_save": None, "exclude_modules": None}
    return tensors, config


def is_feedforward(module: str, feedforward_modules) -> bool:
    """PEFT's test: a list entry that ends the module name (at a dot), or a string regex that matches it whole.

    Example:
        >>> is_feedforward("model.layers.0.mlp.down_proj", ["down_proj"]), is_feedforward("a.down_proj", r".*up_proj")
        (True, False)
    """
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module) is not None
    return any(module == m or module.endswith("." + m) for m in feedforward_modules)


def _load(config: dict, modules: dict[str, dict[str, np.ndarray]], params: Any, model,
          problems: list[str]) -> tuple[Any, dict]:
    if config.get("fan_in_fan_out"):
        raise CheckpointError(f"IA3 adapters with fan_in_fan_out={config['fan_in_fan_out']!r} (Conv1D layers) are "
                              "not supported")
    ff_config = config.get("feedforward_modules")
    leaves, finals = {}, {}
    for m in common.kernel_modules(model, params, modules, problems, "IA3"):
        on_input = is_feedforward(m.module, ff_config)
        d_in, d_out = m.shape[m.lead:m.lead + m.inputs], m.shape[m.lead + m.inputs:]
        if set(m.tensors) != {_TENSOR}:
            problems.append(f"{m.module}: has {', '.join(sorted(m.tensors))}, but an IA3 module has {_TENSOR}")
            continue
        want = (1, math.prod(d_in)) if on_input else (math.prod(d_out), 1)
        got = tuple(m.tensors[_TENSOR].shape)
        if got != want:
            role = "in feedforward_modules, so it scales the input" if on_input else \
                "not in feedforward_modules, so it scales the output"
            problems.append(f"{m.module}: ia3_l {got} does not fit a weight {math.prod(d_out)} x {math.prod(d_in)} "
                            f"{role} (want {want})")
            continue
        leaves[f"{m.path}/{_TENSOR}"] = m.tensors[_TENSOR].reshape(d_in if on_input else d_out)
        if finals.setdefault(m.final, on_input) != on_input:
            problems.append(f"{m.module}: scales its input in some layers and its output in others, which stacked "
                            "(scan_layers=True) params cannot hold; load it onto unstacked params")
    if problems:
        return None, {}
    rule = lambda p: tree.Rule(re.escape(p))  # noqa: E731
    method = ia3(targets=[rule(p) for p in sorted(finals)],
                 feedforward=[rule(p) for p, on_input in sorted(finals.items()) if on_input], model=model)
    return method, leaves


CODEC = common.PeftCodec("IA3", (_TENSOR,), _export, _load, "IA3 vectors")
