"""VeRA in the Hugging Face PEFT format (``peft_type: VERA``), both directions.

Per module PEFT stores ``vera_lambda_b (O,)`` and ``vera_lambda_d (r,)`` (no ``.weight``
suffix); the shared projections are two model-level tensors, ``base_model.vera_A (r, I_max)``
and ``base_model.vera_B (O_max, r)`` (torch-oriented, as :class:`jpeft.methods.vera.Projections`
holds them). A multi-axis kernel's ``lambda_b`` is flattened row-major, as PEFT's 2-d
``Linear`` sees the weight.

Written config: ``r``, ``target_modules`` (the adapted modules), ``projection_prng_key``,
``d_initial``, ``save_projection: true``, ``vera_dropout: 0``, ``bias: none``. Reading refuses
``save_projection: false`` (the pair would come from torch's generator, which jpeft cannot
replay), ``bias`` other than ``none``, ``fan_in_fan_out`` and ``modules_to_save``, and warns
that a ``vera_dropout`` is not reproduced when training on.

Example:
    >>> CODEC.peft_type, CODEC.shared_keys
    ('VERA', ('base_model.vera_A', 'base_model.vera_B'))
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np

from jpeft import tree
from jpeft.errors import CheckpointError
from jpeft.io.peft import common
from jpeft.methods.vera import Projections, VeraWeight, vera
from jpeft import stack

SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"
_TENSORS = ("vera_lambda_b", "vera_lambda_d")


def _export(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    applied = tree.flatten(method.apply(params, adapter))
    tensors, modules, pair, rank, d_initial = {}, [], None, None, None
    for path, weight in sorted((p, w) for p, w in applied.items() if isinstance(w, VeraWeight)):
        factors = {n: np.asarray(f, np.float32) for n, f in weight.factors.items()}
        layers = [(path, factors)]
        if stack.in_stack(path):
            layers = [(stack.unstacked_path(path, i), {n: f[i] for n, f in factors.items()})
                      for i in range(weight.shape[0])]
        for layer_path, f in layers:
            module = common.module_of(model, layer_path)
            tensors[f"{module}.vera_lambda_b"] = f["lambda_b"].reshape(-1)
            tensors[f"{module}.vera_lambda_d"] = f["lambda_d"]
            modules.append(module)
        pair, rank = weight.projections, weight.rank
    if not tensors:
        return {}, {}
    tensors[SHARED_A], tensors[SHARED_B] = pair.a, pair.b
    config = {
        "r": int(rank), "target_modules": sorted(modules), "projection_prng_key": 0, "save_projection": True,
        "vera_dropout": 0.0, "d_initial": 0.1, "fan_in_fan_out": False, "bias": "none", "init_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, **method.settings,
    }
    return tensors, config


def _load(config: dict, modules: dict[str, dict[str, np.ndarray]], params: Any, model, problems: list[str], *,
          shared: dict[str, np.ndarray]) -> tuple[Any, dict]:
    if not config.get("save_projection", True):
        raise CheckpointError("the VeRA adapter was saved with save_projection=false, so its projections would come "
                              "from torch's generator, which jpeft cannot replay; save it with save_projection=True")
    for key, ok in (("modules_to_save", not config.get("modules_to_save")),
                    ("bias", config.get("bias", "none") == "none"),
                    ("fan_in_fan_out", not config.get("fan_in_fan_out"))):
        if not ok:
            raise CheckpointError(f"VeRA adapters with {key}={config[key]!r} are not supported")
    if config.get("vera_dropout"):
        warnings.warn(f"the VeRA adapter was trained with vera_dropout={config['vera_dropout']}; its outputs load "
                      "exactly, but jpeft trains on without it", stacklevel=3)
    missing = [k for k in (SHARED_A, SHARED_B) if k not in shared]
    if missing:
        raise CheckpointError(f"the VeRA adapter file has no {', '.join(missing)} (the shared projections)")
    rank = int(config.get("r", 256))
    try:
        pair = Projections(shared[SHARED_A], shared[SHARED_B])
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if pair.rank != rank:
        problems.append(f"{SHARED_A} has r={pair.rank}, but the config says r={rank}")
        return None, {}
    leaves, finals = {}, set()
    for m in common.kernel_modules(model, params, modules, problems, "VeRA"):
        module, tensors, shape = m.module, m.tensors, m.shape
        d_in, d_out = shape[m.lead:m.lead + m.inputs], shape[m.lead + m.inputs:]
        if set(tensors) != set(_TENSORS):
            problems.append(f"{module}: has {', '.join(sorted(tensors))}, but a VeRA module has {', '.join(_TENSORS)}")
            continue
        want = {"vera_lambda_b": (math.prod(d_out),), "vera_lambda_d": (rank,)}
        bad = [f"{t} {tuple(v.shape)} (want {want[t]})" for t, v in sorted(tensors.items()) if tuple(v.shape) != want[t]]
        if math.prod(d_in) > pair.max_in or math.prod(d_out) > pair.max_out:
            bad.append(f"the projections A {pair.a.shape} / B {pair.b.shape} are smaller than the weight")
        if bad:
            problems.append(f"{module}: {', '.join(bad)} do not fit a weight of shape {shape} at r={rank}")
            continue
        leaves[f"{m.path}/lambda_b"] = tensors["vera_lambda_b"].reshape(d_out)
        leaves[f"{m.path}/lambda_d"] = tensors["vera_lambda_d"]
        finals.add(m.final)
    if problems:
        return None, {}
    method = vera(rank=rank, targets=[tree.Rule(re.escape(p)) for p in sorted(finals)],
                  d_initial=float(config.get("d_initial", 0.1)),
                  projection_prng_key=int(config.get("projection_prng_key", 0)), projections=pair, model=model)
    return method, leaves


CODEC = common.PeftCodec("VERA", _TENSORS, _export, _load, "VeRA vectors", shared_keys=(SHARED_A, SHARED_B))
