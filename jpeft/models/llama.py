"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as plain functions over a param tree.

The family registers itself as a :class:`jpeft.models.model.Family`; use it through
:func:`model` (a :class:`~jpeft.models.model.Model` value) or the functions below.
Every weight use goes through :mod:`jpeft.ops`, so a leaf can be a plain array or a
:class:`jpeft.ops.WeightWrapper` (LoRA, quantized, ...).

Parameter tree ('/'-joined paths; names follow Hugging Face; logical axes in brackets)::

    embed_tokens/embedding                       (vocab, D)          [vocab, embed]
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel   (D, N*H) (D, K*H) (D, K*H) (N*H, D)
    layers_{i}/self_attn/{q,k,v}_proj/bias       only with ``attention_bias`` (Qwen2)
    layers_{i}/self_attn/o_proj/bias             only with ``attention_out_bias`` (HF Llama)
    layers_{i}/mlp/{gate,up,down}_proj/kernel    (D, F) (D, F) (F, D)
    layers_{i}/{input,post_attention}_layernorm/scale   (D,)  [norm]
    norm/scale                                   (D,)
    lm_head/kernel                               (D, vocab), only when untied

Logical axes: ``embed`` (D), ``q_heads`` (N*H), ``kv_heads`` (K*H), ``mlp`` (F),
``vocab``, ``norm``, and ``layers`` for the stack axis when ``scan_layers=True`` (then the
``layers_{i}`` subtrees are one ``layers`` subtree run with ``jax.lax.scan``).

Hook points (:mod:`jpeft.models.hooks`): ``prompt`` (virtual tokens before the input),
``prefix`` (key/value rows in every attention layer), ``attn_output`` and ``mlp_output``
(functions of each block's output). Virtual tokens take the first ``n`` positions; the
real tokens start at position ``n``, and outputs cover the real tokens only.

Example:
    >>> import jax
    >>> from jpeft.models import llama
    >>> config = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                            num_layers=2, num_heads=4, num_kv_heads=2)
    >>> params = llama.model(config).init(jax.random.key(0))
    >>> logits_BxTxV, _ = llama.forward(params, config, jax.numpy.ones((1, 5), "int32"))
    >>> logits_BxTxV.shape
    (1, 5, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import attention, ops, sharding
from jpeft.models.names import CheckpointNames
from jpeft.models import blocks, families, hooks, kv_cache, llama_formats, spec
from jpeft import stack
from jpeft.models.model import Family, Model

SUPPORTED_MODEL_TYPES = llama_formats.MODEL_TYPES
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
      remat: what each layer keeps for the backward pass: ``"none"`` (or ``False``), ``"layer_input"``
        (or ``True``: the layer runs again), ``"dots"``, ``"offload"`` (see
        :func:`jpeft.stack.remat_layer`).
      attention: the attention implementation (:data:`jpeft.attention.IMPLEMENTATIONS`;
        ``"auto"`` picks by backend and length).
      dtype: compute dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
      param_dtype: dtype name of parameters made by ``model(config).init``.

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
    remat: bool | str = False
    attention: str = "auto"
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
            blocks.check_rope_scaling(dict(self.rope_scaling))
        stack.check_remat(self.remat)
        attention.check_implementation(self.attention)

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a ``jnp.dtype``."""
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, config_dict: dict, **overrides) -> "LlamaConfig":
        """A config from a Hugging Face ``config.json`` dict (see :func:`jpeft.models.llama_formats.fields_from_hf`).

        Example:
            >>> LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            ...     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}).num_kv_heads
            4
        """
        return cls(**{**llama_formats.fields_from_hf(config_dict), **overrides})

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` dict for this config (inverse of :meth:`from_hf`).

        Example:
            >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
            ...                 num_layers=1, num_heads=4)
            >>> LlamaConfig.from_hf(c.to_hf()) == c
            True
        """
        return llama_formats.to_hf(self)


def _positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


# ----------------------------------------------------------------------------- parameters


