"""The Hugging Face PEFT LoRA adapter format, in both directions.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
(shape ``(r, in)``) and ``...lora_B.weight`` (``(out, r)``); embeddings use
``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``. jpeft's
factors are Flax-oriented (``A: (in, r)``, ``B: (r, out)``), so each is transposed.

PEFT itself loads a file with the wrong key prefix with only a warning and leaves
``B`` at zero (an adapter that silently does nothing). jpeft fails instead: every key
must map to a model weight, every weight needs both factors, and shapes must fit.

Example:
    >>> import jax, tempfile, jpeft
    >>> from jpeft.models import llama
    >>> c = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                       num_layers=2, num_heads=4, num_kv_heads=2)
    >>> params = llama.init_params(c, jax.random.key(0))
    >>> method = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v)_proj/kernel")
    >>> adapter = method.init(jax.random.key(1), params)
    >>> folder = tempfile.mkdtemp()
    >>> save_peft(folder, method, params, adapter)
    >>> method2, adapter2 = load_peft(folder, params)
    >>> sorted(jpeft.tree.flatten(adapter2)) == sorted(jpeft.tree.flatten(adapter))
    True
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jpeft import tree
from jpeft.io.hf import CheckpointError, hf_to_path, path_to_hf
from jpeft.methods.base import Method
from jpeft.methods.lora import LoraWeight, lora
from jpeft.tree import Rule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight"
                     r"|base_model\.model\.(?P<emodule>.+)\.(?P<efactor>lora_embedding_[AB])")
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
}


def _module_of(path: str) -> str:
    """HF module name (``model.layers.0.self_attn.q_proj``) of an unstacked jpeft weight path."""
    name, _ = path_to_hf(path)
    return name.removesuffix(".weight")


def _unstacked(params: Any, adapter: Any) -> tuple[dict, dict, int | None]:
    """Both trees with ``layers`` stacks split into ``layers_{i}`` (the HF naming)."""
    if "layers" not in params:
        return params, adapter, None
    from jpeft.models.llama import unstack_layers
    n = jax.tree_util.tree_leaves(params["layers"], is_leaf=lambda x: hasattr(x, "shape"))[0].shape[0]
    return unstack_layers(params, n), unstack_layers(adapter, n) if "layers" in adapter else adapter, n


def save_peft(folder: str | Path, method: Method, params: Any, adapter: Any, *,
              base_model_name_or_path: str | None = None) -> None:
    """Writes a LoRA adapter as a Hugging Face PEFT folder (loadable by ``PeftModel``).

    Each weight's scaling is written exactly as ``lora_alpha = scale * r`` (plain LoRA
    scaling), so rsLoRA and per-rule alphas survive the trip. ``params`` may be
    abstract (``jax.ShapeDtypeStruct``): only shapes are used.
    """
    if method.name != "lora":
        raise ValueError(f"the PEFT adapter format holds LoRA adapters; this is a {method.name!r} adapter")
    applied = tree.flatten(method.apply(params, adapter))
    wrapped = {p: w for p, w in applied.items() if isinstance(w, LoraWeight)}
    tensors, ranks, alphas = {}, {}, {}
    for path, weight in sorted(wrapped.items()):
        a, b = np.asarray(weight.a, np.float32), np.asarray(weight.b, np.float32)
        per_layer = [(path, a, b)]
        if a.ndim == 3 and path.startswith("layers/"):  # stacked layers: one module each
            per_layer = [(path.replace("layers/", f"layers_{i}/", 1), a[i], b[i]) for i in range(a.shape[0])]
        elif a.ndim != 2:
            raise ValueError(f"cannot write LoRA factors of shape {a.shape} for {path!r} as PEFT modules")
        for layer_path, a_2d, b_2d in per_layer:
            module = _module_of(layer_path)
            if weight.is_embedding:
                tensors[f"{PREFIX}{module}.lora_embedding_A"] = np.ascontiguousarray(a_2d.T)
                tensors[f"{PREFIX}{module}.lora_embedding_B"] = np.ascontiguousarray(b_2d.T)
            else:
                tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_2d.T)
                tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_2d.T)
            ranks[module] = int(a_2d.shape[-1])
            alphas[module] = float(weight.scale * a_2d.shape[-1])
    if not tensors:
        raise ValueError("the adapter has no LoRA factors to write")
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "bias": "none",
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
        "inference_mode": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches the end of a module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} holds a {config.get('peft_type')!r} adapter; only LORA is supported")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {what} are not supported ({key}={config[key]!r})")
    return config


def _read_factors(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{module: {"lora_A": ..., "lora_B": ..., "embedding": bool}}`` from the safetensors file."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (only safetensors adapters are read)")
    factors: dict[str, dict] = {}
    unexpected = []
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                match = _KEY_RE.fullmatch(key)
                if match is None:
                    unexpected.append(key)
                    continue
                module = match["module"] or match["emodule"]
                factor = (match["factor"] or match["efactor"])[-1]  # "A" or "B"
                entry = factors.setdefault(module, {"embedding": match["efactor"] is not None})
                entry[factor] = f.get_tensor(key).astype(np.float32)
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    if unexpected:
        raise CheckpointError(
            f"{path} has keys that are not LoRA factors under '{PREFIX}': {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}; was it saved for another model or format?")
    return factors


def load_peft(folder: str | Path, params: Any) -> tuple[Method, dict]:
    """Reads a Hugging Face PEFT LoRA folder as a jpeft ``(method, adapter)`` for ``params``.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``, stacked or not) decide the adapter's
    layout. Raises :class:`CheckpointError` naming every key that does not fit.
    """
    folder = Path(folder)
    config = _read_config(folder)
    factors = _read_factors(folder)
    flat_params = tree.flatten(_unstacked(params, {})[0])
    problems, flat_adapter, rules = [], {}, []
    for module, entry in sorted(factors.items()):
        suffix = "" if entry["embedding"] else ".weight"
        mapped = hf_to_path(module + ".weight")
        if mapped is None or mapped[0] not in flat_params:
            problems.append(f"{module}: no such weight in the model")
            continue
        path = mapped[0]
        if "A" not in entry or "B" not in entry:
            missing = "A" if "A" not in entry else "B"
            problems.append(f"{module}: lora_{'embedding_' if entry['embedding'] else ''}{missing}"
                            f"{suffix} is missing")
            continue
        a, b = entry["A"].T, entry["B"].T
        r, shape = a.shape[1], tuple(flat_params[path].shape)
        if a.shape != (shape[0], r) or b.shape != (r, shape[1]):
            problems.append(f"{module}: factors {entry['A'].shape} and {entry['B'].shape} do not fit "
                            f"a weight of shape {shape} (expected A ({r}, {shape[0]}), B ({shape[1]}, {r}))")
            continue
        flat_adapter[f"{path}/a"], flat_adapter[f"{path}/b"] = a, b
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        rules.append(Rule(re.escape(path), rank=r, alpha=float(alpha)))
    if problems:
        raise CheckpointError(f"PEFT adapter {folder} does not fit the model:\n  " + "\n  ".join(problems))
    if "layers" in params:
        flat_adapter, rules = _stack(flat_adapter, rules, _unstacked(params, {})[2])
    method = lora(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                  use_rslora=bool(config.get("use_rslora", False)), targets=rules)
    return method, tree.unflatten(flat_adapter)


def _stack(flat_adapter: dict, rules: list[Rule], num_layers: int) -> tuple[dict, list[Rule]]:
    """Per-layer factors and rules -> stacked ``layers/...`` ones (for ``scan_layers`` params)."""
    per_path: dict[str, dict[int, str]] = collections.defaultdict(dict)
    for path in flat_adapter:
        head, _, rest = path.partition("/")
        if head.startswith("layers_"):
            per_path[rest][int(head.removeprefix("layers_"))] = path
    settings = {rule.pattern: rule.settings for rule in rules}
    stacked = {p: v for p, v in flat_adapter.items() if not p.startswith("layers_")}
    new_rules = [rule for rule in rules if not rule.pattern.startswith("layers_")]
    for rest, layers in sorted(per_path.items()):
        weight = rest.rsplit("/", 1)[0]
        layer_settings = {repr(settings[re.escape(f"layers_{i}/{weight}")]) for i in layers}
        if len(layers) != num_layers or len(layer_settings) != 1:
            raise CheckpointError(
                f"the PEFT adapter adapts {weight!r} in {len(layers)} of {num_layers} layers or with "
                f"per-layer ranks/alphas, which stacked (scan_layers=True) params cannot hold; "
                f"load it onto params with scan_layers=False")
        stacked[f"layers/{rest}"] = np.stack([flat_adapter[layers[i]] for i in range(num_layers)])
        if rest.endswith("/a"):
            new_rules.append(Rule(re.escape(f"layers/{weight}"), **settings[re.escape(f"layers_0/{weight}")]))
    return stacked, new_rules
