"""Load and save models in the local Hugging Face folder format (``config.json`` + safetensors).

A folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (plus its shards). The ``model_type`` in
``config.json`` picks the model family (:mod:`jpeft.models.families`); the family's
name table maps every tensor to a parameter path and layout (Linear weights
``(out, in)`` -> Flax kernels ``(in, out)``). Tensors are read one at a time and checked
against the shapes the config implies; anything missing, unexpected or mis-shaped
raises one :class:`CheckpointError` that names the tensors.

Quantize on load (QLoRA): ``quantize="nf4"`` (or a ``leaf_fn`` from
:func:`jpeft.quant.quantize_on_load`) turns each targeted weight into a
:class:`~jpeft.quant.QuantizedArray` as soon as it is complete, so the float model
is never held whole. With stacked layers a leaf is complete once all its layers are in:
tensors are read grouped by leaf, and the stack is quantized as one tensor under its
final path (``layers/mlp/down_proj/kernel``), bit-identical to ``jpeft.quant.quantize``
of the float-loaded tree.

Example:
    >>> import tempfile, jax
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                       num_layers=2, num_heads=4, num_kv_heads=2))
    >>> folder = tempfile.mkdtemp()
    >>> save_hf(folder, model, model.init(jax.random.key(0)))
    >>> loaded, params = load_hf(folder, scan_layers=True)
    >>> loaded.name, params["layers"]["self_attn"]["k_proj"]["kernel"].shape
    ('llama', (2, 16, 8))
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jpeft import ops, quant, tree
from jpeft.errors import CheckpointError
from jpeft.models import names as names_lib
from jpeft.io import writing
from jpeft.io.assembler import ParamAssembler
from jpeft import stack
from jpeft.models.model import Model
from jpeft.models.families import family_for_hf

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def as_leaf_fn(quantize, model: Model | None = None):
    """The per-tensor hook for a loader's ``quantize=`` argument.

    ``None``: no quantization; a format name (``"nf4"``, ``"int4"``, ``"int8"``):
    :func:`jpeft.quant.quantize_on_load` of every kernel inside the layers
    (:func:`jpeft.quant.layer_kernels`) with that format and its defaults (block size 64;
    double quantization for NF4); a dict: that function's keyword arguments, e.g.
    ``{"format": "nf4", "block_size": 32}``; anything else is used as is: a
    ``leaf_fn(path, array) -> leaf``. It is called once per leaf of the final tree, with
    its final path and a ``jax.Array`` in the load ``dtype``.

    Example:
        >>> as_leaf_fn("nf4").rules
        (Rule('layer_kernels'),)
        >>> as_leaf_fn({"format": "int4", "block_size": 32}).defaults["block_size"]
        32
    """
    if quantize is None or callable(quantize):
        return quantize
    if isinstance(quantize, str):
        return quant.quantize_on_load(None, format=quantize, model=model)
    if isinstance(quantize, dict):
        return quant.quantize_on_load(**{"targets": None, **quantize, "model": model})
    raise TypeError(f"quantize= takes None, a format name such as 'nf4', a dict of quantize_on_load settings, "
                    f"or a leaf_fn from "
                    f"jpeft.quant.quantize_on_load; got {type(quantize).__name__}")


def _hf_table(model: Model) -> names_lib.NameTable:
    if model.names is None or model.names.hf is None:
        raise ValueError(f"the {model.name!r} family has no Hugging Face name table")
    return model.names.hf


# ----------------------------------------------------------------------------- load


def read_hf_config(folder: str | Path, **overrides) -> Model:
    """The :class:`~jpeft.models.Model` a local Hugging Face folder's ``config.json`` describes.

    Example:
        >>> read_hf_config("/nonexistent")
        Traceback (most recent call last):
        ...
        jpeft.errors.CheckpointError: No Hugging Face model folder at /nonexistent: it does not exist
    """
    config_path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"No Hugging Face model folder at {folder}: " + (
            "it is a file; give the folder that holds config.json" if Path(folder).exists() else "it does not exist"))
    if not config_path.is_file():
        raise CheckpointError(f"No {CONFIG_FILE} in {folder}: expected a Hugging Face model folder.")
    try:
        config_dict = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, not {type(config_dict).__name__}")
    try:
        family = family_for_hf(config_dict.get("model_type"))
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    try:
        return Model(family, family.names.from_hf_config(config_dict, **overrides))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{config_path} lacks or mistypes a field the {family.name!r} family needs: "
                              f"{err}") from None
    except ValueError as err:
        raise CheckpointError(f"{config_path} describes a model jpeft cannot run: {err}") from None


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err})") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS_FILE
    if not single.is_file():
        raise CheckpointError(
            f"No {WEIGHTS_FILE} or {INDEX_FILE} in {folder} (only safetensors checkpoints are supported).")
    try:
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{single} is not a readable safetensors file: {err}") from None


def load_hf(folder: str | Path, *, dtype=jnp.float32, quantize=None, **overrides) -> tuple[Model, Any]:
    """Load ``(model, params)`` from a local Hugging Face folder (safetensors).

    Parameters are cast to ``dtype`` (the config's ``param_dtype`` is set to it; the
    compute ``dtype`` stays as the config says). ``overrides`` change config fields
    (``scan_layers=True``). A tied ``lm_head.weight`` stored anyway is ignored.

    ``quantize``: ``None``, a format name (``"nf4"`` quantizes every kernel inside the
    layers) or a ``leaf_fn`` from :func:`jpeft.quant.quantize_on_load`; each leaf is
    quantized as soon as it is read (see the module docstring).

    Example:
        >>> load_hf("/nonexistent")
        Traceback (most recent call last):
        ...
        jpeft.errors.CheckpointError: No Hugging Face model folder at /nonexistent: it does not exist
    """
    folder = Path(folder)
    model = read_hf_config(folder, param_dtype=jnp.dtype(dtype).name, **overrides)
    files = _tensor_files(folder)
    table = _hf_table(model)
    assembler = ParamAssembler(model, dtype, f"Checkpoint {folder}", as_leaf_fn(quantize, model))
    with contextlib.ExitStack() as stack_:
        try:
            opened = {file: stack_.enter_context(safe_open(file, framework="numpy")) for file in set(files.values())}
            for name in assembler.read_order(files, table):
                assembler.add_named(table, name, opened[files[name]].get_tensor)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read the tensors of {folder} (a damaged or truncated .safetensors file?): "
                                  f"{err}") from None
    return model, assembler.finish()


# ----------------------------------------------------------------------------- save


def _per_layer(params: Any) -> dict:
    """``{unrolled path: leaf}``: every ``layers`` stack, at any depth (``encoder/layers``), split per layer."""
    out = {}
    for path, leaf in tree.flatten(params).items():
        if stack.in_stack(path):
            array = ops.as_array(leaf)
            out.update({stack.unstacked_path(path, i): array[i] for i in range(array.shape[0])})
        else:
            out[path] = leaf
    return out


def save_hf(folder: str | Path, model: Model, params: Any) -> None:
    """Write ``config.json`` and ``model.safetensors`` (Hugging Face layout) for ``params``.

    Wrapped leaves (LoRA, quantized) are materialized; stacked layers are unstacked.
    """
    folder = writing.output_folder(folder, what="the model")
    table = _hf_table(model)
    tensors = {}
    for path, leaf in _per_layer(params).items():
        found = table.to_name(path)
        if found is None:
            raise ValueError(f"{path!r} has no Hugging Face name in the {model.name!r} name table")
        name, rule = found
        array = names_lib.to_file(np.asarray(ops.as_array(leaf)), rule, model.config)
        tensors[name] = np.ascontiguousarray(array)
    config = json.dumps(model.names.to_hf_config(model.config), indent=2)
    writing.write_whole(folder / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    writing.write_whole(folder / CONFIG_FILE, lambda path: path.write_text(config))
