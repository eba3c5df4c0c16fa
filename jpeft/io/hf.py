"""Load and save Llama-family models in the local Hugging Face folder format.

A folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (plus its shards). Tensors are read one at a time,
converted to jpeft's layout (Linear weights ``(out, in)`` -> Flax kernels ``(in, out)``)
and checked against the shapes the config implies. Anything missing, unexpected or
mis-shaped raises one :class:`CheckpointError` that names the tensors.

Example:
    >>> import tempfile, jax
    >>> from jpeft.models import llama
    >>> c = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                       num_layers=2, num_heads=4, num_kv_heads=2)
    >>> folder = tempfile.mkdtemp()
    >>> save_hf(folder, c, llama.init_params(c, jax.random.key(0)))
    >>> config, params = load_hf(folder, scan_layers=True)
    >>> params["layers"]["self_attn"]["k_proj"]["kernel"].shape
    (2, 16, 8)
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jpeft import ops
from jpeft.models import llama

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_LAYER_RE = re.compile(
    r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)"
    r"|model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight"
)
_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


# ----------------------------------------------------------------------------- shared assembly


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: dict) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _listing(items, limit: int = 5) -> str:
    items = sorted(items)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class ParamAssembler:
    """Collects converted tensors one at a time into a jpeft parameter tree.

    ``add(path, array, source)`` takes an unstacked jpeft path (``layers_3/mlp/up_proj/kernel``)
    and a numpy array already in jpeft layout; with ``config.scan_layers`` it is written into
    the stacked ``layers/...`` buffer. ``finish()`` raises one :class:`CheckpointError` listing
    every problem, or returns the tree of ``jax.Array`` in ``dtype``.

    Example:
        >>> c = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                       num_layers=1, num_heads=2, tie_word_embeddings=True)
        >>> a = ParamAssembler(c, jnp.float32, "demo")
        >>> a.add("norm/scale", np.ones(8), "output_norm")
        >>> a.finish()
        Traceback (most recent call last):
        ...
        jpeft.io.hf.CheckpointError: demo does not match the model: 10 missing (embed_tokens/embedding, ...
    """

    def __init__(self, config: llama.LlamaConfig, dtype, source: str):
        self.config, self.dtype, self.source = config, jnp.dtype(dtype), source
        flat_config = dataclasses.replace(config, scan_layers=False)
        shapes = jax.eval_shape(llama.init_params, flat_config, jax.random.key(0))
        self.expected = {path: tuple(s.shape) for path, s in _flatten(shapes).items()}
        self.arrays: dict[str, object] = {}
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        self.misshaped: list[str] = []

    def reject(self, name: str):
        """Record a source tensor that has no place in the model."""
        self.unexpected.append(name)

    def add(self, path: str, array: np.ndarray, name: str):
        """Check and store one tensor (``name`` is its name in the source file)."""
        if path not in self.expected:
            return self.reject(name)
        if tuple(array.shape) != self.expected[path]:
            self.misshaped.append(f"{name} -> {path}: got {tuple(array.shape)}, expected {self.expected[path]}")
            return None
        if path in self.seen:
            return self.reject(f"{name} (duplicate)")
        self.seen.add(path)
        self._store(path, np.asarray(array).astype(self.dtype))
        return None

    def _store(self, path: str, array: np.ndarray):
        match = re.fullmatch(r"layers_(\d+)/(.*)", path)
        if not (self.config.scan_layers and match):
            self.arrays[path] = jnp.asarray(array)
            return
        stacked_path = f"layers/{match.group(2)}"
        if stacked_path not in self.arrays:
            self.arrays[stacked_path] = np.empty((self.config.num_layers, *array.shape), self.dtype)
        self.arrays[stacked_path][int(match.group(1))] = array

    def finish(self) -> dict:
        """The parameter tree, or a CheckpointError naming every problem found."""
        missing = sorted(set(self.expected) - self.seen)
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_listing(missing)})")
        if self.unexpected:
            problems.append(f"{len(self.unexpected)} unexpected ({_listing(self.unexpected)})")
        if self.misshaped:
            problems.append(f"{len(self.misshaped)} mis-shaped ({_listing(self.misshaped, 3)})")
        if problems:
            c = self.config
            raise CheckpointError(
                f"{self.source} does not match the model: " + "; ".join(problems)
                + f". Expected the {len(self.expected)} tensors of a {c.model_type} model with "
                f"num_layers={c.num_layers}, hidden_size={c.hidden_size}, vocab_size={c.vocab_size}, "
                f"tie_word_embeddings={c.tie_word_embeddings}, attention_bias={c.attention_bias}."
            )
        return _unflatten({path: jnp.asarray(a) for path, a in self.arrays.items()})


# ----------------------------------------------------------------------------- names


def hf_to_path(name: str) -> tuple[str, bool] | None:
    """``(jpeft path, transpose?)`` for a Hugging Face tensor name, ``None`` if unknown.

    Example:
        >>> hf_to_path("model.layers.3.self_attn.q_proj.weight")
        ('layers_3/self_attn/q_proj/kernel', True)
    """
    fixed = {
        "model.embed_tokens.weight": ("embed_tokens/embedding", False),
        "model.norm.weight": ("norm/scale", False),
        "lm_head.weight": ("lm_head/kernel", True),
    }
    if name in fixed:
        return fixed[name]
    match = _LAYER_RE.fullmatch(name)
    if match is None:
        return None
    if match.group(1) is not None:
        layer, block, proj, kind = match.group(1, 2, 3, 4)
        leaf = "kernel" if kind == "weight" else "bias"
        return f"layers_{layer}/{block}/{proj}/{leaf}", kind == "weight"
    layer, norm = match.group(5, 6)
    return f"layers_{layer}/{norm}/scale", False


def path_to_hf(path: str) -> tuple[str, bool]:
    """Inverse of :func:`hf_to_path` for unstacked jpeft paths.

    Example:
        >>> path_to_hf("layers_0/mlp/down_proj/kernel")
        ('model.layers.0.mlp.down_proj.weight', True)
    """
    fixed = {"embed_tokens/embedding": "model.embed_tokens.weight", "norm/scale": "model.norm.weight",
             "lm_head/kernel": "lm_head.weight"}
    if path in fixed:
        return fixed[path], path.endswith("kernel")
    layer, *rest = path.split("/")
    leaf = {"kernel": "weight", "bias": "bias", "scale": "weight"}[rest[-1]]
    name = ".".join(["model.layers", layer.removeprefix("layers_"), *rest[:-1], leaf])
    return name, rest[-1] == "kernel"


# ----------------------------------------------------------------------------- load


def read_hf_config(folder: str | Path, **overrides) -> llama.LlamaConfig:
    """The :class:`LlamaConfig` of a local Hugging Face folder.

    Example:
        >>> read_hf_config("/nonexistent")
        Traceback (most recent call last):
        ...
        jpeft.io.hf.CheckpointError: No config.json in /nonexistent: expected a Hugging Face model folder.
    """
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"No {CONFIG_FILE} in {folder}: expected a Hugging Face model folder.")
    return llama.LlamaConfig.from_hf(json.loads(config_path.read_text()), **overrides)


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS_FILE
    if not single.is_file():
        raise CheckpointError(
            f"No {WEIGHTS_FILE} or {INDEX_FILE} in {folder} (only safetensors checkpoints are supported)."
        )
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def _by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for name, file in files.items():
        grouped.setdefault(file, []).append(name)
    return grouped


def load_hf(folder: str | Path, *, dtype=jnp.float32, scan_layers: bool = False):
    """Load ``(LlamaConfig, params)`` from a local Hugging Face folder (safetensors).

    Parameters are cast to ``dtype`` (the config's ``param_dtype`` is set to it; the
    compute ``dtype`` stays float32: use ``dataclasses.replace`` to change it).
    A tied ``lm_head.weight`` stored anyway is ignored.

    Example:
        >>> load_hf("/nonexistent")
        Traceback (most recent call last):
        ...
        jpeft.io.hf.CheckpointError: No config.json in /nonexistent: expected a Hugging Face model folder.
    """
    folder = Path(folder)
    config = read_hf_config(folder, scan_layers=scan_layers, param_dtype=jnp.dtype(dtype).name)
    files = _tensor_files(folder)
    assembler = ParamAssembler(config, dtype, f"Checkpoint {folder}")
    for file, names in _by_file(files).items():
        with safe_open(file, framework="numpy") as f:
            for name in names:
                _add_hf_tensor(assembler, config, name, lambda: f.get_tensor(name))
    return config, assembler.finish()


def _add_hf_tensor(assembler: ParamAssembler, config, name: str, read):
    if _IGNORED_RE.fullmatch(name) or (config.tie_word_embeddings and name == "lm_head.weight"):
        return
    target = hf_to_path(name)
    if target is None:
        assembler.reject(name)
        return
    path, transpose = target
    array = read()
    assembler.add(path, array.T if transpose else array, name)


# ----------------------------------------------------------------------------- save


def save_hf(folder: str | Path, config: llama.LlamaConfig, params: dict) -> None:
    """Write ``config.json`` and ``model.safetensors`` (HF layout) for ``params``.

    Wrapped leaves (LoRA, quantized) are materialized. Stacked (scan) params are unstacked.

    Example:
        >>> import tempfile
        >>> c = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> save_hf(tempfile.mkdtemp(), c, llama.init_params(c, jax.random.key(0)))
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config.scan_layers:
        params = llama.unstack_layers(params, config.num_layers)
    tensors = {}
    for path, leaf in _flatten(params).items():
        name, transpose = path_to_hf(path)
        array = np.asarray(ops.as_array(leaf))
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_hf(), indent=2))