def _dense(d_in: int, d_out: int, axes: tuple[str, str], bias: bool = False) -> dict:
    out = {"kernel": spec.ParamSpec((d_in, d_out), axes)}
    if bias:
        out["bias"] = spec.ParamSpec((d_out,), axes[1:], "zeros")
    return out


def specs(c: LlamaConfig) -> dict:
    """The :class:`~jpeft.models.spec.ParamSpec` of every parameter (see the module docstring)."""
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    norm = {"scale": spec.ParamSpec((d,), ("norm",), "ones")}
    layer = {
        "self_attn": {"q_proj": _dense(d, q, ("embed", "q_heads"), c.attention_bias),
                      "k_proj": _dense(d, kv, ("embed", "kv_heads"), c.attention_bias),
                      "v_proj": _dense(d, kv, ("embed", "kv_heads"), c.attention_bias),
                      "o_proj": _dense(q, d, ("q_heads", "embed"), c.attention_out_bias)},
        "mlp": {"gate_proj": _dense(d, f, ("embed", "mlp")), "up_proj": _dense(d, f, ("embed", "mlp")),
                "down_proj": _dense(f, d, ("mlp", "embed"))},
        "input_layernorm": norm,
        "post_attention_layernorm": norm,
    }
    out = {"embed_tokens": {"embedding": spec.ParamSpec((c.vocab_size, d), ("vocab", "embed"))}}
    if c.scan_layers:
        out["layers"] = spec.map_specs(lambda s: s.stacked(c.num_layers), layer)
    else:
        out.update({f"layers_{i}": layer for i in range(c.num_layers)})
    out["norm"] = norm
    if not c.tie_word_embeddings:
        out["lm_head"] = _dense(d, c.vocab_size, ("embed", "vocab"))
    return out


def hook_points(c: LlamaConfig) -> dict[str, hooks.HookPoint]:
    """Where input methods feed the model (see the module docstring)."""
    d, kv, n = c.hidden_size, c.num_kv_heads * c.head_dim, c.num_layers
    return {"prompt": hooks.HookPoint("prompt", "tokens", d, source="embed_tokens/embedding"),
            "prefix": hooks.HookPoint("prefix", "kv", kv, layers=n),
            "attn_output": hooks.HookPoint("attn_output", "block", d, layers=n),
            "mlp_output": hooks.HookPoint("mlp_output", "block", d, layers=n)}


# ----------------------------------------------------------------------------- layers


def _attention(p: dict, c: LlamaConfig, x_BxTxD, rope, allowed_BxTxS, layer_cache, index, prefix=None,
               structure=None):
    """Self-attention; writes this step's keys/values into ``layer_cache`` if given.

    ``prefix`` (prefix tuning's key/value rows of this layer) goes in front of this step's
    keys/values, and into the cache with them. ``structure``: the mask as causal + padding
    (:class:`jpeft.attention.MaskStructure`) for kernels that need it; None with a cache.
    """
    b, t, _ = x_BxTxD.shape
    project = lambda name: ops.linear(x_BxTxD, p[name]["kernel"], p[name].get("bias"))
    q_BxTxNxH = blocks.apply_rope(project("q_proj").reshape(b, t, c.num_heads, c.head_dim), *rope)
    k_BxTxKxH = blocks.apply_rope(project("k_proj").reshape(b, t, c.num_kv_heads, c.head_dim), *rope)
    v_BxTxKxH = project("v_proj").reshape(b, t, c.num_kv_heads, c.head_dim)
    if prefix is not None:
        k_BxTxKxH = blocks.with_rows(prefix["key"], k_BxTxKxH)
        v_BxTxKxH = blocks.with_rows(prefix["value"], v_BxTxKxH)
    keys_BxSxKxH, values_BxSxKxH, new_cache = k_BxTxKxH, v_BxTxKxH, None
    if layer_cache is not None:
        new_cache = kv_cache.write(layer_cache, index, k_BxTxKxH, v_BxTxKxH)
        keys_BxSxKxH, values_BxSxKxH = (new_cache[n].astype(x_BxTxD.dtype) for n in ("k", "v"))
    out_BxTxNxH = blocks.dot_product_attention(q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, allowed_BxTxS,
                                               implementation=c.attention, structure=structure)
    out_BxTxD = ops.linear(out_BxTxNxH.reshape(b, t, c.num_heads * c.head_dim), p["o_proj"]["kernel"],
                           p["o_proj"].get("bias"))
    return out_BxTxD, new_cache


