"""Llama-family decoder (Llama, Mistral, Qwen2) as plain functions over a param tree.

The model is a nested dict of arrays (Flax naming: ``kernel`` is ``(in, out)``) and
a few pure functions. Every weight use goes through :mod:`jpeft.ops`, so a leaf can
be a plain array or a :class:`jpeft.ops.WeightWrapper` (LoRA, quantized, ...).

Parameter tree ('/'-joined paths; names follow Hugging Face)::

    embed_tokens/embedding                         (vocab, D)
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel     (D, N*H) (D, K*H) (D, K*H) (N*H, D)
    layers_{i}/self_attn/{q,k,v}_proj/bias         only with ``attention_bias`` (Qwen2)
    layers_{i}/self_attn/o_proj/bias               only with ``attention_out_bias`` (HF Llama)
    layers_{i}/mlp/{gate,up,down}_proj/kernel      (D, F) (D, F) (F, D)
    layers_{i}/{input,post_attention}_layernorm/scale   (D,)
    norm/scale                                     (D,)
    lm_head/kernel                                 (D, vocab), only when untied

With ``scan_layers=True`` the ``layers_{i}`` subtrees become one ``layers`` subtree
whose leaves carry a leading ``(num_layers,)`` axis, and :func:`forward` runs
``jax.lax.scan`` over it.

Hook points: optional entries that input and adapter methods (:mod:`jpeft.methods`)
add to the tree and that the model uses when they are present::

    prompt/embeddings                              (n, D) virtual tokens before the input
    layers_{i}/self_attn/prefix/{key,value}        (n, K*H) per-layer key/value prefix
    layers_{i}/attn_adapter, layers_{i}/mlp_adapter  callables h_BxTxD -> h_BxTxD applied
                                                   to the attention / MLP block output

Prompt tokens and prefix keys take ``n`` leading slots of the sequence (positions
``0..n-1``; the real tokens start at position ``n``): they count against
``max_position_embeddings`` and occupy the first ``n`` slots of a KV cache.
:func:`forward` returns outputs for the real tokens only.

Logical axis names used by :func:`param_axes`:

* ``"vocab"``: vocabulary rows of the embedding / columns of the LM head;
* ``"embed"``: the model (residual stream) dimension D;
* ``"q_heads"``: flattened query heads x head_dim (q_proj output, o_proj input);
* ``"kv_heads"``: flattened key/value heads x head_dim (k_proj / v_proj output);
* ``"mlp"``: the SwiGLU hidden dimension F;
* ``"norm"``: RMSNorm scales (normally replicated);
* ``"layers"``: the stacked layer axis when ``scan_layers=True``.

Example:
    >>> import jax
    >>> from jpeft.models import llama
    >>> config = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                            num_layers=2, num_heads=4, num_kv_heads=2)
    >>> params = llama.init_params(config, jax.random.key(0))
    >>> logits_BxTxV, _ = llama.forward(params, config, jax.numpy.ones((1, 5), "int32"))
    >>> logits_BxTxV.shape
    (1, 5, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- config


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder.

    Registered as a static pytree (no leaves), so it passes through ``jax.jit``,
    ``jax.eval_shape`` etc. as compile-time metadata.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads: sizes.
      num_kv_heads: key/value heads (GQA); ``None`` means ``num_heads``.
      head_dim: per-head size; ``None`` means ``hidden_size // num_heads``.
      rope_theta: RoPE base wavelength.
      rope_scaling: ``()`` for plain RoPE, or sorted ``(key, value)`` pairs (a dict is
        accepted and converted) with ``rope_type`` ``"linear"`` or ``"llama3"``.
      rms_norm_eps: RMSNorm epsilon.
      max_position_embeddings: context length the model was trained for (informational).
      tie_word_embeddings: the LM head reuses ``embed_tokens/embedding``.
      attention_bias: q/k/v projections have biases (Qwen2; HF Llama's ``attention_bias``).
      attention_out_bias: o_proj has a bias too (HF Llama's ``attention_bias``, not Qwen2).
      sliding_window: Mistral-style local attention window (a query attends to keys
        whose position is less than ``sliding_window`` behind it); ``None`` = full.
      model_type: ``"llama"``, ``"mistral"`` or ``"qwen2"``; only used by :meth:`to_hf`.
      scan_layers: stack layers and run them with ``jax.lax.scan``.
      remat: rematerialize each layer in the backward pass (``jax.checkpoint``).
      dtype: compute dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
      param_dtype: dtype name of parameters made by :func:`init_params`.

    Example:
        >>> LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...             num_layers=1, num_heads=4, num_kv_heads=2).head_dim
        4
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: Any = ()
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        self._normalize()
        self._validate_sizes()
        self._validate_options()

    def _normalize(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None and _positive_int(self.num_heads):
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                    f"({self.num_heads}); pass head_dim explicitly."
                )
            set_("head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        set_("rope_scaling", tuple(tuple(item) for item in (self.rope_scaling or ())))
        for name in ("dtype", "param_dtype"):
            set_(name, jnp.dtype(getattr(self, name)).name)

    def _validate_sizes(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")

    def _validate_options(self):
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive.")
        if self.sliding_window is not None and not _positive_int(self.sliding_window):
            raise ValueError(f"sliding_window must be None or a positive int, got {self.sliding_window!r}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}.")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}.")
        if self.rope_scaling:
            _check_rope_scaling(dict(self.rope_scaling))

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a ``jnp.dtype``."""
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, config_dict: dict, **overrides) -> "LlamaConfig":
        """Build a config from a Hugging Face ``config.json`` dict (llama, mistral, qwen2).

        Mistral's ``sliding_window`` is honoured (by token position). Raises ValueError
        for other model types, non-SiLU activations, MLP biases, per-layer sliding
        windows (Qwen2 ``use_sliding_window``) and RoPE types other than default,
        linear and llama3. ``overrides`` replace fields (e.g. ``scan_layers=True``).

        Example:
            >>> LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            ...     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}).num_kv_heads
            4
        """
        model_type = config_dict.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}."
            )
        _check_hf_features(config_dict)
        rope_theta, rope_scaling = _hf_rope(config_dict)
        fields = dict(
            vocab_size=config_dict["vocab_size"],
            hidden_size=config_dict["hidden_size"],
            intermediate_size=config_dict["intermediate_size"],
            num_layers=config_dict["num_hidden_layers"],
            num_heads=config_dict["num_attention_heads"],
            num_kv_heads=config_dict.get("num_key_value_heads"),
            head_dim=config_dict.get("head_dim"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=config_dict.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config_dict.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config_dict.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(config_dict.get("attention_bias", False)),
            attention_out_bias=model_type == "llama" and bool(config_dict.get("attention_bias", False)),
            sliding_window=config_dict.get("sliding_window") if model_type == "mistral" else None,
            model_type=model_type,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` dict for this config (inverse of :meth:`from_hf`).

        Example:
            >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
            ...                 num_layers=1, num_heads=4)
            >>> LlamaConfig.from_hf(c.to_hf()) == c
            True
        """
        self._check_hf_expressible()
        architecture = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[self.model_type]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
        out = dict(
            architectures=[f"{architecture}ForCausalLM"],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rope_parameters=rope,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            dtype=self.param_dtype,
        )
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=False)
        if self.model_type == "mistral":
            out.update(sliding_window=self.sliding_window)
        if self.model_type == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None)
        return out

    def _check_hf_expressible(self):
        expressible = {
            "llama": self.attention_bias == self.attention_out_bias,
            "mistral": not (self.attention_bias or self.attention_out_bias),
            "qwen2": self.attention_bias and not self.attention_out_bias,
        }
        if not expressible[self.model_type]:
            raise ValueError(
                f"attention_bias={self.attention_bias}, attention_out_bias={self.attention_out_bias} "
                f"cannot be written as a {self.model_type!r} config.json (llama: both or neither; "
                "qwen2: q/k/v only; mistral: none)."
            )
        if self.sliding_window is not None and self.model_type != "mistral":
            raise ValueError("Only model_type='mistral' can express sliding_window in config.json.")


def _positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _check_rope_scaling(scaling: dict):
    rope_type = scaling.get("rope_type")
    if rope_type not in _ROPE_KEYS:
        raise ValueError(
            f"Unsupported rope_scaling {scaling!r}: rope_type must be one of {tuple(_ROPE_KEYS)} "
            "(or no scaling)."
        )
    missing = [k for k in _ROPE_KEYS[rope_type] if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing {missing}.")


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
    _check_rope_scaling(scaling)
    return theta, scaling


# ----------------------------------------------------------------------------- params


class _Spec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal", "ones" or "zeros"


def _is_spec(x) -> bool:
    return isinstance(x, _Spec)


def _dense(d_in: int, d_out: int, axes: tuple[str, str], bias: bool = False) -> dict:
    out = {"kernel": _Spec((d_in, d_out), axes, "normal")}
    if bias:
        out["bias"] = _Spec((d_out,), axes[1:], "zeros")
    return out


def _layer_specs(c: LlamaConfig) -> dict:
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    norm = {"scale": _Spec((d,), ("norm",), "ones")}
    return {
        "self_attn": {
            "q_proj": _dense(d, q, ("embed", "q_heads"), c.attention_bias),
            "k_proj": _dense(d, kv, ("embed", "kv_heads"), c.attention_bias),
            "v_proj": _dense(d, kv, ("embed", "kv_heads"), c.attention_bias),
            "o_proj": _dense(q, d, ("q_heads", "embed"), c.attention_out_bias),
        },
        "mlp": {
            "gate_proj": _dense(d, f, ("embed", "mlp")),
            "up_proj": _dense(d, f, ("embed", "mlp")),
            "down_proj": _dense(f, d, ("mlp", "embed")),
        },
        "input_layernorm": norm,
        "post_attention_layernorm": norm,
    }


def _model_specs(c: LlamaConfig) -> dict:
    layer = _layer_specs(c)
    specs = {"embed_tokens": {"embedding": _Spec((c.vocab_size, c.hidden_size), ("vocab", "embed"), "normal")}}
    if c.scan_layers:
        stack = lambda s: _Spec((c.num_layers, *s.shape), ("layers", *s.axes), s.init)
        specs["layers"] = jax.tree.map(stack, layer, is_leaf=_is_spec)
    else:
        specs.update({f"layers_{i}": layer for i in range(c.num_layers)})
    specs["norm"] = {"scale": _Spec((c.hidden_size,), ("norm",), "ones")}
    if not c.tie_word_embeddings:
        specs["lm_head"] = _dense(c.hidden_size, c.vocab_size, ("embed", "vocab"))
    return specs


def init_params(config: LlamaConfig, key: jax.Array, *, stddev: float = 0.02) -> dict:
    """Random parameters: normal(0, stddev) matrices, unit norm scales, zero biases.

    Works under ``jax.eval_shape`` (to get shapes without allocating).

    Example:
        >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                 num_layers=2, num_heads=4, scan_layers=True)
        >>> jax.eval_shape(init_params, c, jax.random.key(0))["layers"]["mlp"]["up_proj"]["kernel"].shape
        (2, 16, 32)
    """
    specs, treedef = jax.tree.flatten(_model_specs(config), is_leaf=_is_spec)
    keys = jax.random.split(key, len(specs))
    dtype = jnp.dtype(config.param_dtype)

    def make(spec: _Spec, k: jax.Array) -> jax.Array:
        if spec.init == "normal":
            return (stddev * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
        fill = jnp.ones if spec.init == "ones" else jnp.zeros
        return fill(spec.shape, dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(specs, keys)])


def param_axes(config: LlamaConfig) -> dict:
    """Logical axis names for every parameter: same tree as :func:`init_params`, tuple leaves.

    Tuples are pytree nodes, so map over it with ``is_leaf=lambda x: isinstance(x, tuple)``.

    Example:
        >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                 num_layers=1, num_heads=4)
        >>> param_axes(c)["layers_0"]["self_attn"]["q_proj"]["kernel"]
        ('embed', 'q_heads')
    """
    return jax.tree.map(lambda s: s.axes, _model_specs(config), is_leaf=_is_spec)


def stack_layers(params: dict, num_layers: int) -> dict:
    """Turn ``layers_{i}`` subtrees into one ``layers`` subtree with a leading layer axis.

    Example:
        >>> p = {"layers_0": {"w": jnp.zeros(3)}, "layers_1": {"w": jnp.ones(3)}, "norm": 1}
        >>> stack_layers(p, 2)["layers"]["w"].shape
        (2, 3)
    """
    layers = [params[f"layers_{i}"] for i in range(num_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Inverse of :func:`stack_layers`.

    Example:
        >>> unstack_layers({"layers": {"w": jnp.zeros((2, 3))}}, 2)["layers_1"]["w"].shape
        (3,)
    """
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x_BxTxD: jax.Array, scale_D, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in ``x``'s dtype.

    Example:
        >>> rms_norm(jnp.full((1, 4), 2.0), jnp.ones(4), 0.0).tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """
    x32_BxTxD = x_BxTxD.astype(jnp.float32)
    variance_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
    normed_BxTxD = x32_BxTxD * jax.lax.rsqrt(variance_BxTx1 + eps)
    return (normed_BxTxD * ops.as_array(scale_D, jnp.float32)).astype(x_BxTxD.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair RoPE inverse frequencies ``(head_dim // 2,)`` in float32, with rope_scaling applied.

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> rope_inverse_frequencies(c).tolist()
        [1.0, 0.009999999776482582]
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = dict(config.rope_scaling)
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1 RoPE: slow down low frequencies by ``factor``, blend the middle band."""
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    blend = (old_len / wavelength - low) / (high - low)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    long_waves = wavelength > old_len / low
    short_waves = wavelength < old_len / high
    return np.where(long_waves, inv_freq / factor, np.where(short_waves, inv_freq, blended))


def rope_tables(config: LlamaConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 ``(cos, sin)`` tables of shape ``(B, T, head_dim)`` (halves repeated, HF layout).

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> rope_tables(c, jnp.zeros((1, 3), "int32"))[0].shape
        (1, 3, 4)
    """
    inv_freq_H2 = jnp.asarray(rope_inverse_frequencies(config))
    angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2
    angles_BxTxH = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)
    return jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """Rotate query/key heads ("rotate_half" convention: pairs are (i, i + H/2)).

    Example:
        >>> x = jnp.ones((1, 1, 1, 4))
        >>> apply_rope(x, jnp.ones((1, 1, 4)), jnp.zeros((1, 1, 4))).tolist()
        [[[[1.0, 1.0, 1.0, 1.0]]]]
    """
    x32_BxTxNxH = x_BxTxNxH.astype(jnp.float32)
    first, second = jnp.split(x32_BxTxNxH, 2, axis=-1)
    rotated_BxTxNxH = jnp.concatenate([-second, first], axis=-1)
    out = x32_BxTxNxH * cos_BxTxH[:, :, None] + rotated_BxTxNxH * sin_BxTxH[:, :, None]
    return out.astype(x_BxTxNxH.dtype)


def dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS) -> jax.Array:
    """Grouped-query attention; scores and softmax in float32. Returns ``(B, T, N, H)``.

    ``allowed_BxTxS`` is True where query t may attend to key s. A query with no allowed
    key gets a uniform (finite) average instead of NaN.

    Example:
        >>> q = jnp.ones((1, 2, 4, 8)); kv = jnp.ones((1, 3, 2, 8))
        >>> dot_product_attention(q, kv, kv, jnp.ones((1, 2, 3), bool)).shape
        (1, 2, 4, 8)
    """
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    ) * (h**-0.5)
    allowed_Bx1x1xTxS = allowed_BxTxS[:, None, None]
    scores_BxKxGxTxS = jnp.where(allowed_Bx1x1xTxS, scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


def _with_prefix(prefix_NxKH, new_BxTxKxH):
    """``new`` keys (or values) with the ``n`` prefix rows put in front: ``(B, n + T, K, H)``."""
    b, _, k, h = new_BxTxKxH.shape
    prefix_NxKxH = prefix_NxKH.reshape(-1, k, h).astype(new_BxTxKxH.dtype)
    prefix_BxNxKxH = jnp.broadcast_to(prefix_NxKxH[None], (b, *prefix_NxKxH.shape))
    return jnp.concatenate([prefix_BxNxKxH, new_BxTxKxH], axis=1)


def _attention(p: dict, c: LlamaConfig, x_BxTxD, rope, allowed_BxTxS, layer_cache, index, prepend_prefix=False):
    """Self-attention block; writes this step's keys/values into ``layer_cache`` if given.

    With ``prepend_prefix`` the layer's ``prefix`` keys/values (prefix tuning) go in front
    of this step's keys/values (and into the cache with them).
    """
    b, t, _ = x_BxTxD.shape
    project = lambda name: ops.linear(x_BxTxD, p[name]["kernel"], p[name].get("bias"))
    q_BxTxNxH = apply_rope(project("q_proj").reshape(b, t, c.num_heads, c.head_dim), *rope)
    k_BxTxKxH = apply_rope(project("k_proj").reshape(b, t, c.num_kv_heads, c.head_dim), *rope)
    v_BxTxKxH = project("v_proj").reshape(b, t, c.num_kv_heads, c.head_dim)
    if prepend_prefix:
        k_BxTxKxH = _with_prefix(p["prefix"]["key"], k_BxTxKxH)
        v_BxTxKxH = _with_prefix(p["prefix"]["value"], v_BxTxKxH)
    keys_BxSxKxH, values_BxSxKxH, new_cache = k_BxTxKxH, v_BxTxKxH, None
    if layer_cache is not None:
        write = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, index, 0, 0))
        new_cache = {"k": write(layer_cache["k"], k_BxTxKxH), "v": write(layer_cache["v"], v_BxTxKxH)}
        keys_BxSxKxH = new_cache["k"].astype(x_BxTxD.dtype)
        values_BxSxKxH = new_cache["v"].astype(x_BxTxD.dtype)
    out_BxTxNxH = dot_product_attention(q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, allowed_BxTxS)
    out_BxTxD = ops.linear(out_BxTxNxH.reshape(b, t, c.num_heads * c.head_dim), p["o_proj"]["kernel"],
                           p["o_proj"].get("bias"))
    return out_BxTxD, new_cache


def _mlp(p: dict, x_BxTxD: jax.Array) -> jax.Array:
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
    gate_BxTxF = jax.nn.silu(ops.linear(x_BxTxD, p["gate_proj"]["kernel"]))
    up_BxTxF = ops.linear(x_BxTxD, p["up_proj"]["kernel"])
    return ops.linear(gate_BxTxF * up_BxTxF, p["down_proj"]["kernel"])


def _decoder_layer(p: dict, c: LlamaConfig, x_BxTxD, rope, allowed_BxTxS, layer_cache, index,
                   prepend_prefix=False):
    h_BxTxD = rms_norm(x_BxTxD, p["input_layernorm"]["scale"], c.rms_norm_eps)
    attn_BxTxD, new_cache = _attention(p["self_attn"], c, h_BxTxD, rope, allowed_BxTxS, layer_cache, index,
                                       prepend_prefix)
    if "attn_adapter" in p:  # e.g. a bottleneck adapter (Houlsby placement)
        attn_BxTxD = p["attn_adapter"](attn_BxTxD)
    x_BxTxD = x_BxTxD + attn_BxTxD
    h_BxTxD = rms_norm(x_BxTxD, p["post_attention_layernorm"]["scale"], c.rms_norm_eps)
    mlp_BxTxD = _mlp(p["mlp"], h_BxTxD)
    if "mlp_adapter" in p:  # e.g. a bottleneck adapter (Houlsby and Pfeiffer placements)
        mlp_BxTxD = p["mlp_adapter"](mlp_BxTxD)
    return x_BxTxD + mlp_BxTxD, new_cache


# ----------------------------------------------------------------------------- cache


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for ``max_len`` tokens (prompt plus generated).

    Layout: ``index`` (scalar int32: next slot), ``mask`` (B, S) bool (slot holds a real
    token), ``positions`` (B, S) int32 (RoPE position of each slot), and per layer
    ``{"k", "v"}`` of shape (B, S, K, H), under ``layers_{i}`` or, with ``scan_layers``,
    under ``layers`` with a leading layer axis. Writing past ``max_len`` is clamped by
    ``dynamic_update_slice``: size the cache for the whole generation.

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> init_cache(c, 2, 5)["layers_0"]["k"].shape
        (2, 5, 2, 4)
    """
    dtype = jnp.dtype(dtype or config.dtype)
    lead = (config.num_layers,) if config.scan_layers else ()
    shape = (*lead, batch, max_len, config.num_kv_heads, config.head_dim)
    kv = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    layers = {"layers": kv()} if config.scan_layers else {f"layers_{i}": kv() for i in range(config.num_layers)}
    return {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch, max_len), bool),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        **layers,
    }


def _default_positions(mask_BxT: jax.Array, cache: dict | None) -> jax.Array:
    """Position of each token = number of real tokens before it (so left padding is invisible)."""
    seen_B = 0 if cache is None else jnp.sum(cache["mask"], axis=1, dtype=jnp.int32)
    positions_BxT = jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1
    return jnp.maximum(positions_BxT + jnp.reshape(seen_B, (-1, 1)), 0)


def _allowed(c: LlamaConfig, mask_BxT, positions_BxT, cache):
    """(allowed_BxTxS, cache_meta) for causal, padding-aware (and windowed) attention."""
    t = mask_BxT.shape[1]
    if cache is None:
        index, key_mask_BxS, key_positions_BxS, meta = 0, mask_BxT, positions_BxT, None
    else:
        index = cache["index"]
        put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, index))
        key_mask_BxS = put(cache["mask"], mask_BxT)
        key_positions_BxS = put(cache["positions"], positions_BxT)
        meta = {"index": index + t, "mask": key_mask_BxS, "positions": key_positions_BxS}
    query_slots_T = index + jnp.arange(t)
    key_slots_S = jnp.arange(key_mask_BxS.shape[1])
    causal_TxS = key_slots_S[None, :] <= query_slots_T[:, None]
    allowed_BxTxS = causal_TxS[None] & key_mask_BxS[:, None, :]
    if c.sliding_window is not None:
        distance_BxTxS = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
        allowed_BxTxS = allowed_BxTxS & (distance_BxTxS < c.sliding_window)
    return allowed_BxTxS, meta


# ----------------------------------------------------------------------------- forward


def embed_tokens(params: dict, config: LlamaConfig, tokens_BxT: jax.Array) -> jax.Array:
    """Token embeddings ``(B, T, D)`` in the compute dtype (the input to :func:`forward`'s layers).

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> embed_tokens(init_params(c, jax.random.key(0)), c, jnp.zeros((1, 3), "int32")).shape
        (1, 3, 8)
    """
    return ops.embed(tokens_BxT, params["embed_tokens"]["embedding"], config.compute_dtype)


def lm_head(params: dict, config: LlamaConfig, hidden_BxTxD: jax.Array) -> jax.Array:
    """float32 logits from final (normed) hidden states; tied or untied head.

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> lm_head(init_params(c, jax.random.key(0)), c, jnp.ones((1, 2, 8))).shape
        (1, 2, 8)
    """
    if config.tie_word_embeddings:
        logits_BxTxV = ops.attend(hidden_BxTxD, params["embed_tokens"]["embedding"])
    else:
        logits_BxTxV = ops.linear(hidden_BxTxD, params["lm_head"]["kernel"])
    return logits_BxTxV.astype(jnp.float32)


def _run_layers(params, c: LlamaConfig, x_BxTxD, rope, allowed_BxTxS, cache, prepend_prefix=False):
    """All decoder layers (unrolled or scanned). Returns (x, new per-layer caches)."""
    index = None if cache is None else cache["index"]
    layer_fn = functools.partial(_decoder_layer, c=c, rope=rope, allowed_BxTxS=allowed_BxTxS, index=index,
                                 prepend_prefix=prepend_prefix)
    if c.remat:
        layer_fn = jax.checkpoint(layer_fn)
    if c.scan_layers:
        def body(x, layer):
            p, layer_cache = layer
            return layer_fn(p, x_BxTxD=x, layer_cache=layer_cache)
        layer_caches = None if cache is None else cache["layers"]
        x_BxTxD, new = jax.lax.scan(body, x_BxTxD, (params["layers"], layer_caches))
        return x_BxTxD, {"layers": new}
    new = {}
    for i in range(c.num_layers):
        name = f"layers_{i}"
        layer_cache = None if cache is None else cache[name]
        x_BxTxD, new[name] = layer_fn(params[name], x_BxTxD=x_BxTxD, layer_cache=layer_cache)
    return x_BxTxD, new


def _prompt_length(params: dict, c: LlamaConfig) -> int:
    """Rows of ``prompt/embeddings`` (0 without a prompt), checked against the model's width."""
    if "prompt" not in params:
        return 0
    shape = tuple(params["prompt"]["embeddings"].shape)
    if len(shape) != 2 or shape[1] != c.hidden_size:
        raise ValueError(f"prompt/embeddings has shape {shape}, but this model needs (n, {c.hidden_size}): "
                         "n virtual tokens of hidden_size each. Was the adapter made for another model?")
    return shape[0]


def _prefix_length(params: dict, c: LlamaConfig) -> int:
    """Rows of every layer's ``self_attn/prefix`` (0 without one), checked against the model."""
    names = ["layers"] if c.scan_layers else [f"layers_{i}" for i in range(c.num_layers)]
    lead = (c.num_layers,) if c.scan_layers else ()
    width = c.num_kv_heads * c.head_dim
    lengths = {}
    for name in names:
        prefix = params[name]["self_attn"].get("prefix")
        if prefix is None:
            lengths[name] = 0
            continue
        shapes = {part: tuple(prefix[part].shape) for part in ("key", "value")}
        for part, shape in shapes.items():
            if len(shape) != len(lead) + 2 or shape[:len(lead)] != lead or shape[-1] != width:
                raise ValueError(
                    f"{name}/self_attn/prefix/{part} has shape {shape}, but this model needs "
                    f"{(*lead, 'n', width)} (n prefix rows of num_kv_heads * head_dim). "
                    "Was the adapter made for another model?")
        if shapes["key"] != shapes["value"]:
            raise ValueError(f"{name}/self_attn/prefix key and value shapes differ: {shapes}.")
        lengths[name] = shapes["key"][-2]
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every layer needs a prefix of the same length, got {lengths}.")
    return next(iter(lengths.values()))


def num_virtual_tokens(params: dict, config: LlamaConfig) -> int:
    """Slots that a prompt (``prompt/embeddings``) or prefix (``self_attn/prefix``) takes before the input.

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> p = init_params(c, jax.random.key(0))
        >>> num_virtual_tokens({**p, "prompt": {"embeddings": jnp.zeros((5, 8))}}, c)
        5
    """
    n_prompt, n_prefix = _prompt_length(params, config), _prefix_length(params, config)
    if n_prompt and n_prefix:
        raise ValueError(f"params carry both a prompt ({n_prompt} tokens) and a prefix ({n_prefix} rows); "
                         "use one input adapter at a time.")
    return n_prompt or n_prefix


def _check_room(c: LlamaConfig, virtual: int, t: int, cache: dict | None, what: str = "input tokens"):
    """Virtual slots plus input must fit the context and the cache: never truncate silently."""
    if virtual + t > c.max_position_embeddings:
        raise ValueError(
            f"{virtual} virtual tokens + {t} {what} = {virtual + t} exceed the model's context "
            f"(max_position_embeddings={c.max_position_embeddings}); shorten the input (nothing is truncated).")
    if cache is not None and cache["mask"].shape[1] < virtual + t:
        raise ValueError(f"the cache holds {cache['mask'].shape[1]} slots but {virtual} virtual tokens + "
                         f"{t} input tokens need {virtual + t}; make a larger cache.")


def forward(
    params: dict,
    config: LlamaConfig,
    tokens_BxT: jax.Array | None = None,
    *,
    attention_mask_BxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    cache: dict | None = None,
    input_embeds_BxTxD: jax.Array | None = None,
    return_hidden: bool = False,
    prepend_virtual: bool | None = None,
):
    """Run the decoder. Returns ``(logits_BxTxV float32, new_cache)``.

    Args:
      tokens_BxT: token ids; or pass ``input_embeds_BxTxD`` instead (e.g. soft prompts
        concatenated to :func:`embed_tokens` output). Exactly one must be given.
      attention_mask_BxT: 1 for real tokens, 0 for padding (default all ones).
      positions_BxT: RoPE positions; default counts real tokens (left padding is
        invisible), continuing from the tokens already in ``cache``. When virtual tokens
        are prepended, give the real tokens' positions counted from 0: they are shifted by
        ``n`` and the virtual tokens take ``0..n-1``.
      cache: from :func:`init_cache`; the new keys/values are written at ``cache["index"]``.
        ``new_cache`` is ``None`` when no cache is given.
      return_hidden: return the final normed hidden states ``(B, T, D)`` instead of
        logits (then apply :func:`lm_head` yourself, e.g. to a subset of positions).
      prepend_virtual: whether the ``n`` virtual tokens of a prompt or prefix in ``params``
        (see the module docstring) go before this input. Default: yes without a cache. With
        a cache it must be given: ``True`` on the call that starts the sequence (prefill),
        ``False`` on the calls that continue it. Outputs cover the real tokens only.

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> p = init_params(c, jax.random.key(0))
        >>> forward(p, c, jnp.zeros((2, 3), "int32"), attention_mask_BxT=jnp.array([[0, 1, 1]] * 2))[0].shape
        (2, 3, 8)
        >>> prompted = {**p, "prompt": {"embeddings": jnp.ones((4, 8))}}
        >>> forward(prompted, c, jnp.zeros((2, 3), "int32"))[0].shape  # 4 virtual + 3 real tokens
        (2, 3, 8)
    """
    if (tokens_BxT is None) == (input_embeds_BxTxD is None):
        raise ValueError("Pass exactly one of tokens_BxT and input_embeds_BxTxD.")
    if input_embeds_BxTxD is None:
        x_BxTxD = embed_tokens(params, config, tokens_BxT)
    else:
        x_BxTxD = input_embeds_BxTxD.astype(config.compute_dtype)
    b, t = x_BxTxD.shape[:2]
    mask_BxT = jnp.ones((b, t), bool) if attention_mask_BxT is None else attention_mask_BxT.astype(bool)
    n_prompt = _prompt_length(params, config)
    n_prefix = num_virtual_tokens(params, config) - n_prompt
    if (n_prompt or n_prefix) and cache is not None and prepend_virtual is None:
        raise ValueError(
            f"params carry {n_prompt or n_prefix} virtual tokens (a prompt or prefix adapter): with a cache, "
            "pass prepend_virtual=True on the call that starts the sequence and False on later calls.")
    if prepend_virtual is not None and not prepend_virtual:  # a traced flag fails loudly here: make it static
        n_prompt = n_prefix = 0
    virtual = n_prompt + n_prefix
    if virtual:
        _check_room(config, virtual, t, cache)
        mask_BxT = jnp.concatenate([jnp.ones((b, virtual), bool), mask_BxT], axis=1)
        if positions_BxT is not None:
            virtual_BxN = jnp.broadcast_to(jnp.arange(virtual, dtype=jnp.int32), (b, virtual))
            positions_BxT = jnp.concatenate([virtual_BxN, positions_BxT.astype(jnp.int32) + virtual], axis=1)
    if n_prompt:
        prompt_NxD = params["prompt"]["embeddings"].astype(x_BxTxD.dtype)
        prompt_BxNxD = jnp.broadcast_to(prompt_NxD, (b, *prompt_NxD.shape))
        x_BxTxD = jnp.concatenate([prompt_BxNxD, x_BxTxD], axis=1)
    if positions_BxT is None:
        positions_BxT = _default_positions(mask_BxT, cache)
    allowed_BxTxS, meta = _allowed(config, mask_BxT, positions_BxT, cache)
    # A prefix has keys and values but no queries: drop its rows.
    allowed_BxTxS, positions_BxT = allowed_BxTxS[:, n_prefix:], positions_BxT[:, n_prefix:]
    rope = rope_tables(config, positions_BxT)
    x_BxTxD, layer_caches = _run_layers(params, config, x_BxTxD, rope, allowed_BxTxS, cache, n_prefix > 0)
    x_BxTxD = x_BxTxD[:, n_prompt:]  # outputs for the real tokens only
    hidden_BxTxD = rms_norm(x_BxTxD, params["norm"]["scale"], config.rms_norm_eps)
    new_cache = None if cache is None else {**meta, **layer_caches}
    if return_hidden:
        return hidden_BxTxD, new_cache
    return lm_head(params, config, hidden_BxTxD), new_cache


def keys_values_of_text(params: dict, config: LlamaConfig, tokens_N) -> tuple[jax.Array, jax.Array]:
    """Every layer's keys (after RoPE) and values of a text, as a prefix ``(L, n, K*H)`` each.

    A prefix made of them (:func:`jpeft.prefix_tuning` with ``init="text"``) makes the
    model behave exactly as if the text were written in front of every input: the prefix
    takes positions ``0..n-1`` and the real tokens start at ``n``. This is how prefix
    tuning is initialised from the activations of real words (Li & Liang, 2021, sec. 7.2).

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=3, num_heads=2)
        >>> key_LxNxKH, value_LxNxKH = keys_values_of_text(init_params(c, jax.random.key(0)), c, [1, 2, 3, 4])
        >>> key_LxNxKH.shape
        (3, 4, 8)
    """
    tokens_1xN = jnp.asarray(tokens_N, jnp.int32).reshape(1, -1)
    if num_virtual_tokens(params, config):
        raise ValueError("keys_values_of_text needs the base parameters, without a prompt or prefix applied.")
    n = tokens_1xN.shape[1]
    cache = init_cache(config, 1, n, jnp.float32)
    _, cache = forward(params, config, tokens_1xN, cache=cache)
    names = ["layers"] if config.scan_layers else [f"layers_{i}" for i in range(config.num_layers)]
    width = config.num_kv_heads * config.head_dim

    def rows(part: str) -> jax.Array:
        per_layer = [cache[name][part].reshape(-1, n, width) for name in names]  # (L or 1, n, K*H)
        return jnp.concatenate(per_layer, axis=0)

    return rows("k"), rows("v")


# ----------------------------------------------------------------------------- generation


def _pick_token(logits_BxV, key, temperature: float, top_k: int | None) -> jax.Array:
    """Greedy argmax when ``temperature == 0``, else top-k / temperature sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV / temperature, axis=-1).astype(jnp.int32)


class _DecodeState(NamedTuple):
    step: jax.Array
    tokens_BxN: jax.Array
    done_B: jax.Array
    cache: dict
    key: jax.Array


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k", "eos_ids", "pad_id")
)
def _generate(params, prompt_BxT, prompt_mask_BxT, key, *, config, max_new_tokens, temperature, top_k,
              eos_ids, pad_id):
    b, t = prompt_BxT.shape
    is_eos = lambda tok_B: jnp.isin(tok_B, jnp.asarray(eos_ids or (-1,), jnp.int32))
    cache = init_cache(config, b, num_virtual_tokens(params, config) + t + max_new_tokens)
    hidden_BxTxD, cache = forward(params, config, prompt_BxT, attention_mask_BxT=prompt_mask_BxT,
                                  cache=cache, return_hidden=True, prepend_virtual=True)
    key, sub = jax.random.split(key)
    first_B = _pick_token(lm_head(params, config, hidden_BxTxD[:, -1]), sub, temperature, top_k)
    tokens_BxN = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
    state = _DecodeState(jnp.int32(1), tokens_BxN, is_eos(first_B), cache, key)

    def keep_going(s: _DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

    def decode_one(s: _DecodeState):
        last_Bx1 = jax.lax.dynamic_slice_in_dim(s.tokens_BxN, s.step - 1, 1, axis=1)
        hidden_Bx1xD, cache = forward(params, config, last_Bx1, cache=s.cache, return_hidden=True,
                                      prepend_virtual=False)
        key, sub = jax.random.split(s.key)
        next_B = _pick_token(lm_head(params, config, hidden_Bx1xD[:, 0]), sub, temperature, top_k)
        next_B = jnp.where(s.done_B, pad_id, next_B)
        tokens_BxN = jax.lax.dynamic_update_slice_in_dim(s.tokens_BxN, next_B[:, None], s.step, axis=1)
        return _DecodeState(s.step + 1, tokens_BxN, s.done_B | is_eos(next_B), cache, key)

    return jax.lax.while_loop(keep_going, decode_one, state).tokens_BxN


def generate(
    params: dict,
    config: LlamaConfig,
    prompt_BxT: jax.Array,
    prompt_mask_BxT: jax.Array | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | tuple[int, ...] | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Generate ``max_new_tokens`` new tokens ``(B, N)`` after left-padded prompts.

    Prefills a KV cache with the prompt, then decodes one token at a time inside a
    jitted ``lax.while_loop`` (stops early once every row has produced ``eos_id``).
    Greedy when ``temperature == 0``, otherwise samples (optionally from the ``top_k``
    logits; needs ``key``). After a row's eos token, the rest of its row is ``pad_id``.
    Prompts must be left-padded (the last column is each row's last real token).
    ``params`` may carry a prompt or prefix (an applied input adapter): its virtual tokens
    are prefilled into the cache ahead of the prompt, and with them the whole
    generation must fit ``max_position_embeddings``.

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> p = init_params(c, jax.random.key(0))
        >>> generate(p, c, jnp.ones((2, 3), "int32"), max_new_tokens=4).shape
        (2, 4)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    virtual = num_virtual_tokens(params, config)
    if virtual:
        _check_room(config, virtual, prompt_BxT.shape[1] + max_new_tokens, None, "prompt and new tokens")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if temperature > 0 and key is None:
        raise ValueError("Sampling (temperature > 0) needs a PRNG key.")
    if prompt_mask_BxT is None:
        prompt_mask_BxT = jnp.ones(prompt_BxT.shape, bool)
    eos_ids = None if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
    key = jax.random.key(0) if key is None else key
    return _generate(
        params, jnp.asarray(prompt_BxT, jnp.int32), jnp.asarray(prompt_mask_BxT, bool), key,
        config=config, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
        top_k=top_k, eos_ids=eos_ids, pad_id=int(pad_id),
    )
