"""Reading and writing Hugging Face PEFT adapter folders, for every method with a codec (:mod:`jpeft.io.peft.codecs`).

Hugging Face PEFT itself loads a file with the wrong key prefix with only a warning and
leaves ``B`` at zero (an adapter that silently does nothing). jpeft fails instead: every
key must map to a model weight, every weight needs all of its tensors, and shapes must fit.

Example:
    >>> import jax, tempfile, jpeft
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                       num_layers=2, num_heads=4, num_kv_heads=2))
    >>> params = model.init(jax.random.key(0))
    >>> method = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v)_proj/kernel", model=model)
    >>> adapter = method.init(jax.random.key(1), params)
    >>> folder = tempfile.mkdtemp()
    >>> save_peft(folder, model, method, params, adapter)
    >>> method2, adapter2 = load_peft(folder, model, params)
    >>> sorted(jpeft.tree.flatten(adapter2)) == sorted(jpeft.tree.flatten(adapter))
    True
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jpeft import tree
from jpeft.errors import CheckpointError
from jpeft.io import names as names_lib, writing
from jpeft.io.peft import codecs
from jpeft.io.peft.common import (CONFIG_FILE, SHARED, WEIGHTS_FILE, hf_names, layer_coverage, listing,
                                  read_config, read_modules, restack, unstacked_leaves)
from jpeft.methods import heads
from jpeft import stack


# ----------------------------------------------------------------------------- save


def save_peft(folder: str | os.PathLike, model, method, params: Any, adapter: Any, *,
              base_model_name_or_path: str | None = None) -> None:
    """Writes an adapter as a Hugging Face PEFT folder (loadable by ``PeftModel.from_pretrained``).

    ``params`` may be abstract (``jax.ShapeDtypeStruct``): only shapes are used. Methods
    without a PEFT codec are refused with a ValueError.
    """
    codec = codecs.for_method(method.name)
    adapter, copies = heads.split(adapter)
    tensors, config = codec.export(method, params, adapter, model)
    if not tensors:
        raise ValueError("the adapter has no tensors to write")
    if copies:  # PEFT's modules_to_save: whole weights under their own names
        saved = _saved_module_tensors(model, copies)
        tensors.update(saved)
        config["modules_to_save"] = sorted({name.rsplit(".", 1)[0] for name in saved})
    config = {"peft_type": codec.peft_type, "task_type": task_type(model),
              "base_model_name_or_path": base_model_name_or_path, **config, "inference_mode": True}
    files = {(key if key in codec.shared_keys else f"{codec.prefix}{key}"): np.ascontiguousarray(np.asarray(v, np.float32))
             for key, v in tensors.items()}
    folder = writing.output_folder(folder, what="a PEFT adapter")
    writing.write_whole(folder / WEIGHTS_FILE, lambda path: save_file(files, str(path), metadata={"format": "pt"}))
    writing.write_whole(folder / CONFIG_FILE, lambda path: path.write_text(json.dumps(config, indent=2)))


def task_type(model) -> str:
    """PEFT's ``task_type`` for a model: ``SEQ_CLS`` with a classification head, ``FEATURE_EXTRACTION`` for
    another encoder, ``SEQ_2_SEQ_LM`` for an encoder-decoder, else ``CAUSAL_LM``."""
    if getattr(model, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    family = getattr(model, "family", None)
    if family is not None and family.classify is not None:
        return "SEQ_CLS" if getattr(model.config, "num_labels", 0) else "FEATURE_EXTRACTION"
    return "CAUSAL_LM"


def _saved_module_tensors(model, copies: dict) -> dict[str, np.ndarray]:
    """``{"<module>.weight": array}`` of whole trained weights (PEFT writes modules_to_save under the module's own name)."""
    out = {}
    for path, array in copies.items():
        found = hf_names(model).to_name(path)
        if found is None or stack.in_stack(path):
            raise ValueError(f"{path!r} has no Hugging Face name, so it cannot be written as a PEFT module to save")
        out[found[0]] = names_lib.to_file(np.asarray(array, np.float32), found[1], model.config)
    return out


def _take_saved_modules(folder: Path, config: dict, model, params, problems: list, prefix: str) -> dict:
    """``{param path: array}`` of the ``modules_to_save`` tensors in the file (PEFT names them as the module's own).

    A listed module the model does not know is skipped (PEFT's task defaults list ``score`` for
    every classifier); one it knows whose tensors are not in the file is a problem.
    """
    modules = tuple(config.get("modules_to_save") or ())
    if not modules:
        return {}
    flat_params = tree.flatten(params)
    out, seen = {}, set()
    with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as f:
        for key in f.keys():
            name = key.removeprefix(prefix)
            if not any(name.startswith(m + ".") and name.count(".") == m.count(".") + 1 for m in modules):
                continue
            found = hf_names(model).to_path(name)
            if found is None or found[0] not in flat_params:
                problems.append(f"{name}: a module to save that the {model.name!r} model does not have")
                continue
            array = names_lib.to_model(f.get_tensor(key).astype(np.float32), found[1], model.config)
            if tuple(array.shape) != tuple(flat_params[found[0]].shape):
                problems.append(f"{name}: shape {tuple(array.shape)}, but the model's {found[0]!r} is "
                                f"{tuple(flat_params[found[0]].shape)} (a head for another number of labels?)")
                continue
            out[found[0]] = array
            seen.add(next(m for m in modules if name.startswith(m + ".")))
    for m in modules:  # a module the model has but the file does not: its trained weights are missing
        if m not in seen and hf_names(model).to_path(m + ".weight") is not None:
            problems.append(f"modules_to_save lists {m!r}, but the file holds none of its tensors")
    return out


def load_peft(folder: str | os.PathLike, model, params: Any, *, base_model: str | None = None) -> tuple[Any, dict]:
    """Reads a Hugging Face PEFT folder as a jpeft ``(method, adapter)`` for ``model``'s ``params``.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``, stacked or not) decide the adapter's
    layout. Raises :class:`CheckpointError` naming the keys that do not fit, and when a
    kind of module is adapted in only some of the model's layers (an adapter saved for a
    shallower model) unless ``adapter_config.json`` says so (``layers_to_transform``).
    ``base_model``: the name or path of the base the caller loaded; a different
    ``base_model_name_or_path`` in the adapter's config is a warning.
    """
    folder = Path(folder)
    config = read_config(folder)
    saved_base = config.get("base_model_name_or_path")
    if base_model and saved_base and str(saved_base) != str(base_model):
        warnings.warn(f"PEFT adapter {folder} was saved for base model {saved_base!r}, and is loaded onto "
                      f"{base_model!r}; shapes are checked, but the weights may not be the ones it was trained on",
                      stacklevel=2)
    codec = codecs.for_peft_type(config["peft_type"])
    modules = read_modules(folder, codec, config.get("modules_to_save") or ())
    shared = modules.pop(SHARED, {})
    flat_params = unstacked_leaves(params)
    tied_heads = set(getattr(model, "tied_tables", {}).values())
    by_path, problems = {}, []
    for module, tensors in sorted(modules.items()):
        found = hf_names(model).to_path(module + ".weight")
        if found is not None and found[0] in tied_heads:  # a tied head's copy: the codec checks it
            by_path[found[0]] = tensors
            continue
        if found is None or found[0] not in flat_params:
            problems.append(f"{module}: no such module in the {model.name!r} model")
            continue
        by_path[found[0]] = tensors
    if config.get("layers_to_transform") is None:
        problems.extend(layer_coverage([p for p in by_path if p in flat_params], flat_params))
    copies = _take_saved_modules(folder, config, model, params, problems, codec.prefix)
    inner_config = {k: v for k, v in config.items() if k != "modules_to_save"}
    extra = {"shared": shared} if codec.shared_keys else {}
    method, flat_adapter = codec.load(inner_config, by_path, params, model, problems, **extra)
    if problems:
        raise CheckpointError(f"PEFT adapter {folder} does not fit the model ({len(problems)} problems): "
                              f"{listing(problems)}. Was it saved for another base model?")
    adapter = tree.unflatten(restack(flat_adapter, params))
    if copies:  # trained whole next to the method (jpeft.methods.heads)
        method = heads.with_modules_to_save(method, [re.escape(p) for p in sorted(copies)])
        adapter = {**adapter, heads.KEY: tree.unflatten(copies)}
    return method, adapter
