"""Load Llama-architecture GGUF files (llama.cpp format) into jpeft parameters.

The file is memory-mapped by ``gguf.GGUFReader``; tensors are dequantized (Q4_1, Q8_0,
F16, ...) to float32 one at a time and converted to jpeft's layout:

* GGUF lists dims fastest-first, so a ``(out, in)`` matrix has ``tensor.shape == [in, out]``
  and its numpy data is ``(out, in)``, like a PyTorch Linear weight: transpose for a kernel.
* llama.cpp's converter interleaves the two rotary halves of every attention head in
  ``attn_q`` / ``attn_k`` rows (its RoPE pairs adjacent elements; Hugging Face pairs
  ``i`` with ``i + head_dim/2``). :func:`unpermute_rope_rows` undoes it.

``quantize=`` re-quantizes on load (e.g. to NF4 for QLoRA), one leaf at a time, exactly
as :func:`jpeft.io.hf.load_hf` does. The float32 values it starts from are the file's
dequantized ones (Q4_1 for SmolLM2), so NF4 here is a second rounding on top of the first.

Example:
    >>> from jpeft import assets
    >>> config, params = load_gguf(assets.smollm2_gguf_path())  # doctest: +SKIP
    >>> config.num_kv_heads  # doctest: +SKIP
    3
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from jpeft.io.hf import CheckpointError, ParamAssembler, as_leaf_fn
from jpeft.models import llama

_FIXED_NAMES = {
    "token_embd.weight": "embed_tokens/embedding",
    "output_norm.weight": "norm/scale",
    "output.weight": "lm_head/kernel",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn/q_proj",
    "attn_k": "self_attn/k_proj",
    "attn_v": "self_attn/v_proj",
    "attn_output": "self_attn/o_proj",
    "ffn_gate": "mlp/gate_proj",
    "ffn_up": "mlp/up_proj",
    "ffn_down": "mlp/down_proj",
}
_BLOCK_NORMS = {"attn_norm": "input_layernorm/scale", "ffn_norm": "post_attention_layernorm/scale"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def unpermute_rope_rows(weight_RxC: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (per head: interleaved pairs -> two halves).

    Rows of a head are stored as ``(head_dim/2, 2)`` pairs; Hugging Face stores ``(2, head_dim/2)``.
    Works for weights ``(rows, in)`` and biases ``(rows,)``.

    Example:
        >>> unpermute_rope_rows(np.arange(8), 2).tolist()
        [0, 2, 1, 3, 4, 6, 5, 7]
    """
    rows = weight_RxC.shape[0]
    half = rows // num_heads // 2
    per_head = weight_RxC.reshape(num_heads, half, 2, *weight_RxC.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight_RxC.shape)


def gguf_to_path(name: str) -> tuple[str, bool] | None:
    """``(jpeft path, transpose?)`` for a GGUF tensor name, ``None`` if unknown.

    Example:
        >>> gguf_to_path("blk.2.ffn_down.weight")
        ('layers_2/mlp/down_proj/kernel', True)
    """
    if name in _FIXED_NAMES:
        return _FIXED_NAMES[name], name == "output.weight"
    match = _BLOCK_RE.fullmatch(name)
    if match is None:
        return None
    layer, part, kind = match.groups()
    if part in _BLOCK_NORMS and kind == "weight":
        return f"layers_{layer}/{_BLOCK_NORMS[part]}", False
    if part in _BLOCK_NAMES:
        leaf = "kernel" if kind == "weight" else "bias"
        return f"layers_{layer}/{_BLOCK_NAMES[part]}/{leaf}", kind == "weight"
    return None


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _float32_value(value) -> float:
    """GGUF stores float32: recover the shortest decimal that gives it back (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _vocab_size(reader: gguf.GGUFReader, arch: str) -> int:
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    size = _field(reader, f"{arch}.vocab_size")
    if size is None:
        raise CheckpointError("GGUF metadata has neither tokenizer.ggml.tokens nor a vocab_size.")
    return int(size)


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> dict:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (only none and linear).")


def gguf_config(reader: gguf.GGUFReader, **overrides) -> llama.LlamaConfig:
    """A :class:`LlamaConfig` from the ``llama.*`` metadata of an open GGUF file.

    Example:
        >>> from jpeft import assets
        >>> gguf_config(gguf.GGUFReader(assets.smollm2_gguf_path())).rope_theta  # doctest: +SKIP
        100000.0
    """
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"Only GGUF architecture 'llama' is supported, got {arch!r}.")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("Partial rotary embeddings (rope.dimension_count != head_dim) are not supported.")
    names = {t.name for t in reader.tensors}
    fields = dict(
        vocab_size=_vocab_size(reader, arch),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_float32_value(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )
    fields.update(overrides)
    return llama.LlamaConfig(**fields)


def _dequantize(tensor) -> np.ndarray:
    """float32 data of a GGUF tensor in numpy (slowest-first) order."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    expected = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(data, np.float32).reshape(expected)


def _to_jpeft(tensor, config: llama.LlamaConfig) -> tuple[str, np.ndarray] | None:
    target = gguf_to_path(tensor.name)
    if target is None:
        return None
    path, transpose = target
    array = _dequantize(tensor)
    if "/q_proj/" in path:
        array = unpermute_rope_rows(array, config.num_heads)
    elif "/k_proj/" in path:
        array = unpermute_rope_rows(array, config.num_kv_heads)
    return path, array.T if transpose else array


def load_gguf(path: str | Path, *, dtype=jnp.float32, scan_layers: bool = False, quantize=None):
    """Load ``(LlamaConfig, params)`` from a llama-architecture GGUF file, dequantized to ``dtype``.

    Tied embeddings when the file has no ``output.weight``. Raises :class:`CheckpointError`
    for missing / unexpected / mis-shaped tensors and ValueError for unsupported metadata.
    ``quantize``: ``None``, a format name or a ``leaf_fn``, as in :func:`jpeft.io.hf.load_hf`.

    Example:
        >>> from jpeft import assets
        >>> config, params = load_gguf(assets.smollm2_gguf_path(), quantize="nf4")  # doctest: +SKIP
        >>> params["layers_0"]["self_attn"]["k_proj"]["kernel"]  # doctest: +SKIP
        QuantizedArray(format='nf4', shape=(576, 192), dtype=float32, block_size=64, axis=-2, double_quant=True)
    """
    reader = gguf.GGUFReader(path)
    config = gguf_config(reader, scan_layers=scan_layers, param_dtype=jnp.dtype(dtype).name)
    assembler = ParamAssembler(config, dtype, f"GGUF file {path}", as_leaf_fn(quantize))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    for name in assembler.read_order(tensors, gguf_to_path):
        converted = _to_jpeft(tensors[name], config)
        if converted is None:
            assembler.reject(name)
        else:
            assembler.add(*converted, name)
    return config, assembler.finish()


def load_gguf_tokenizer(path: str | Path):
    """A ``transformers`` fast tokenizer built from the GGUF metadata (works offline).

    Example:
        >>> from jpeft import assets
        >>> load_gguf_tokenizer(assets.smollm2_gguf_path()).eos_token  # doctest: +SKIP
        '<|im_end|>'
    """
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
