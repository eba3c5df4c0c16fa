"""The Hugging Face PEFT adapter format, in both directions, for any method that has a codec.

A PEFT adapter folder holds ``adapter_config.json`` (its ``peft_type`` names the method)
and ``adapter_model.safetensors`` with keys ``base_model.model.<module>.<tensor>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. This module does the
format's common part: files, the key prefix, module names (from the model's Hugging
Face name table, one layer at a time) and errors. A method's :class:`PeftCodec` (its
``Method.peft``) does the rest: which tensors a module has, their layout, and the
method's config fields.

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

import collections
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jpeft import tree
from jpeft.errors import CheckpointError
import jpeft.models.stack as stack

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SHOWN = 5


class PeftCodec(NamedTuple):
    """How one method's adapters are written as and read from PEFT files.

    Attributes:
        peft_type: the ``peft_type`` in ``adapter_config.json`` (``"LORA"``).
        tensor_names: every tensor name a module can have (``"lora_A.weight"``, ...).
        export: ``(method, params, adapter, model) -> (tensors, config)``: the adapter as
            ``{"<module>.<tensor>": array}`` (one layer at a time; :func:`module_of` names the
            module of an unrolled weight path) plus the method's config fields.
        load: ``(config, modules, params, model, problems) -> (method, adapter leaves)``:
            ``modules`` is ``{unrolled weight path: {tensor name: array}}``; the method must fit
            ``params`` (stacked or not) and the leaves may be per layer (they are restacked).
            What does not fit is appended to ``problems`` (one line each), not raised.
        describes: what the tensors are, for messages (``"LoRA factors"``).
        shared_keys: whole file keys of tensors that belong to no module (VeRA's
            ``base_model.vera_A``): ``export`` returns them under these keys, written as they
            are (no ``base_model.model.`` prefix), and ``load`` gets them as its keyword
            argument ``shared={key: array}`` (a missing one is absent from it).
    """

    peft_type: str
    tensor_names: tuple[str, ...]
    export: Callable[..., tuple[dict[str, np.ndarray], dict]]
    load: Callable[..., tuple[Any, dict]]
    describes: str = "adapter tensors"
    shared_keys: tuple[str, ...] = ()


_CODECS: dict[str, PeftCodec] = {}


def register_codec(codec: PeftCodec) -> PeftCodec:
    _CODECS[codec.peft_type] = codec
    return codec


def _codec_for(peft_type: str) -> PeftCodec:
    import jpeft.methods  # noqa: F401  (registers jpeft's own methods and their codecs)

    if peft_type not in _CODECS:
        raise CheckpointError(f"PEFT adapters of type {peft_type!r} are not supported; jpeft reads only "
                              f"{', '.join(sorted(_CODECS))}")
    return _CODECS[peft_type]


def listing(items, limit: int = _SHOWN) -> str:
    """``a, b, c (and 7 more)``: a readable excerpt of a long list."""
    items = list(items)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(map(str, items[:limit])) + more


def rank_rules(settings) -> list:
    """Target rules ``Rule(path, rank=, alpha=)`` from ``{param path: {(rank, alpha), ...}}`` read off a PEFT file.

    A stacked (scanned) parameter collects every layer's ``(rank, alpha)``; it can hold only
    one, so differing ones are a :class:`CheckpointError` naming the parameters.

    Example:
        >>> rank_rules({"layers/q_proj/kernel": {(8, 16.0)}})
        [Rule('layers/q_proj/kernel', rank=8, alpha=16.0)]
    """
    uneven = sorted(p for p, s in settings.items() if len(s) > 1)
    if uneven:
        raise CheckpointError(f"the PEFT adapter has per-layer ranks or alphas for {listing(uneven)}, "
                              "which stacked (scan_layers=True) params cannot hold; load it onto unstacked params")
    return [tree.Rule(re.escape(p), rank=r, alpha=a) for p, ((r, a),) in sorted(settings.items())]


# ----------------------------------------------------------------------------- module names


def _hf_names(model):
    names = getattr(model, "names", None)
    if names is None or names.hf is None:
        raise ValueError(f"the {getattr(model, 'name', '?')!r} model has no Hugging Face name table, so its "
                         "modules have no PEFT names")
    return names.hf


def module_of(model, path: str) -> str:
    """The Hugging Face module name of an unrolled weight path (``model.layers.0.self_attn.q_proj``)."""
    found = _hf_names(model).to_name(path)
    if found is None:
        raise ValueError(f"{path!r} has no Hugging Face name in the {model.name!r} name table")
    name = found[0]
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def unstacked_leaves(tree_: Any) -> dict:
    """A flat ``{path: array}`` with every ``layers`` stack split into ``layers_{i}`` entries."""
    out = {}
    for path, leaf in tree.flatten(tree_).items():
        if stack.in_stack(path):
            for i in range(leaf.shape[0]):
                out[stack.unstacked_path(path, i)] = leaf[i]
        else:
            out[path] = leaf
    return out


class KernelModule(NamedTuple):
    """One module of a PEFT file that adapts a linear layer (see :func:`kernel_modules`)."""

    path: str            # the unrolled weight path, ``layers_3/self_attn/q_proj/kernel``
    final: str           # that path in ``params`` (stacked: ``layers/self_attn/q_proj/kernel``)
    module: str          # the Hugging Face module name, for messages
    tensors: dict        # the file's tensors of this module, by name
    shape: tuple         # the weight's shape without the stacked layer axis
    lead: int            # its leading (batch) axes, then ``inputs`` input axes, then outputs
    inputs: int


def kernel_modules(model, params: Any, modules: dict, problems: list, method: str):
    """The file's ``modules`` that adapt a linear layer of ``params``, each as a :class:`KernelModule`.

    A module for the tied output head (no weight of its own in ``params``) or for a weight
    that is not a kernel is skipped with a line in ``problems`` naming ``method``. Codecs of
    methods that adapt kernels only (OFT, VeRA) read their modules through this.
    """
    from jpeft.layout import layouts_for  # jpeft.layout reads models; keep this module's imports light

    flat_params = unstacked_leaves(params)
    layouts = layouts_for(params, model=model)
    stacked = any(stack.in_stack(p) for p in tree.flatten(params))
    for path, tensors in sorted(modules.items()):
        module = module_of(model, path)
        if path not in flat_params:
            problems.append(f"{module}: a {method} adapter for the tied output head, which jpeft does not adapt")
            continue
        final = stack.stacked_path(path)[0] if stacked else path
        layout = layouts[final]
        if layout.kind != "kernel":
            problems.append(f"{module}: {method} adapts linear layers only here, and this weight is a {layout.kind}")
            continue
        yield KernelModule(path, final, module, tensors, tuple(flat_params[path].shape),
                           layout.lead - (1 if final != path else 0), layout.inputs)


def restack(flat_unstacked: dict, like: Any) -> dict:
    """Per-layer entries back into ``layers`` stacks where ``like`` (the params) stacks its layers.

    Raises:
        CheckpointError: when an entry exists for some layers of a stack only.
    """
    stacked_paths = {p for p in tree.flatten(like) if stack.in_stack(p)}
    if not stacked_paths:
        return dict(flat_unstacked)
    groups: dict[str, dict[int, Any]] = collections.defaultdict(dict)
    out = {}
    for path, value in flat_unstacked.items():
        final, index = stack.stacked_path(path)
        if index is None:
            out[path] = value
        else:
            groups[final][index] = value
    for final, layers in groups.items():
        n = max(layers) + 1
        if sorted(layers) != list(range(n)) or not _stack_length_fits(final, n, like):
            raise CheckpointError(f"{final!r} is adapted in layers {sorted(layers)} only, which stacked "
                                  "(scan_layers=True) params cannot hold; load it onto unstacked params")
        out[final] = np.stack([np.asarray(layers[i]) for i in range(n)])
    return out


def _stack_length_fits(final_path: str, n: int, like: Any) -> bool:
    """Whether the stack holding ``final_path`` has ``n`` layers (a model may have several stacks: T5's encoder, decoder)."""
    parts = final_path.split("/")
    scope = "/".join(parts[:parts.index(stack.STACK) + 1]) + "/"
    lengths = {leaf.shape[0] for p, leaf in tree.flatten(like).items() if p.startswith(scope)}
    return lengths == {n}


# ----------------------------------------------------------------------------- save


def save_peft(folder: str | os.PathLike, model, method, params: Any, adapter: Any, *,
              base_model_name_or_path: str | None = None) -> None:
    """Writes an adapter as a Hugging Face PEFT folder (loadable by ``PeftModel.from_pretrained``).

    ``params`` may be abstract (``jax.ShapeDtypeStruct``): only shapes are used. Methods
    without a PEFT codec are refused with a ValueError.
    """
    from jpeft.methods import heads

    codec = getattr(method, "peft", None)
    if codec is None:
        raise ValueError(f"the {method.name!r} method has no Hugging Face PEFT format")
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
    files = {(key if key in codec.shared_keys else f"{PREFIX}{key}"): np.ascontiguousarray(np.asarray(v, np.float32))
             for key, v in tensors.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(files, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


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
    from jpeft.io import names as names_lib

    out = {}
    for path, array in copies.items():
        found = _hf_names(model).to_name(path)
        if found is None or stack.in_stack(path):
            raise ValueError(f"{path!r} has no Hugging Face name, so it cannot be written as a PEFT module to save")
        out[found[0]] = names_lib.to_file(np.asarray(array, np.float32), found[1], model.config)
    return out


def _take_saved_modules(folder: Path, config: dict, model, params, problems: list) -> dict:
    """``{param path: array}`` of the ``modules_to_save`` tensors in the file (PEFT names them as the module's own).

    A listed module the model does not know is skipped (PEFT's task defaults list ``score`` for
    every classifier); one it knows whose tensors are not in the file is a problem.
    """
    from jpeft.io import names as names_lib

    modules = tuple(config.get("modules_to_save") or ())
    if not modules:
        return {}
    flat_params = tree.flatten(params)
    out, seen = {}, set()
    with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as f:
        for key in f.keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if not any(name.startswith(m + ".") and name.count(".") == m.count(".") + 1 for m in modules):
                continue
            found = _hf_names(model).to_path(name)
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
        if m not in seen and _hf_names(model).to_path(m + ".weight") is not None:
            problems.append(f"modules_to_save lists {m!r}, but the file holds none of its tensors")
    return out


# ----------------------------------------------------------------------------- load


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise CheckpointError(f"{path} has no peft_type; is it a PEFT adapter config?")
    return config


SHARED = ""
"""The entry of :func:`read_modules`' result that holds a codec's ``shared_keys`` tensors (by whole key)."""


def read_modules(folder: Path, codec: PeftCodec, saved_modules=()) -> dict[str, dict[str, np.ndarray]]:
    """``{module: {tensor name: array}}`` from the safetensors file; unknown keys are an error.

    Keys of whole ``saved_modules`` (PEFT's ``modules_to_save``, ``<module>.weight``) are skipped here;
    tensors under the codec's ``shared_keys`` are in the entry :data:`SHARED` (when there are any).
    """
    saved = tuple(f"{PREFIX}{m}." for m in saved_modules)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (only safetensors adapters are read)")
    modules: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    unexpected = []
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                if key in codec.shared_keys:
                    modules[SHARED][key] = f.get_tensor(key).astype(np.float32)
                    continue
                if key.startswith(saved) and key.count(".") == next(s for s in saved if key.startswith(s)).count("."):
                    continue
                name = next((t for t in codec.tensor_names if key.startswith(PREFIX) and key.endswith("." + t)), None)
                if name is None:
                    unexpected.append(key)
                    continue
                modules[key[len(PREFIX):-len(name) - 1]][name] = f.get_tensor(key).astype(np.float32)
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    if unexpected:
        raise CheckpointError(
            f"{path} has {len(unexpected)} keys that are not {codec.describes} under '{PREFIX}': "
            f"{listing(unexpected)}; was it saved for another model or format?")
    return dict(modules)


def layer_coverage(paths, flat_params: dict) -> list[str]:
    """Problems: a kind of module adapted in some of the model's layers only (e.g. an adapter for a shallower model).

    Example:
        >>> import numpy as np
        >>> params = {f"layers_{i}/q/kernel": np.zeros((2, 2)) for i in range(4)}
        >>> print(*layer_coverage(["layers_0/q/kernel", "layers_1/q/kernel"], params))
        layers_*/q/kernel is adapted in layers [0, 1] of the model's 4: layers [2, 3] have no adapter
    """
    def by_kind(items):
        out = collections.defaultdict(set)
        for path in items:
            final, index = stack.stacked_path(path)
            if index is not None:
                out[final].add(index)
        return out

    have, model_layers = by_kind(paths), by_kind(flat_params)
    problems = []
    for kind, layers in sorted(have.items()):
        missing = sorted(model_layers.get(kind, set()) - layers)
        if missing:
            name = kind.replace(f"{stack.STACK}/", "layers_*/", 1)
            problems.append(f"{name} is adapted in layers {sorted(layers)} of the model's "
                            f"{len(model_layers[kind])}: layers {missing} have no adapter")
    return problems


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
    codec = _codec_for(config["peft_type"])
    modules = read_modules(folder, codec, config.get("modules_to_save") or ())
    shared = modules.pop(SHARED, {})
    flat_params = unstacked_leaves(params)
    tied_heads = set(getattr(model, "tied_tables", {}).values())
    by_path, problems = {}, []
    for module, tensors in sorted(modules.items()):
        found = _hf_names(model).to_path(module + ".weight")
        if found is not None and found[0] in tied_heads:  # a tied head's copy: the codec checks it
            by_path[found[0]] = tensors
            continue
        if found is None or found[0] not in flat_params:
            problems.append(f"{module}: no such module in the {model.name!r} model")
            continue
        by_path[found[0]] = tensors
    if config.get("layers_to_transform") is None:
        problems.extend(layer_coverage([p for p in by_path if p in flat_params], flat_params))
    copies = _take_saved_modules(folder, config, model, params, problems)
    inner_config = {k: v for k, v in config.items() if k != "modules_to_save"}
    extra = {"shared": shared} if codec.shared_keys else {}
    method, flat_adapter = codec.load(inner_config, by_path, params, model, problems, **extra)
    if problems:
        raise CheckpointError(f"PEFT adapter {folder} does not fit the model ({len(problems)} problems): "
                              f"{listing(problems)}. Was it saved for another base model?")
    adapter = tree.unflatten(restack(flat_adapter, params))
    if copies:  # trained whole next to the method (jpeft.methods.heads)
        from jpeft.methods import heads

        method = heads.with_modules_to_save(method, [re.escape(p) for p in sorted(copies)])
        adapter = {**adapter, heads.KEY: tree.unflatten(copies)}
    return method, adapter
