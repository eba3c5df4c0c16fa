"""The common part of the Hugging Face PEFT format: the codec record, files, key prefixes, module names.

A PEFT adapter folder holds ``adapter_config.json`` (its ``peft_type`` names the method)
and ``adapter_model.safetensors`` with keys ``base_model.model.<module>.<tensor>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Module names come from
the model's Hugging Face name table, one layer at a time (:func:`module_of`). A method's
:class:`PeftCodec` (one module of :mod:`jpeft.io.peft` per method family) says which tensors
a module has, their layout and the method's config fields; :mod:`jpeft.io.peft.files` reads
and writes the folders.

Example:
    >>> listing(range(8), limit=3)
    '0, 1, 2 (and 5 more)'
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open

from jpeft import tree
from jpeft.errors import CheckpointError
from jpeft.layout import layouts_for
from jpeft import stack

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
            module of an unrolled weight path) plus the method's config fields (settings the
            adapter does not show come from ``method.settings``, the builder's arguments).
        load: ``(config, modules, params, model, problems) -> (method, adapter leaves)``:
            ``modules`` is ``{unrolled weight path: {tensor name: array}}``; the method must fit
            ``params`` (stacked or not) and the leaves may be per layer (they are restacked).
            What does not fit is appended to ``problems`` (one line each), not raised.
        describes: what the tensors are, for messages (``"LoRA factors"``).
        shared_keys: whole file keys of tensors that belong to no module (VeRA's
            ``base_model.vera_A``): ``export`` returns them under these keys, written as they
            are (no ``base_model.model.`` prefix), and ``load`` gets them as its keyword
            argument ``shared={key: array}`` (a missing one is absent from it).
        prefix: the key prefix of the file's module tensors (and of ``modules_to_save`` copies):
            ``base_model.model.`` for methods that wrap layers, ``base_model.`` for prompt learning
            (PEFT wraps no layer there, so the model sits one level higher).
    """

    peft_type: str
    tensor_names: tuple[str, ...]
    export: Callable[..., tuple[dict[str, np.ndarray], dict]]
    load: Callable[..., tuple[Any, dict]]
    describes: str = "adapter tensors"
    shared_keys: tuple[str, ...] = ()
    prefix: str = PREFIX


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


def hf_names(model):
    """The model's Hugging Face name table (:class:`jpeft.io.names.NameTable`); a ValueError when it has none."""
    names = getattr(model, "names", None)
    if names is None or names.hf is None:
        raise ValueError(f"the {getattr(model, 'name', '?')!r} model has no Hugging Face name table, so its "
                         "modules have no PEFT names")
    return names.hf


def module_of(model, path: str) -> str:
    """The Hugging Face module name of an unrolled weight path (``model.layers.0.self_attn.q_proj``)."""
    found = hf_names(model).to_name(path)
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
    prefix = codec.prefix
    saved = tuple(f"{prefix}{m}." for m in saved_modules)
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
                name = next((t for t in codec.tensor_names if key.startswith(prefix) and key.endswith("." + t)), None)
                if name is None:
                    unexpected.append(key)
                    continue
                modules[key[len(prefix):-len(name) - 1]][name] = f.get_tensor(key).astype(np.float32)
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    if unexpected:
        raise CheckpointError(
            f"{path} has {len(unexpected)} keys that are not {codec.describes} under '{prefix}': "
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


