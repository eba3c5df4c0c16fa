"""T5 encoder-decoder (T5, T5 v1.1, FLAN-T5) as plain functions over a param tree.

The family registers itself as a :class:`jpeft.models.model.Family` (``encoder_decoder=True``);
use it through :func:`model`. Every weight use goes through :mod:`jpeft.ops`, so LoRA,
IA3, quantized and merged weights run through the same code.

Architecture (as Hugging Face's ``T5ForConditionalGeneration``): pre-norm blocks with an
RMS-style layer norm without bias or mean, attention without the ``1/sqrt(d)`` scaling and
with a learned bias per relative-position bucket (one table per stack, bidirectional in the
encoder, causal in the decoder; cross-attention has none), a ReLU MLP (T5) or a gated GELU
one (T5 v1.1, FLAN-T5: ``gelu_tanh(wi_0 x) * wi_1 x``), and an output head tied to the
shared embedding (scaled by ``d_model**-0.5`` first, T5) or its own (v1.1).

Parameter tree (names chosen to match jpeft's other families, so method targets read the
same: ``q_proj``..., ``gate_proj``/``up_proj``/``down_proj`` are HF's ``wi_0``/``wi_1``/``wo``;
without a gate HF's ``wi`` is ``in_proj``)::

    shared/embedding                                  (vocab, D)      [vocab, embed]
    {encoder,decoder}/relative_attention_bias/embedding (buckets, N)  [relpos_buckets, heads]
    {encoder,decoder}/layers_{i}/self_attn/{q,k,v}_proj/kernel  (D, N*H)  [embed, q_heads]
    {encoder,decoder}/layers_{i}/self_attn/o_proj/kernel        (N*H, D)  [q_heads, embed]
    decoder/layers_{i}/cross_attn/{q,k,v,o}_proj/kernel         as above
    {encoder,decoder}/layers_{i}/mlp/{gate,up}_proj/kernel      (D, F)    [embed, mlp]  (or in_proj)
    {encoder,decoder}/layers_{i}/mlp/down_proj/kernel           (F, D)    [mlp, embed]
    {encoder,decoder}/layers_{i}/{self_attn,cross_attn,mlp}_norm/scale   (D,)  [norm]
    {encoder,decoder}/final_norm/scale                (D,)
    lm_head/kernel                                    (D, vocab), only when untied

With ``scan_layers`` each stack's ``layers_{i}`` become one ``layers`` subtree.

Calls (see :func:`forward`): ``forward(params, source, attention_mask_BxT=...,
decoder_tokens_BxT=...)`` is teacher forcing; with a ``cache`` the first call reads the
source and starts the decoder with ``decoder_start_token_id`` (the encoder's keys and
values go into the cache), later calls feed decoder tokens. That is the decoder-only call
pattern, so :func:`jpeft.models.generation.generate` generates from a source unchanged.

Hook points: ``prompt`` (virtual tokens before the encoder input, prompt tuning) and three
key/value points for prefix tuning, as Li & Liang (2021) put prefixes in an encoder-decoder:
``encoder_prefix`` (rows in every encoder self-attention layer, as source tokens before the
input), ``prefix`` (rows in every decoder self-attention layer, as decoder tokens before the
input) and ``cross_prefix`` (rows every decoder cross-attention layer attends to besides the
encoder's output).

Example:
    >>> import jax, jax.numpy as jnp
    >>> m = model(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4))
    >>> sorted(m.hooks), m.layouts()["decoder/layers_0/cross_attn/q_proj/kernel"].kind
    (['cross_prefix', 'encoder_prefix', 'prefix', 'prompt'], 'kernel')
    >>> logits, _ = jax.eval_shape(functools.partial(m.forward, decoder_tokens_BxT=jnp.zeros((1, 3), "int32")),
    ...                            m.abstract_params(), jnp.ones((1, 5), "int32"))
    >>> logits.shape
    (1, 3, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, sharding
from jpeft.models.names import CheckpointNames, NameRule, NameTable
from jpeft.models import blocks, families, hooks, kv_cache, spec
from jpeft import stack
from jpeft.models.model import Family, Model

MODEL_TYPES = ("t5",)
_DTYPES = ("float32", "bfloat16", "float16")
_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}
STACKS = ("encoder", "decoder")


# ----------------------------------------------------------------------------- config


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 model (Hugging Face ``T5Config`` names where they exist).

    Attributes:
      vocab_size, d_model, d_kv (per-head size), d_ff, num_heads: sizes.
      num_layers, num_decoder_layers: encoder and decoder depth (``None``: same as the encoder).
      relative_attention_num_buckets, relative_attention_max_distance: the position buckets.
      layer_norm_epsilon: the norms' epsilon.
      feed_forward_proj: ``"relu"`` (T5), ``"gated-gelu"`` (v1.1, FLAN-T5) or another
        ``[gated-]{relu,gelu,gelu_new,silu}``.
      tie_word_embeddings: the output head is the shared embedding (no ``lm_head``).
      scale_decoder_outputs: multiply the decoder output by ``d_model**-0.5`` before the head
        (T5; not v1.1). ``None``: the same as ``tie_word_embeddings``.
      decoder_start_token_id, pad_token_id, eos_token_id: special ids.
      scan_layers, remat, dtype, param_dtype: as :class:`jpeft.models.llama.LlamaConfig`.

    Example:
        >>> T5Config(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=2, num_heads=4).num_decoder_layers
        2
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.num_decoder_layers is None:
            set_("num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            set_("scale_decoder_outputs", bool(self.tie_word_embeddings))
        for name in ("dtype", "param_dtype"):
            set_(name, jnp.dtype(getattr(self, name)).name)
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}.")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_decoder_layers",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be at least 4.")
        self.activation  # noqa: B018  (validates feed_forward_proj)

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self):
        name = self.feed_forward_proj.removeprefix("gated-")
        if self.feed_forward_proj == "gated-gelu":
            name = "gelu_new"  # what Hugging Face runs for this name
        if name not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported; use "
                             f"[gated-]{{{', '.join(sorted(_ACTIVATIONS))}}}")
        return _ACTIVATIONS[name]

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def layers_of(self, stack_name: str) -> int:
        return self.num_layers if stack_name == "encoder" else self.num_decoder_layers

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "T5Config":
        """A config from a Hugging Face ``config.json`` dict of a ``t5`` model.

        Example:
            >>> c = T5Config.from_hf({"model_type": "t5", "vocab_size": 8, "d_model": 8, "d_kv": 2, "d_ff": 8,
            ...                       "num_layers": 1, "num_heads": 4, "feed_forward_proj": "gated-gelu",
            ...                       "tie_word_embeddings": False})
            >>> c.gated, c.tie_word_embeddings, c.scale_decoder_outputs
            (True, False, False)
        """
        if d.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"Unsupported model_type {d.get('model_type')!r}; supported: {MODEL_TYPES}.")
        tie = bool(d.get("tie_word_embeddings", True))
        scale = d.get("scale_decoder_outputs", tie)
        eos = d.get("eos_token_id", 1)
        fields = dict(
            vocab_size=d["vocab_size"], d_model=d["d_model"], d_kv=d["d_kv"], d_ff=d["d_ff"],
            num_layers=d["num_layers"], num_heads=d["num_heads"], num_decoder_layers=d.get("num_decoder_layers"),
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=d.get("feed_forward_proj", "relu"), tie_word_embeddings=tie,
            scale_decoder_outputs=bool(scale),
            decoder_start_token_id=d.get("decoder_start_token_id") or d.get("pad_token_id") or 0,
            pad_token_id=d.get("pad_token_id") or 0, eos_token_id=eos[0] if isinstance(eos, list) else eos)
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict:
        """A ``config.json`` dict (inverse of :meth:`from_hf`).

        Example:
            >>> c = T5Config(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=4)
            >>> T5Config.from_hf(c.to_hf()) == c
            True
        """
        return dict(
            architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=self.vocab_size,
            d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff, num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            layer_norm_epsilon=self.layer_norm_epsilon, feed_forward_proj=self.feed_forward_proj,
            tie_word_embeddings=self.tie_word_embeddings, scale_decoder_outputs=self.scale_decoder_outputs,
            decoder_start_token_id=self.decoder_start_token_id, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id, is_encoder_decoder=True, dtype=self.param_dtype)


# ----------------------------------------------------------------------------- parameters


def _kernel(d_in: int, d_out: int, axes: tuple[str, str]) -> dict:
    return {"kernel": spec.ParamSpec((d_in, d_out), axes)}


def _attention_specs(c: T5Config) -> dict:
    d, inner = c.d_model, c.num_heads * c.d_kv
    return {"q_proj": _kernel(d, inner, ("embed", "q_heads")), "k_proj": _kernel(d, inner, ("embed", "kv_heads")),
            "v_proj": _kernel(d, inner, ("embed", "kv_heads")), "o_proj": _kernel(inner, d, ("q_heads", "embed"))}


def _layer_specs(c: T5Config, cross: bool) -> dict:
    norm = {"scale": spec.ParamSpec((c.d_model,), ("norm",), "ones")}
    mlp = {"down_proj": _kernel(c.d_ff, c.d_model, ("mlp", "embed"))}
    for name in ("gate_proj", "up_proj") if c.gated else ("in_proj",):
        mlp[name] = _kernel(c.d_model, c.d_ff, ("embed", "mlp"))
    layer = {"self_attn": _attention_specs(c), "self_attn_norm": norm, "mlp": mlp, "mlp_norm": norm}
    if cross:
        layer.update(cross_attn=_attention_specs(c), cross_attn_norm=norm)
    return layer


def specs(c: T5Config) -> dict:
    """The :class:`~jpeft.models.spec.ParamSpec` of every parameter (see the module docstring)."""
    out = {"shared": {"embedding": spec.ParamSpec((c.vocab_size, c.d_model), ("vocab", "embed"))}}
    for name in STACKS:
        n, layer = c.layers_of(name), _layer_specs(c, cross=name == "decoder")
        part = {"relative_attention_bias": {"embedding": spec.ParamSpec(
                    (c.relative_attention_num_buckets, c.num_heads), ("relpos_buckets", "heads"))},
                "final_norm": {"scale": spec.ParamSpec((c.d_model,), ("norm",), "ones")}}
        if c.scan_layers:
            part["layers"] = spec.map_specs(lambda s, n=n: s.stacked(n), layer)
        else:
            part.update({f"layers_{i}": layer for i in range(n)})
        out[name] = part
    if not c.tie_word_embeddings:
        out["lm_head"] = _kernel(c.d_model, c.vocab_size, ("embed", "vocab"))
    return out


def hook_points(c: T5Config) -> dict[str, hooks.HookPoint]:
    """Where input methods feed the model (see the module docstring)."""
    inner, n = c.num_heads * c.d_kv, c.num_decoder_layers
    return {"prompt": hooks.HookPoint("prompt", "tokens", c.d_model, source="shared/embedding"),
            "encoder_prefix": hooks.HookPoint("encoder_prefix", "kv", inner, layers=c.num_layers, scope="encoder"),
            "prefix": hooks.HookPoint("prefix", "kv", inner, layers=n, scope="decoder"),
            "cross_prefix": hooks.HookPoint("cross_prefix", "kv", inner, layers=n, scope="decoder")}


# ----------------------------------------------------------------------------- blocks


def relative_position_bucket(relative_BxTxS, bidirectional: bool, num_buckets: int, max_distance: int):
    """The bucket of each relative position ``key - query`` (T5's scheme: exact near, log-spaced far).

    Example:
        >>> relative_position_bucket(jnp.array([-3, -1, 0, 1, 3, 200]), bidirectional=True,
        ...                          num_buckets=8, max_distance=20).tolist()
        [2, 1, 0, 5, 6, 7]
    """
    relative = jnp.asarray(relative_BxTxS, jnp.int32)
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    exact = num_buckets // 2
    far = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / np.float32(math.log(max_distance / exact))
    far = exact + (far * (num_buckets - exact)).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return buckets + jnp.where(distance < exact, distance, far)


def position_bias(table, c: T5Config, query_T, keys_S, *, bidirectional: bool) -> jax.Array:
    """``(1, N, T, S)`` float32 bias for queries at positions ``query_T`` and keys at ``keys_S``."""
    relative_TxS = keys_S[None, :] - query_T[:, None]
    bucket_TxS = relative_position_bucket(relative_TxS, bidirectional=bidirectional,
                                          num_buckets=c.relative_attention_num_buckets,
                                          max_distance=c.relative_attention_max_distance)
    bias_TxSxN = ops.embed(bucket_TxS, table, jnp.float32)
    return jnp.transpose(bias_TxSxN, (2, 0, 1))[None]


def _attend(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, bias_BxNxTxS, allowed_BxTxS) -> jax.Array:
    """Attention without the 1/sqrt(H) scale, plus a bias; scores and softmax in float32."""
    scores = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH, k_BxSxNxH, preferred_element_type=jnp.float32)
    if bias_BxNxTxS is not None:
        scores = scores + bias_BxNxTxS
    scores = jnp.where(allowed_BxTxS[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxNxH.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v_BxSxNxH)


def _heads(x_BxTxD, kernel, c: T5Config) -> jax.Array:
    b, t, _ = x_BxTxD.shape
    return ops.linear(x_BxTxD, kernel).reshape(b, t, c.num_heads, c.d_kv)


def _output(p: dict, out_BxTxNxH, c: T5Config) -> jax.Array:
    b, t = out_BxTxNxH.shape[:2]
    return ops.linear(out_BxTxNxH.reshape(b, t, c.num_heads * c.d_kv), p["o_proj"]["kernel"])


def _mlp(p: dict, c: T5Config, x_BxTxD) -> jax.Array:
    if c.gated:
        h_BxTxF = (c.activation(ops.linear(x_BxTxD, p["gate_proj"]["kernel"]))
                   * ops.linear(x_BxTxD, p["up_proj"]["kernel"]))
    else:
        h_BxTxF = c.activation(ops.linear(x_BxTxD, p["in_proj"]["kernel"]))
    return ops.linear(h_BxTxF, p["down_proj"]["kernel"])


def _norm(x, p, c):
    return blocks.rms_norm(x, p["scale"], c.layer_norm_epsilon)


def _encoder_layer(p, x_BxTxD, *, c, bias, allowed, use_prefix):
    h = _norm(x_BxTxD, p["self_attn_norm"], c)
    q, k, v = (_heads(h, p["self_attn"][f"{n}_proj"]["kernel"], c) for n in "qkv")
    if use_prefix:  # this layer's encoder_prefix rows before the source's keys and values
        prefix = hooks.get(p, "encoder_prefix")
        k, v = blocks.with_rows(prefix["key"], k), blocks.with_rows(prefix["value"], v)
    x_BxTxD = x_BxTxD + _output(p["self_attn"], _attend(q, k, v, bias, allowed), c)
    return x_BxTxD + _mlp(p["mlp"], c, _norm(x_BxTxD, p["mlp_norm"], c))


def _decoder_layer(p, x_BxTxD, layer_cache, cross_kv, *, c, bias, allowed, cross_allowed, index, use_prefix):
    """One decoder block. ``cross_kv``: this layer's encoder keys and values ``{"k", "v"}``.

    ``use_prefix``: put this layer's prefix rows (prefix tuning) before this call's keys and
    values (the first call; with a cache they stay there for later calls).
    """
    h = _norm(x_BxTxD, p["self_attn_norm"], c)
    q, k, v = (_heads(h, p["self_attn"][f"{n}_proj"]["kernel"], c) for n in "qkv")
    if use_prefix:
        prefix = hooks.get(p, "prefix")
        k, v = blocks.with_rows(prefix["key"], k), blocks.with_rows(prefix["value"], v)
    new_cache = None
    if layer_cache is not None:
        new_cache = kv_cache.write(layer_cache, index, k, v)
        k, v = (new_cache[n].astype(x_BxTxD.dtype) for n in ("k", "v"))
    x_BxTxD = x_BxTxD + _output(p["self_attn"], _attend(q, k, v, bias, allowed), c)
    h = _norm(x_BxTxD, p["cross_attn_norm"], c)
    q = _heads(h, p["cross_attn"]["q_proj"]["kernel"], c)
    k, v = cross_kv["k"].astype(h.dtype), cross_kv["v"].astype(h.dtype)
    x_BxTxD = x_BxTxD + _output(p["cross_attn"], _attend(q, k, v, None, cross_allowed), c)
    return x_BxTxD + _mlp(p["mlp"], c, _norm(x_BxTxD, p["mlp_norm"], c)), new_cache


def _run(part: dict, c: T5Config, n: int, layer_fn, x, xs=None):
    """Every layer of a stack, unrolled or scanned; ``xs`` per-layer inputs (a tree keyed like the layers).

    Each layer's input and output rows are split like the batch's (``sharding.constrain_rows``:
    a no-op outside ``sharding.activation_rows``).
    """
    layer = stack.remat_layer(layer_fn, c.remat)

    def layer_fn(p, x, *inputs):
        out = layer(p, sharding.constrain_rows(x), *inputs)
        return (sharding.constrain_rows(out[0]), out[1]) if inputs else sharding.constrain_rows(out)

    if c.scan_layers:
        def body(x, p, inputs):
            return layer_fn(p, x, *inputs) if inputs is not None else (layer_fn(p, x), None)
        x, ys = stack.scan(body, x, part["layers"], None if xs is None else xs["layers"])
        return x, {"layers": ys}
    ys = {}
    for i in range(n):
        name = f"layers_{i}"
        if xs is None:
            x = layer_fn(part[name], x)
        else:
            x, ys[name] = layer_fn(part[name], x, *xs[name])
    return x, ys


# ----------------------------------------------------------------------------- forward


def encode(params: dict, config: T5Config, tokens_BxS: jax.Array | None = None, *,
           attention_mask_BxS: jax.Array | None = None, input_embeds_BxSxD: jax.Array | None = None) -> dict:
    """The encoder: ``{"hidden": (B, S', D), "mask": (B, S')}`` (``S' = n + S`` with a prompt adapter).

    Example:
        >>> c = T5Config(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=4)
        >>> jax.eval_shape(lambda p: encode(p, c, jnp.ones((2, 3), "int32")), model(c).abstract_params())["hidden"].shape
        (2, 3, 8)
    """
    c = config
    if (tokens_BxS is None) == (input_embeds_BxSxD is None):
        raise ValueError("Pass exactly one of tokens_BxS and input_embeds_BxSxD.")
    if input_embeds_BxSxD is None:
        x = ops.embed(tokens_BxS, params["shared"]["embedding"], c.compute_dtype)
    else:
        x = input_embeds_BxSxD.astype(c.compute_dtype)
    b, s = x.shape[:2]
    mask_BxS = jnp.ones((b, s), bool) if attention_mask_BxS is None else jnp.asarray(attention_mask_BxS).astype(bool)
    point = hook_points(c)["prompt"]
    if hooks.length(params, point):
        prompt_BxNxD, virtual_BxN = hooks.tokens_for_rows(hooks.read(params, point), b, x.dtype)
        x, mask_BxS = jnp.concatenate([prompt_BxNxD, x], 1), jnp.concatenate([virtual_BxN, mask_BxS], 1)
    # An encoder prefix's rows act as source tokens before the input: key slots 0..n-1, always visible.
    n = hooks.length(params, hook_points(c)["encoder_prefix"])
    query_S, key_S = n + jnp.arange(x.shape[1]), jnp.arange(n + x.shape[1])
    bias = position_bias(params["encoder"]["relative_attention_bias"]["embedding"], c, query_S, key_S,
                         bidirectional=True)
    keys_BxS = jnp.concatenate([jnp.ones((b, n), bool), mask_BxS], axis=1)
    allowed = jnp.broadcast_to(keys_BxS[:, None, :], (b, x.shape[1], n + x.shape[1]))
    x, _ = _run(params["encoder"], c, c.num_layers,
                functools.partial(_encoder_layer, c=c, bias=bias, allowed=allowed, use_prefix=n > 0), x)
    return {"hidden": _norm(x, params["encoder"]["final_norm"], c), "mask": mask_BxS}


def _cross_keys_values(params: dict, c: T5Config, hidden_BxSxD) -> dict:
    """Every decoder layer's cross-attention keys and values of the encoder output, keyed like the layers.

    A ``cross_prefix`` value puts its rows before them (``(B, n + S, N, H)``).
    """
    def kv(p):
        k = _heads(hidden_BxSxD, p["cross_attn"]["k_proj"]["kernel"], c)
        v = _heads(hidden_BxSxD, p["cross_attn"]["v_proj"]["kernel"], c)
        prefix = hooks.get(p, "cross_prefix")
        if prefix is not None:
            k, v = blocks.with_rows(prefix["key"], k), blocks.with_rows(prefix["value"], v)
        return {"k": k, "v": v}
    part = params["decoder"]
    if c.scan_layers:
        layers = part["layers"]
        if isinstance(layers, stack.Segments):
            return {"layers": stack.scan(lambda carry, p, _: (carry, kv(p)), 0, layers)[1]}
        return {"layers": jax.vmap(kv)(layers)}
    return {f"layers_{i}": kv(part[f"layers_{i}"]) for i in range(c.num_decoder_layers)}


def forward(params: dict, config: T5Config, tokens_BxT: jax.Array | None = None, *,
            attention_mask_BxT: jax.Array | None = None, decoder_tokens_BxT: jax.Array | None = None,
            decoder_mask_BxT: jax.Array | None = None, encoded: dict | None = None, cache: dict | None = None,
            input_embeds_BxTxD: jax.Array | None = None, return_hidden: bool = False,
            prepend_virtual: bool | None = None):
    """Run the model. Returns ``(decoder logits (B, T, vocab) float32, new_cache)``.

    Args:
      tokens_BxT: the source ids (or ``input_embeds_BxTxD``), with ``attention_mask_BxT``;
        or, with a cache that already holds the source, the next decoder tokens.
      decoder_tokens_BxT: decoder input ids for teacher forcing (``decoder_start_token_id``
        then the target shifted right), with an optional ``decoder_mask_BxT``.
      encoded: an :func:`encode` result to use instead of encoding ``tokens_BxT``.
      cache: from :func:`init_cache`. A cache without the source (the first call) reads
        ``tokens_BxT`` as the source and starts the decoder with ``decoder_start_token_id``
        unless ``decoder_tokens_BxT`` is given; later calls feed decoder tokens.
      return_hidden: return the decoder's final normed hidden states instead of logits.
      prepend_virtual: accepted for the decoder-only call pattern (virtual tokens go to the
        encoder, which runs once).

    Example:
        >>> c = T5Config(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=4)
        >>> run = lambda p, tokens, cache: forward(p, c, tokens, cache=cache)
        >>> p = model(c).abstract_params()
        >>> first, cache = jax.eval_shape(run, p, jnp.ones((2, 3), "int32"), init_cache(c, 2, 4))
        >>> sorted(cache), cache["cross"]["layers_0"]["k"].shape  # the source's keys/values are in the cache
        (['cross', 'cross_mask', 'index', 'layers_0', 'mask', 'positions'], (2, 3, 4, 2))
        >>> jax.eval_shape(run, p, jnp.ones((2, 1), "int32"), cache)[0].shape  # then decoder tokens, one a step
        (2, 1, 8)
    """
    del prepend_virtual
    c = config
    source_in_cache = cache is not None and "cross" in cache
    if source_in_cache:
        if decoder_tokens_BxT is not None:
            raise ValueError("with a cache that holds the source, pass the next decoder tokens as tokens_BxT")
        decoder_tokens_BxT, cross, cross_mask = tokens_BxT, cache["cross"], cache["cross_mask"]
    else:
        if encoded is None:
            encoded = encode(params, c, tokens_BxT, attention_mask_BxS=attention_mask_BxT,
                             input_embeds_BxSxD=input_embeds_BxTxD)
        if decoder_tokens_BxT is None:
            if cache is None:
                raise ValueError("pass decoder_tokens_BxT (the target shifted right, after decoder_start_token_id) "
                                 "or a cache to start decoding")
            decoder_tokens_BxT = jnp.full((encoded["hidden"].shape[0], 1), c.decoder_start_token_id, jnp.int32)
        n_cross = hooks.length(params, hook_points(c)["cross_prefix"])  # rows always visible before the source
        cross = _cross_keys_values(params, c, encoded["hidden"])
        cross_mask = jnp.concatenate([jnp.ones((encoded["mask"].shape[0], n_cross), bool),
                                      encoded["mask"].astype(bool)], axis=1)
    x = ops.embed(decoder_tokens_BxT, params["shared"]["embedding"], c.compute_dtype)
    b, t = x.shape[:2]
    mask_BxT = jnp.ones((b, t), bool) if decoder_mask_BxT is None else jnp.asarray(decoder_mask_BxT).astype(bool)
    # A prefix's rows act as decoder tokens before the input (slots and positions 0..n-1); with a
    # cache they are written on the first call only.
    virtual = 0 if source_in_cache else hooks.length(params, hook_points(c)["prefix"])
    mask_BxV = jnp.concatenate([jnp.ones((b, virtual), bool), mask_BxT], axis=1)
    if cache is None:
        index, meta, slots_V = None, None, jnp.arange(virtual + t)
        allowed = (slots_V[None, :] <= slots_V[:, None])[None] & mask_BxV[:, None, :]
        query_V, key_S = slots_V, slots_V
    else:
        kv_cache.check_room(cache["mask"].shape[1], 0, virtual + t, cache, "decoder tokens")
        index = cache["index"]
        allowed, meta = kv_cache.causal_mask(mask_BxV, kv_cache.default_positions(mask_BxV, cache), cache)
        query_V, key_S = index + jnp.arange(virtual + t), jnp.arange(cache["mask"].shape[1])
    allowed, query_T = allowed[:, virtual:], query_V[virtual:]
    bias = position_bias(params["decoder"]["relative_attention_bias"]["embedding"], c, query_T, key_S,
                         bidirectional=False)
    cross_allowed = jnp.broadcast_to(cross_mask[:, None, :], (b, t, cross_mask.shape[1]))
    layer_fn = functools.partial(_decoder_layer, c=c, bias=bias, allowed=allowed, cross_allowed=cross_allowed,
                                 index=index, use_prefix=virtual > 0)
    layer_caches = None if cache is None else {k: v for k, v in cache.items() if k.startswith("layers")}
    x, new_layers = _run(params["decoder"], c, c.num_decoder_layers, layer_fn, x, _zip_layers(layer_caches, cross))
    hidden = _norm(x, params["decoder"]["final_norm"], c)
    new_cache = None
    if cache is not None:
        new_cache = {**meta, **new_layers, "cross": cross, "cross_mask": cross_mask}
    if return_hidden:
        return hidden, new_cache
    return lm_head(params, c, hidden), new_cache


def _zip_layers(layer_caches, cross) -> dict:
    """``{layer key: (layer cache or None, cross keys/values)}``."""
    return {name: (None if layer_caches is None else layer_caches[name], kv) for name, kv in cross.items()}


def lm_head(params: dict, config: T5Config, hidden_BxTxD: jax.Array) -> jax.Array:
    """float32 logits from the decoder's final hidden states (scaled first when the config says so)."""
    if config.scale_decoder_outputs:
        hidden_BxTxD = hidden_BxTxD * (config.d_model ** -0.5)
    if config.tie_word_embeddings:
        return ops.attend(hidden_BxTxD, params["shared"]["embedding"]).astype(jnp.float32)
    return ops.linear(hidden_BxTxD, params["lm_head"]["kernel"]).astype(jnp.float32)


def init_cache(config: T5Config, batch: int, max_len: int, dtype=None) -> dict:
    """An empty decoder self-attention cache of ``max_len`` slots (the source is added by the first call)."""
    return kv_cache.init_cache(num_layers=config.num_decoder_layers, stacked=config.scan_layers, batch=batch,
                               max_len=max_len, kv_heads=config.num_heads, head_dim=config.d_kv,
                               dtype=jnp.dtype(dtype or config.dtype))


# ----------------------------------------------------------------------------- checkpoint names


def _hf_names() -> NameTable:
    rules = [NameRule("shared.weight", "shared/embedding"),
             NameRule("lm_head.weight", "lm_head/kernel", transpose=True)]
    attention = {"SelfAttention": "self_attn", "EncDecAttention": "cross_attn"}
    mlp = {"wi": "in_proj", "wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}
    for stack_name, blocks_ in (("encoder", ("SelfAttention", "mlp")),
                                ("decoder", ("SelfAttention", "EncDecAttention", "mlp"))):
        rules += [NameRule(f"{stack_name}.final_layer_norm.weight", f"{stack_name}/final_norm/scale"),
                  NameRule(f"{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           f"{stack_name}/relative_attention_bias/embedding")]
        for i, block in enumerate(blocks_):
            where = f"{stack_name}.block.{{layer}}.layer.{i}"
            ours = f"{stack_name}/layers_{{layer}}"
            if block == "mlp":
                rules += [NameRule(f"{where}.DenseReluDense.{hf}.weight", f"{ours}/mlp/{name}/kernel", transpose=True)
                          for hf, name in mlp.items()]
                rules.append(NameRule(f"{where}.layer_norm.weight", f"{ours}/mlp_norm/scale"))
                continue
            rules += [NameRule(f"{where}.{block}.{p}.weight", f"{ours}/{attention[block]}/{p}_proj/kernel",
                               transpose=True) for p in "qkvo"]
            rules.append(NameRule(f"{where}.layer_norm.weight", f"{ours}/{attention[block]}_norm/scale"))
    return NameTable(tuple(rules), ignored=(r"(encoder|decoder)\.embed_tokens\.weight",
                                            r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias"
                                            r"\.weight"))


HF_NAMES = _hf_names()


def _unstacked(config: T5Config) -> T5Config:
    return dataclasses.replace(config, scan_layers=False)


def _tied_tables(config: T5Config) -> dict[str, str]:
    return {"shared/embedding": "lm_head/kernel"} if config.tie_word_embeddings else {}


FAMILY = families.register(Family(
    name="t5", specs=specs, forward=forward, hooks=hook_points, head=lm_head, init_cache=init_cache,
    names=CheckpointNames(hf=HF_NAMES, hf_model_types=MODEL_TYPES, from_hf_config=T5Config.from_hf,
                          to_hf_config=T5Config.to_hf),
    num_layers=lambda c: c.num_layers + c.num_decoder_layers, unstacked=_unstacked, tied_tables=_tied_tables,
    encode=encode,
))


def model(config: T5Config) -> Model:
    """The :class:`~jpeft.models.model.Model` value of this config."""
    return Model(FAMILY, config)
