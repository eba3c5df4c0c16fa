"""The Llama family's checkpoint formats: Hugging Face ``config.json`` and GGUF metadata, and tensor names.

Kept apart from :mod:`jpeft.models.llama` (the model) because it is about files: which
``config.json`` keys become which config fields, which GGUF metadata keys, and how each
format names every tensor (:class:`jpeft.models.names.NameTable`, data the shared loaders read).

Example:
    >>> fields_from_hf({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
    ...                 "num_hidden_layers": 1, "num_attention_heads": 2})["attention_bias"]
    True
    >>> HF_NAMES.to_path("model.layers.3.self_attn.q_proj.weight")[0]
    'layers_3/self_attn/q_proj/kernel'
"""

from __future__ import annotations

import numpy as np

from jpeft.models.names import NameRule, NameTable
from jpeft.models import blocks

MODEL_TYPES = ("llama", "mistral", "qwen2")


# ----------------------------------------------------------------------------- config.json


def _check_hf_features(d: dict):
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Only hidden_act='silu' is supported, got {d['hidden_act']!r}.")
    if d.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported.")
    if d.get("model_type") == "qwen2" and d.get("use_sliding_window"):
        raise ValueError("Qwen2 use_sliding_window=True (per-layer windows) is not supported.")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise ValueError("pretraining_tp > 1 is not supported.")


