"""OFT in the Hugging Face PEFT format (``peft_type: OFT``, PEFT 0.14 and later), both directions.

Per module PEFT stores ``oft_R.weight (n or 1, b(b-1)/2)``: each block's strict upper triangle,
row-major, the same vector jpeft trains (no transpose). Written config: ``oft_block_size``, ``r``,
``block_share``, ``use_cayley_neumann``, ``num_cayley_neumann_terms`` (the method's settings),
``target_modules``, and ``coft: false``, ``module_dropout: 0``, ``bias: none``. Reading refuses
files from PEFT before 0.14 (no ``oft_block_size``), ``coft``, ``bias``, ``fan_in_fan_out`` and
``modules_to_save``, and warns that a ``module_dropout`` is not reproduced when training on.

Example:
    >>> CODEC.peft_type, CODEC.tensor_names
    ('OFT', ('oft_R.weight',))
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
from jpeft.methods.oft import OftWeight, blocks, oft
from jpeft import stack

_SETTINGS = {"block_size": "oft_block_size", "r": "r", "block_share": "block_share",
             "use_cayley_neumann": "use_cayley_neumann", "num_cayley_neumann_terms": "num_cayley_neumann_terms"}



def _export(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    """Per module ``oft_R.weight (n or 1, b(b-1)/2)``: the same vector, no transpose."""
    applied = tree.flatten(method.apply(params, adapter))
    tensors = {}
    for path, weight in sorted((p, w) for p, w in applied.items() if isinstance(w, OftWeight)):
        vec = np.asarray(weight.factors["R"], np.float32)
        layers = [(path, vec)]
        if stack.in_stack(path):
            layers = [(stack.unstacked_path(path, i), vec[i]) for i in range(weight.shape[0])]
        for layer_path, v in layers:
            tensors[f"{common.module_of(model, layer_path)}.oft_R.weight"] = v
    if not tensors:
        return {}, {}
    config = {"target_modules": sorted(k.rsplit(".oft_R", 1)[0] for k in tensors), "module_dropout": 0.0,
              "coft": False, "eps": 6e-5, "init_weights": True, "fan_in_fan_out": False, "bias": "none",
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
              "peft_version": "0.21.2",
              **{ours: method.settings[name] for name, ours in _SETTINGS.items()}}     # the parameterization implemented here (PEFT >= 0.18)
    return tensors, config


def _load(config: dict, modules: dict[str, dict[str, np.ndarray]], params: Any, model,
          problems: list[str]) -> tuple[Any, dict]:
    if "oft_block_size" not in config:
        raise CheckpointError("the OFT adapter has no oft_block_size: it was saved by PEFT before 0.14, whose OFT "
                              "jpeft does not read")
    for key, ok in (("coft", not config.get("coft")), ("modules_to_save", not config.get("modules_to_save")),
                    ("bias", config.get("bias", "none") == "none"), ("fan_in_fan_out", not config.get("fan_in_fan_out"))):
        if not ok:
            raise CheckpointError(f"OFT adapters with {key}={config[key]!r} are not supported")
    if config.get("module_dropout"):
        warnings.warn(f"the OFT adapter was trained with module_dropout={config['module_dropout']}; its outputs load "
                      "exactly, but jpeft trains on without it", stacklevel=3)
    block_size, r = int(config.get("oft_block_size", 32)), int(config.get("r", 0))
    share = bool(config.get("block_share", False))
    leaves, finals = {}, set()
    for m in common.kernel_modules(model, params, modules, problems, "OFT"):
        module, tensors = m.module, m.tensors
        in_size = math.prod(m.shape[m.lead:m.lead + m.inputs])
        size, count = blocks(in_size, block_size, r)
        want = (1 if share else count, size * (size - 1) // 2)
        got = tuple(tensors["oft_R.weight"].shape)
        if got != want:
            problems.append(f"{module}: oft_R.weight {got} does not fit {in_size} inputs in blocks of {size} "
                            f"(want {want})")
            continue
        leaves[f"{m.path}/R"] = tensors["oft_R.weight"]
        finals.add(m.final)
    if problems:
        return None, {}
    method = oft(block_size=block_size, r=r, targets=[tree.Rule(re.escape(p)) for p in sorted(finals)],
                 block_share=share, use_cayley_neumann=bool(config.get("use_cayley_neumann", True)),
                 num_cayley_neumann_terms=int(config.get("num_cayley_neumann_terms", 5)), model=model)
    return method, leaves


CODEC = common.PeftCodec("OFT", ("oft_R.weight",), _export, _load, "OFT rotations")