def _mlp(p: dict, x_BxTxD: jax.Array) -> jax.Array:
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
    gate_BxTxF = jax.nn.silu(ops.linear(x_BxTxD, p["gate_proj"]["kernel"]))
    up_BxTxF = ops.linear(x_BxTxD, p["up_proj"]["kernel"])
    return ops.linear(gate_BxTxF * up_BxTxF, p["down_proj"]["kernel"])


def _decoder_layer(p: dict, c: LlamaConfig, x_BxTxD, rope, allowed_BxTxS, layer_cache, index, use_prefix,
                   structure=None):
    x_BxTxD = sharding.constrain_rows(x_BxTxD)  # rows split like the batch (no-op outside activation_rows)
    h_BxTxD = blocks.rms_norm(x_BxTxD, p["input_layernorm"]["scale"], c.rms_norm_eps)
    prefix = hooks.get(p, "prefix") if use_prefix else None
    attn_BxTxD, new_cache = _attention(p["self_attn"], c, h_BxTxD, rope, allowed_BxTxS, layer_cache, index, prefix,
                                       structure)
    if hooks.get(p, "attn_output") is not None:  # e.g. a bottleneck adapter (Houlsby placement)
        attn_BxTxD = hooks.get(p, "attn_output")(attn_BxTxD)
    x_BxTxD = x_BxTxD + attn_BxTxD
    h_BxTxD = blocks.rms_norm(x_BxTxD, p["post_attention_layernorm"]["scale"], c.rms_norm_eps)
    mlp_BxTxD = _mlp(p["mlp"], h_BxTxD)
    if hooks.get(p, "mlp_output") is not None:  # e.g. a bottleneck adapter
        mlp_BxTxD = hooks.get(p, "mlp_output")(mlp_BxTxD)
    return sharding.constrain_rows(x_BxTxD + mlp_BxTxD), new_cache


def _run_layers(params, c: LlamaConfig, x_BxTxD, rope, allowed_BxTxS, cache, use_prefix, structure=None):
    """All decoder layers (unrolled or scanned). Returns (x, new per-layer caches)."""
    index = None if cache is None else cache["index"]
    layer_fn = functools.partial(_decoder_layer, c=c, rope=rope, allowed_BxTxS=allowed_BxTxS, index=index,
                                 use_prefix=use_prefix, structure=structure)
    layer_fn = stack.remat_layer(layer_fn, c.remat)
    if c.scan_layers:  # params["layers"] may be a stack.Segments (a method that trains some layers' slices)
        layer_caches = None if cache is None else cache["layers"]
        x_BxTxD, new = stack.scan(lambda x, p, layer_cache: layer_fn(p, x_BxTxD=x, layer_cache=layer_cache),
                                  x_BxTxD, params["layers"], layer_caches)
        return x_BxTxD, {"layers": new}
    new = {}
    for i in range(c.num_layers):
        name = f"layers_{i}"
        x_BxTxD, new[name] = layer_fn(params[name], x_BxTxD=x_BxTxD,
                                      layer_cache=None if cache is None else cache[name])
    return x_BxTxD, new


# ----------------------------------------------------------------------------- forward


def embed_tokens(params: dict, config: LlamaConfig, tokens_BxT: jax.Array) -> jax.Array:
    """Token embeddings ``(B, T, D)`` in the compute dtype."""
    return sharding.constrain_rows(ops.embed(tokens_BxT, params["embed_tokens"]["embedding"], config.compute_dtype))


def lm_head(params: dict, config: LlamaConfig, hidden_BxTxD: jax.Array) -> jax.Array:
    """float32 logits from final (normed) hidden states; tied or untied head."""
    if config.tie_word_embeddings:
        logits_BxTxV = ops.attend(hidden_BxTxD, params["embed_tokens"]["embedding"])
    else:
        logits_BxTxV = ops.linear(hidden_BxTxD, params["lm_head"]["kernel"])
    return logits_BxTxV.astype(jnp.float32)


