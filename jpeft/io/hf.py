"""Load and save Llama-family models in the local Hugging Face folder format.

A folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (plus its shards). Tensors are read one at a time,
converted to jpeft's layout (Linear weights ``(out, in)`` -> Flax kernels ``(in, out)``)
and checked against the shapes the config implies. Anything missing, unexpected or
mis-shaped raises one :class:`CheckpointError` that names the tensors.

Quantize on load (QLoRA): ``quantize="nf4"`` (or a ``leaf_fn`` from
:func:`jpeft.quant.quantize_on_load`) turns each targeted weight into a
:class:`~jpeft.quant.QuantizedArray` as soon as it is complete, so the float model
is never held whole. With ``scan_layers=True`` a leaf is complete once all its layers
are in: tensors are read grouped by leaf (every layer's ``down_proj``, then every
``gate_proj``, ...), and the stack is quantized as one tensor under its final path
(``layers/mlp/down_proj/kernel``). So at most one float layer-stack of one tensor kind
is alive (plus the quantizer's working memory for it), and the result is bit-identical
to ``jpeft.quant.quantize`` of the float-loaded tree. (Quantizing each layer and
stacking would need less working memory but is not bit-identical: the double-quant
mean of the absmax is a float sum that XLA compiles differently per shape.)

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

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jpeft import ops, quant, tree
from jpeft.errors import CheckpointError
from jpeft.models import llama

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_LAYER_RE = re.compile(
    r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)"
    r"|model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight"
)
_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq")
_LAYER_PATH_RE = re.compile(r"layers_(\d+)/(.*)")

DEFAULT_QUANTIZE_TARGETS = r".*/(q|k|v|o|gate|up|down)_proj/kernel"
"""What ``quantize="nf4"`` quantizes: every linear kernel of the decoder layers. Norms,
biases, the embedding table and ``lm_head`` stay float, as in QLoRA / bitsandbytes."""




# ----------------------------------------------------------------------------- shared assembly


def _listing(items, limit: int = 5) -> str:
    items = sorted(items)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class ParamAssembler:
    """Collects converted tensors one at a time into a jpeft parameter tree.

    ``add(path, array, source)`` takes an unstacked jpeft path (``layers_3/mlp/up_proj/kernel``)
    and a numpy array already in jpeft layout; with ``config.scan_layers`` it is written into
    the stacked ``layers/...`` float buffer. As soon as a leaf is complete (its one tensor,
    or all layers of a stacked one) it becomes a ``jax.Array`` in ``dtype``, its numpy buffer
    is dropped, and ``leaf_fn(path, array)`` (default: keep it; see :func:`as_leaf_fn`) gives
    the leaf stored under its final path. ``finish()`` raises one :class:`CheckpointError`
    listing every problem, or returns the tree of leaves.

    Example:
        >>> c = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                       num_layers=1, num_heads=2, tie_word_embeddings=True)
        >>> a = ParamAssembler(c, jnp.float32, "demo")
        >>> a.add("norm/scale", np.ones(8), "output_norm")
        >>> a.finish()
        Traceback (most recent call last):
        ...
        jpeft.errors.CheckpointError: demo does not match the model: 10 missing (embed_tokens/embedding, ...
    """

    def __init__(self, config: llama.LlamaConfig, dtype, source: str, leaf_fn=None):
        self.config, self.dtype, self.source = config, jnp.dtype(dtype), source
        self.leaf_fn = leaf_fn or (lambda path, array: array)
        flat_config = dataclasses.replace(config, scan_layers=False)
        shapes = jax.eval_shape(llama.init_params, flat_config, jax.random.key(0))
        self.expected = {path: tuple(s.shape) for path, s in tree.flatten(shapes).items()}
        self.buffers: dict[str, np.ndarray] = {}  # stacked leaves still being filled
        self.filled: dict[str, int] = {}          # layers written into each buffer
        self.leaves: dict[str, object] = {}       # finished leaves, by final path
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        self.misshaped: list[str] = []

    def leaf_path(self, path: str) -> tuple[str, int | None]:
        """``(final path, layer index)``: ``layers/...`` and the layer for a stacked tensor."""
        match = _LAYER_PATH_RE.fullmatch(path)
        if self.config.scan_layers and match:
            return f"layers/{match.group(2)}", int(match.group(1))
        return path, None

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
        leaf_path, layer = self.leaf_path(path)
        if layer is None:
            self._emit(leaf_path, jnp.asarray(np.asarray(array).astype(self.dtype)))
            return None
        if leaf_path not in self.buffers:
            self.buffers[leaf_path] = np.empty((self.config.num_layers, *array.shape), self.dtype)
            self.filled[leaf_path] = 0
        self.buffers[leaf_path][layer] = array
        self.filled[leaf_path] += 1
        if self.filled[leaf_path] == self.config.num_layers:
            # The numpy buffer is freed once jnp.asarray returns, before leaf_fn runs.
            self._emit(leaf_path, jnp.asarray(self.buffers.pop(leaf_path)))
        return None

    def _emit(self, path: str, array: jax.Array):
        # Wait for it: with async dispatch, the next tensors would be read (and quantized)
        # while this one's float input and working memory are still alive.
        self.leaves[path] = jax.block_until_ready(self.leaf_fn(path, array))

    def finish(self) -> dict:
        """The parameter tree, or a CheckpointError naming every problem found.

        Then, if ``leaf_fn`` has ``check_all_used`` (a quantize-on-load hook), a rule
        that selected no tensor raises :class:`jpeft.RuleError`.
        """
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
        if hasattr(self.leaf_fn, "check_all_used"):
            self.leaf_fn.check_all_used()
        return tree.unflatten(self.leaves)

    def read_order(self, names, to_path) -> list[str]:
        """Source tensor names reordered so that each stacked leaf is completed before the next.

        ``to_path(name)`` gives ``(jpeft path, transpose?)`` or ``None``. Without
        ``scan_layers`` every tensor is its own leaf and the file order is kept.

        Example:
            >>> c = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
            ...                       num_layers=2, num_heads=2, scan_layers=True)
            >>> ParamAssembler(c, jnp.float32, "demo").read_order(
            ...     ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
            ...      "model.layers.1.mlp.up_proj.weight"], hf_to_path)  # doctest: +NORMALIZE_WHITESPACE
            ['model.layers.0.mlp.down_proj.weight', 'model.layers.0.mlp.up_proj.weight',
             'model.layers.1.mlp.up_proj.weight']
        """
        names = list(names)
        if not self.config.scan_layers:
            return names

        def key(name):
            target = to_path(name)
            if target is None:
                return "", 0
            leaf_path, layer = self.leaf_path(target[0])
            return leaf_path, layer or 0

        return sorted(names, key=key)


def as_leaf_fn(quantize):
    """The per-tensor hook for a loader's ``quantize=`` argument.

    ``None``: no quantization; a format name (``"nf4"``, ``"int4"``, ``"int8"``):
    :func:`jpeft.quant.quantize_on_load` of :data:`DEFAULT_QUANTIZE_TARGETS` with that
    format and its defaults (block size 64; double quantization for NF4); anything
    else is used as is: a ``leaf_fn(path, array) -> leaf``, typically from
    ``quantize_on_load(targets, format=..., block_size=...)``. It is called once per leaf
    of the final tree, with its final path and a ``jax.Array`` in the load ``dtype``
    (with ``scan_layers=True``, the whole ``(num_layers, ...)`` stack).

    Example:
        >>> as_leaf_fn("nf4").rules
        (Rule('.*/(q|k|v|o|gate|up|down)_proj/kernel'),)
    """
    if quantize is None or callable(quantize):
        return quantize
    if isinstance(quantize, str):
        return quant.quantize_on_load(DEFAULT_QUANTIZE_TARGETS, format=quantize)
    raise TypeError(f"quantize= takes None, a format name such as 'nf4', or a leaf_fn from "
                    f"jpeft.quant.quantize_on_load; got {type(quantize).__name__}")


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
        jpeft.errors.CheckpointError: No config.json in /nonexistent: expected a Hugging Face model folder.
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


def load_hf(folder: str | Path, *, dtype=jnp.float32, scan_layers: bool = False, quantize=None):
    """Load ``(LlamaConfig, params)`` from a local Hugging Face folder (safetensors).

    Parameters are cast to ``dtype`` (the config's ``param_dtype`` is set to it; the
    compute ``dtype`` stays float32: use ``dataclasses.replace`` to change it).
    A tied ``lm_head.weight`` stored anyway is ignored.

    ``quantize``: ``None``, a format name (``"nf4"`` quantizes
    :data:`DEFAULT_QUANTIZE_TARGETS`) or a ``leaf_fn`` from
    :func:`jpeft.quant.quantize_on_load`; each leaf is quantized as soon as it is read
    (see the module docstring). A target rule that selects no tensor raises
    :class:`jpeft.RuleError`; a weight the block size does not divide raises
    :class:`jpeft.quant.QuantizationError` naming it.

    Example:
        >>> load_hf("/nonexistent")
        Traceback (most recent call last):
        ...
        jpeft.errors.CheckpointError: No config.json in /nonexistent: expected a Hugging Face model folder.
    """
    folder = Path(folder)
    config = read_hf_config(folder, scan_layers=scan_layers, param_dtype=jnp.dtype(dtype).name)
    files = _tensor_files(folder)
    assembler = ParamAssembler(config, dtype, f"Checkpoint {folder}", as_leaf_fn(quantize))
    with contextlib.ExitStack() as stack:
        opened = {file: stack.enter_context(safe_open(file, framework="numpy")) for file in set(files.values())}
        for name in assembler.read_order(files, hf_to_path):
            _add_hf_tensor(assembler, config, name, opened[files[name]].get_tensor)
    return config, assembler.finish()


def _add_hf_tensor(assembler: ParamAssembler, config, name: str, read):
    if _IGNORED_RE.fullmatch(name) or (config.tie_word_embeddings and name == "lm_head.weight"):
        return
    target = hf_to_path(name)
    if target is None:
        assembler.reject(name)
        return
    path, transpose = target
    array = read(name)
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
    for path, leaf in tree.flatten(params).items():
        name, transpose = path_to_hf(path)
        array = np.asarray(ops.as_array(leaf))
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_hf(), indent=2))