def _hf_rope(d: dict) -> tuple[float, dict]:
    """(rope_theta, rope_scaling dict) from old (rope_theta/rope_scaling) or new (rope_parameters) keys."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"Per-layer-type rope_parameters are not supported: {params!r}.")
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported.")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, {}
    scaling = {"rope_type": rope_type, **params}
    blocks.check_rope_scaling(scaling)
    return theta, scaling


def fields_from_hf(d: dict) -> dict:
    """``LlamaConfig`` fields from a ``config.json`` dict (llama, mistral, qwen2).

    Mistral's ``sliding_window`` is honoured (by token position). Raises ValueError for
    other model types, non-SiLU activations, MLP biases, per-layer sliding windows (Qwen2
    ``use_sliding_window``) and RoPE types other than default, linear and llama3.
    """
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"Unsupported model_type {model_type!r}; supported: {MODEL_TYPES}.")
    _check_hf_features(d)
    rope_theta, rope_scaling = _hf_rope(d)
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"), rope_theta=rope_theta,
        rope_scaling=rope_scaling, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
        attention_out_bias=model_type == "llama" and bool(d.get("attention_bias", False)),
        sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
        model_type=model_type,
    )


def _check_hf_expressible(c) -> None:
    expressible = {
        "llama": c.attention_bias == c.attention_out_bias,
        "mistral": not (c.attention_bias or c.attention_out_bias),
        "qwen2": c.attention_bias and not c.attention_out_bias,
    }
    if not expressible[c.model_type]:
        raise ValueError(
            f"attention_bias={c.attention_bias}, attention_out_bias={c.attention_out_bias} cannot be written as "
            f"a {c.model_type!r} config.json (llama: both or neither; qwen2: q/k/v only; mistral: none).")
    if c.sliding_window is not None and c.model_type != "mistral":
        raise ValueError("Only model_type='mistral' can express sliding_window in config.json.")


def to_hf(c) -> dict:
    """A ``config.json`` dict for a ``LlamaConfig`` (inverse of :func:`fields_from_hf`)."""
    _check_hf_expressible(c)
    architecture = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[c.model_type]
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **dict(c.rope_scaling)}
    out = dict(
        architectures=[f"{architecture}ForCausalLM"], model_type=c.model_type, vocab_size=c.vocab_size,
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        hidden_act="silu", rope_theta=c.rope_theta, rope_parameters=rope, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        dtype=c.param_dtype,
    )
    if c.model_type == "llama":
        out.update(attention_bias=c.attention_bias, mlp_bias=False)
    if c.model_type == "mistral":
        out.update(sliding_window=c.sliding_window)
    if c.model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


# ----------------------------------------------------------------------------- GGUF metadata


def _float32_value(value) -> float:
    """GGUF stores float32: recover the shortest decimal that gives it back (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def fields_from_gguf(meta: dict, tensor_names: set[str]) -> dict:
    """``LlamaConfig`` fields from a GGUF file's ``llama.*`` metadata and its tensor names."""
    arch = meta.get("general.architecture")
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("Partial rotary embeddings (rope.dimension_count != head_dim) are not supported.")
    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else get("vocab_size")
    if vocab is None:
        raise ValueError("GGUF metadata has neither tokenizer.ggml.tokens nor a vocab_size.")
    kind = get("rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (only none and linear).")
    return dict(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim, rope_theta=_float32_value(get("rope.freq_base", 10000.0)),
        rope_scaling={"rope_type": "linear", "factor": float(get("rope.scaling.factor"))} if kind == "linear" else {},
        rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names, attention_bias="blk.0.attn_q.bias" in tensor_names)


# ----------------------------------------------------------------------------- tensor names


def unpermute_rope_rows(rows_last, num_heads: int, *, inverse: bool = False):
    """Undo (or, with ``inverse``, redo) llama.cpp's interleaving of each head's rotary halves.

    llama.cpp's converter stores a head's q/k rows as ``(head_dim/2, 2)`` pairs; Hugging Face
    as ``(2, head_dim/2)``. Works along the last axis: a transposed kernel ``(in, rows)`` or a
    bias ``(rows,)``.

    Example:
        >>> unpermute_rope_rows(np.arange(8), 2).tolist()
        [0, 2, 1, 3, 4, 6, 5, 7]
    """
    shape = rows_last.shape
    half = shape[-1] // num_heads // 2
    pairs = (num_heads, 2, half) if inverse else (num_heads, half, 2)
    return rows_last.reshape(*shape[:-1], *pairs).swapaxes(-1, -2).reshape(shape)


def _rope_q(array, config, to_model):
    return unpermute_rope_rows(array, config.num_heads, inverse=not to_model)


def _rope_k(array, config, to_model):
    return unpermute_rope_rows(array, config.num_kv_heads, inverse=not to_model)


_HF_LAYER = "model.layers.{layer}"
HF_NAMES = NameTable((
    NameRule("model.embed_tokens.weight", "embed_tokens/embedding"),
    NameRule("model.norm.weight", "norm/scale"),
    NameRule("lm_head.weight", "lm_head/kernel", transpose=True, optional=True),
    NameRule(_HF_LAYER + ".{block}.{proj}.weight", "layers_{layer}/{block}/{proj}/kernel", transpose=True),
    NameRule(_HF_LAYER + ".{block}.{proj}.bias", "layers_{layer}/{block}/{proj}/bias"),
    NameRule(_HF_LAYER + ".{norm}.weight", "layers_{layer}/{norm}/scale"),
), ignored=(r".*rotary_emb\.inv_freq",))

_GGUF_BLOCKS = {"attn_q": "self_attn/q_proj", "attn_k": "self_attn/k_proj", "attn_v": "self_attn/v_proj",
                "attn_output": "self_attn/o_proj", "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj",
                "ffn_down": "mlp/down_proj"}
_GGUF_ROPE = {"attn_q": _rope_q, "attn_k": _rope_k}
GGUF_NAMES = NameTable((
    NameRule("token_embd.weight", "embed_tokens/embedding"),
    NameRule("output_norm.weight", "norm/scale"),
    NameRule("output.weight", "lm_head/kernel", transpose=True),
    NameRule("blk.{layer}.attn_norm.weight", "layers_{layer}/input_layernorm/scale"),
    NameRule("blk.{layer}.ffn_norm.weight", "layers_{layer}/post_attention_layernorm/scale"),
    *(NameRule(f"blk.{{layer}}.{g}.weight", f"layers_{{layer}}/{p}/kernel", True, _GGUF_ROPE.get(g))
      for g, p in _GGUF_BLOCKS.items()),
    *(NameRule(f"blk.{{layer}}.{g}.bias", f"layers_{{layer}}/{p}/bias", False, _GGUF_ROPE.get(g))
      for g, p in _GGUF_BLOCKS.items()),
))