def forward(params: dict, config: LlamaConfig, tokens_BxT: jax.Array | None = None, *,
            attention_mask_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None,
            cache: dict | None = None, input_embeds_BxTxD: jax.Array | None = None,
            return_hidden: bool = False, prepend_virtual: bool | None = None):
    """Run the decoder. Returns ``(logits_BxTxV float32, new_cache)``.

    Args:
      tokens_BxT: token ids; or pass ``input_embeds_BxTxD`` instead. Exactly one must be given.
      attention_mask_BxT: 1 for real tokens, 0 for padding (default all ones).
      positions_BxT: RoPE positions; default counts real tokens (left padding is invisible),
        continuing from the tokens already in ``cache``. With virtual tokens, give the real
        tokens' positions counted from 0: they are shifted by ``n``.
      cache: from :func:`init_cache`; the new keys/values are written at ``cache["index"]``.
        ``new_cache`` is ``None`` when no cache is given.
      return_hidden: return the final normed hidden states ``(B, T, D)`` instead of logits.
      prepend_virtual: whether the ``n`` virtual tokens of a prompt or prefix hook in
        ``params`` go before this input. Default: yes without a cache. With a cache it must
        be given: ``True`` on the call that starts the sequence, ``False`` on later calls.

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> p = model(c).init(jax.random.key(0))
        >>> forward(p, c, jnp.zeros((2, 3), "int32"), attention_mask_BxT=jnp.array([[0, 1, 1]] * 2))[0].shape
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
    points = hook_points(config)
    lengths = hooks.virtual_lengths(params, points)
    n_prompt, n_prefix = lengths["prompt"], lengths["prefix"]
    if n_prompt and n_prefix:
        raise ValueError(f"params carry both a prompt ({n_prompt} tokens) and a prefix ({n_prefix} rows); "
                         "use one input adapter at a time.")
    if (n_prompt or n_prefix) and cache is not None and prepend_virtual is None:
        raise ValueError(
            f"params carry {n_prompt or n_prefix} virtual tokens (a prompt or prefix adapter): with a cache, "
            "pass prepend_virtual=True on the call that starts the sequence and False on later calls.")
    if prepend_virtual is not None and not prepend_virtual:  # a traced flag fails loudly here: make it static
        n_prompt = n_prefix = 0
    virtual = n_prompt + n_prefix
    if virtual:
        kv_cache.check_room(config.max_position_embeddings, virtual, t, cache)
        if n_prompt:  # a prompt may differ per row (several prompt adapters in one batch): a mask says whose slots
            prompt_BxNxD, virtual_BxN = hooks.tokens_for_rows(hooks.read(params, points["prompt"]), b, x_BxTxD.dtype)
            x_BxTxD = jnp.concatenate([prompt_BxNxD, x_BxTxD], axis=1)
        else:
            virtual_BxN = jnp.ones((b, virtual), bool)
        mask_BxT = jnp.concatenate([virtual_BxN, mask_BxT], axis=1)
        if positions_BxT is not None:  # virtual tokens count from 0, real ones after each row's virtual tokens
            count_BxN = jnp.cumsum(virtual_BxN.astype(jnp.int32), axis=1)
            positions_BxT = jnp.concatenate([jnp.maximum(count_BxN - 1, 0),
                                             positions_BxT.astype(jnp.int32) + count_BxN[:, -1:]], axis=1)
    if positions_BxT is None:
        positions_BxT = kv_cache.default_positions(mask_BxT, cache)
    allowed_BxTxS, meta = kv_cache.causal_mask(mask_BxT, positions_BxT, cache, config.sliding_window)
    # A prefix has keys and values but no queries: drop its rows.
    allowed_BxTxS, positions_BxT = allowed_BxTxS[:, n_prefix:], positions_BxT[:, n_prefix:]
    rope = blocks.rope_tables(rope_inverse_frequencies(config), positions_BxT)
    structure = None  # causal + padding, when that is all the mask is (kernels that cannot read a dense mask)
    if cache is None and config.sliding_window is None:
        structure = attention.MaskStructure(n_prefix, mask_BxT)
    x_BxTxD, layer_caches = _run_layers(params, config, x_BxTxD, rope, allowed_BxTxS, cache, n_prefix > 0,
                                        structure)
    hidden_BxTxD = blocks.rms_norm(x_BxTxD[:, n_prompt:], params["norm"]["scale"], config.rms_norm_eps)
    new_cache = None if cache is None else {**meta, **layer_caches}
    if return_hidden:
        return hidden_BxTxD, new_cache
    return lm_head(params, config, hidden_BxTxD), new_cache


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair RoPE inverse frequencies ``(head_dim // 2,)``, with the config's rope_scaling."""
    return blocks.rope_inverse_frequencies(config.head_dim, config.rope_theta, dict(config.rope_scaling))


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for ``max_len`` slots (see :mod:`jpeft.models.kv_cache`)."""
    return kv_cache.init_cache(num_layers=config.num_layers, stacked=config.scan_layers, batch=batch,
                               max_len=max_len, kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                               dtype=jnp.dtype(dtype or config.dtype))


def keys_values_of_text(params: dict, config: LlamaConfig, tokens_N) -> tuple[jax.Array, jax.Array]:
    """Every layer's keys (after RoPE) and values of a text, as a prefix ``(L, n, K*H)`` each.

    A prefix made of them makes the model behave exactly as if the text were written in
    front of every input (Li & Liang, 2021, sec. 7.2: initialise from real words).

    Example:
        >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=3, num_heads=2)
        >>> key_LxNxKH, value_LxNxKH = keys_values_of_text(model(c).init(jax.random.key(0)), c, [1, 2, 3, 4])
        >>> key_LxNxKH.shape
        (3, 4, 8)
    """
    tokens_1xN = jnp.asarray(tokens_N, jnp.int32).reshape(1, -1)
    if any(hooks.virtual_lengths(params, hook_points(config)).values()):
        raise ValueError("keys_values_of_text needs the base parameters, without a prompt or prefix applied.")
    n = tokens_1xN.shape[1]
    _, cache = forward(params, config, tokens_1xN, cache=init_cache(config, 1, n, jnp.float32))
    return kv_cache.layer_keys_values(cache, n)


# ----------------------------------------------------------------------------- the family


def from_gguf_metadata(meta: dict, tensor_names: set[str], **overrides) -> LlamaConfig:
    """A config from a GGUF file's metadata (see :func:`jpeft.models.llama_formats.fields_from_gguf`)."""
    return LlamaConfig(**{**llama_formats.fields_from_gguf(meta, tensor_names), **overrides})


def _unstacked(config: LlamaConfig) -> LlamaConfig:
    return dataclasses.replace(config, scan_layers=False)


def _tied_tables(config: LlamaConfig) -> dict[str, str]:
    return {"embed_tokens/embedding": "lm_head/kernel"} if config.tie_word_embeddings else {}


FAMILY = families.register(Family(
    name="llama", specs=specs, forward=forward, hooks=hook_points, head=lm_head, init_cache=init_cache,
    keys_values_of_text=keys_values_of_text,
    names=CheckpointNames(hf=llama_formats.HF_NAMES, hf_model_types=SUPPORTED_MODEL_TYPES,
                          from_hf_config=LlamaConfig.from_hf, to_hf_config=LlamaConfig.to_hf,
                          gguf=llama_formats.GGUF_NAMES, gguf_architectures=("llama",),
                          from_gguf_metadata=from_gguf_metadata),
    num_layers=operator.attrgetter("num_layers"), unstacked=_unstacked,
    max_positions=operator.attrgetter("max_position_embeddings"), tied_tables=_tied_tables,
))


def model(config: LlamaConfig) -> Model:
    """The :class:`~jpeft.models.model.Model` value of this config."""
    return Model(FAMILY, config)

