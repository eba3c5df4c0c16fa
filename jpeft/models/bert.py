"""BERT encoder (BERT, MiniLM, all-MiniLM-L6-v2) as plain functions over a param tree.

Absolute learned positions, token types, post-LayerNorm blocks, a GELU MLP, the tanh
pooler, and two heads: sequence classification (a ``classifier`` over the pooled
output, the ``[CLS]`` hidden state or the mean of the real tokens: ``classifier_input``)
and mean-pooled sentence embeddings (:func:`sentence_embedding`). Like every jpeft
family it registers a :class:`~jpeft.models.model.Family`; every weight use goes
through :mod:`jpeft.ops`, so LoRA, IA3 and quantized leaves just work.

Parameter tree ('/'-joined paths; names follow Hugging Face's ``BertModel`` modules,
so PEFT's target names ``query``, ``key``, ``value``, ``dense`` select the same weights)::

    embeddings/{word,position,token_type}_embeddings/embedding  (V|P|types, D)  [vocab, embed]
    embeddings/LayerNorm/{scale,bias}                        (D,)
    layers_{i}/attention/self/{query,key,value}/{kernel,bias} (D, D)  [embed, q_heads]
    layers_{i}/attention/output/dense/{kernel,bias}          (D, D)  [q_heads, embed]
    layers_{i}/attention/output/LayerNorm/{scale,bias}
    layers_{i}/intermediate/dense/{kernel,bias}              (D, F)  [embed, mlp]
    layers_{i}/output/dense/{kernel,bias}                    (F, D)  [mlp, embed]
    layers_{i}/output/LayerNorm/{scale,bias}
    pooler/dense/{kernel,bias}                               (D, D)
    classifier/{kernel,bias}                                 (D, num_labels), only with num_labels > 0

Hook points: ``prompt`` (virtual tokens before the input: their word embeddings take
the first ``n`` positions, as PEFT feeds ``inputs_embeds``), ``prefix`` (key/value rows
every layer attends to), ``attn_output`` and ``mlp_output`` (functions of a block's
output before its residual add and LayerNorm: Houlsby adapters). Outputs cover the real
tokens only, so the pooler and ``[CLS]`` read the input's first token.

Example:
    >>> import jax, jax.numpy as jnp
    >>> config = BertConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
    ...                     num_labels=3)
    >>> m = model(config)
    >>> params = m.init(jax.random.key(0))
    >>> hidden_BxTxD, _ = m.forward(params, jnp.ones((2, 5), "int32"))
    >>> hidden_BxTxD.shape, m.classify(params, hidden_BxTxD, jnp.ones((2, 5))).shape
    ((2, 5, 16), (2, 3))
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, sharding
from jpeft.models.names import CheckpointNames, NameRule, NameTable
from jpeft.models import blocks, families, hooks, spec
from jpeft import stack
from jpeft.models.model import Family, Model

MODEL_TYPES = ("bert",)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
CLASSIFIER_INPUTS = ("pooler", "cls", "mean")
_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- config


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (a static pytree: it passes through ``jax.jit``).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads: sizes.
      max_position_embeddings: rows of the position table (the longest input).
      type_vocab_size: rows of the token-type table.
      layer_norm_eps: LayerNorm epsilon.
      hidden_act: the MLP's activation (``"gelu"`` is the exact, erf one).
      num_labels: classes of the classification head; 0: no head (a plain encoder).
      classifier_input: what the head reads: ``"pooler"`` (tanh pooler over ``[CLS]``, as
        ``BertForSequenceClassification``), ``"cls"`` (the ``[CLS]`` hidden state) or ``"mean"``
        (the mean of the real tokens' hidden states, as sentence-transformers).
      scan_layers, remat, dtype, param_dtype: as :class:`jpeft.models.llama.LlamaConfig`.

    Example:
        >>> BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2).head_dim
        4
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    num_labels: int = 0
    classifier_input: str = "pooler"
    model_type: str = "bert"
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}.")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings", "type_vocab_size"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}.")
        if not (isinstance(self.num_labels, int) and self.num_labels >= 0):
            raise ValueError(f"num_labels must be an int >= 0 (0: no classification head), got {self.num_labels!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}).")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}.")
        if self.classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"classifier_input must be one of {CLASSIFIER_INPUTS}, got {self.classifier_input!r}.")
        if not self.layer_norm_eps > 0:
            raise ValueError("layer_norm_eps must be positive.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "BertConfig":
        """A config from a Hugging Face ``config.json`` dict (``model_type: bert``).

        A ``*ForSequenceClassification`` config gets a head of its ``num_labels`` (or
        ``id2label``'s size); a plain ``BertModel`` config none.

        Example:
            >>> BertConfig.from_hf({"model_type": "bert", "vocab_size": 8, "hidden_size": 8,
            ...     "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            ...     "architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}).num_labels
            2
        """
        if d.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"Unsupported model_type {d.get('model_type')!r}; supported: {MODEL_TYPES}.")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got "
                             f"{d['position_embedding_type']!r}.")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("BERT as a decoder (is_decoder, add_cross_attention) is not supported.")
        classifier = any(a.endswith("ForSequenceClassification") for a in d.get("architectures") or ())
        labels = 0
        if classifier:
            labels = int(d.get("num_labels") or len(d.get("id2label") or {}) or 2)
        fields = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                      intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                      num_heads=d["num_attention_heads"], max_position_embeddings=d.get("max_position_embeddings", 512),
                      type_vocab_size=d.get("type_vocab_size", 2), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
                      hidden_act=d.get("hidden_act", "gelu"), num_labels=labels)
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` dict (``BertForSequenceClassification`` with a head).

        Example:
            >>> c = BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
            >>> BertConfig.from_hf(c.to_hf()) == c
            True
        """
        out = dict(architectures=["BertForSequenceClassification" if self.num_labels else "BertModel"],
                   model_type="bert", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                   intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                   num_attention_heads=self.num_heads, max_position_embeddings=self.max_position_embeddings,
                   type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
                   hidden_act=self.hidden_act, position_embedding_type="absolute", pad_token_id=0,
                   dtype=self.param_dtype)
        if self.num_labels:
            out.update(num_labels=self.num_labels, id2label={str(i): f"LABEL_{i}" for i in range(self.num_labels)},
                       label2id={f"LABEL_{i}": i for i in range(self.num_labels)})
        return out


def _positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


# ----------------------------------------------------------------------------- parameters


def _dense(d_in: int, d_out: int, axes: tuple) -> dict:
    return {"kernel": spec.ParamSpec((d_in, d_out), axes), "bias": spec.ParamSpec((d_out,), axes[1:], "zeros")}


def _norm(d: int) -> dict:
    return {"scale": spec.ParamSpec((d,), ("norm",), "ones"), "bias": spec.ParamSpec((d,), ("norm",), "zeros")}


def specs(c: BertConfig) -> dict:
    """The :class:`~jpeft.models.spec.ParamSpec` of every parameter (see the module docstring)."""
    d, f = c.hidden_size, c.intermediate_size
    table = lambda rows: {"embedding": spec.ParamSpec((rows, d), ("vocab", "embed"))}
    layer = {
        "attention": {"self": {name: _dense(d, d, ("embed", "q_heads")) for name in ("query", "key", "value")},
                      "output": {"dense": _dense(d, d, ("q_heads", "embed")), "LayerNorm": _norm(d)}},
        "intermediate": {"dense": _dense(d, f, ("embed", "mlp"))},
        "output": {"dense": _dense(f, d, ("mlp", "embed")), "LayerNorm": _norm(d)},
    }
    out = {"embeddings": {"word_embeddings": table(c.vocab_size),
                          "position_embeddings": table(c.max_position_embeddings),
                          "token_type_embeddings": table(c.type_vocab_size), "LayerNorm": _norm(d)}}
    if c.scan_layers:
        out["layers"] = spec.map_specs(lambda s: s.stacked(c.num_layers), layer)
    else:
        out.update({f"layers_{i}": layer for i in range(c.num_layers)})
    out["pooler"] = {"dense": _dense(d, d, ("embed", "q_heads"))}
    if c.num_labels:
        out["classifier"] = _dense(d, c.num_labels, ("embed", None))
    return out


def hook_points(c: BertConfig) -> dict[str, hooks.HookPoint]:
    """Where input methods feed the model (see the module docstring)."""
    d, n = c.hidden_size, c.num_layers
    return {"prompt": hooks.HookPoint("prompt", "tokens", d, source="embeddings/word_embeddings/embedding"),
            "prefix": hooks.HookPoint("prefix", "kv", d, layers=n),
            "attn_output": hooks.HookPoint("attn_output", "block", d, layers=n),
            "mlp_output": hooks.HookPoint("mlp_output", "block", d, layers=n)}


# ----------------------------------------------------------------------------- layers


def layer_norm(x_BxTxD: jax.Array, p: dict, eps: float) -> jax.Array:
    """LayerNorm (mean and variance over the last axis) in float32, returned in ``x``'s dtype.

    Example:
        >>> p = {"scale": jnp.ones(2), "bias": jnp.zeros(2)}
        >>> layer_norm(jnp.array([[1.0, 3.0]]), p, 0.0).tolist()
        [[-1.0, 1.0]]
    """
    x32 = x_BxTxD.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(variance + eps)
    out = normed * ops.as_array(p["scale"], jnp.float32) + ops.as_array(p["bias"], jnp.float32)
    return out.astype(x_BxTxD.dtype)


def _linear(x, p: dict) -> jax.Array:
    return ops.linear(x, p["kernel"], p.get("bias"))


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.relu(x)


def _layer(p: dict, x_BxTxD, *, c: BertConfig, allowed_BxTxS, use_prefix: bool):
    b, t, _ = x_BxTxD.shape
    heads = lambda y: y.reshape(b, -1, c.num_heads, c.head_dim)
    attn = p["attention"]
    q_BxTxNxH = heads(_linear(x_BxTxD, attn["self"]["query"]))
    k_BxSxNxH = heads(_linear(x_BxTxD, attn["self"]["key"]))
    v_BxSxNxH = heads(_linear(x_BxTxD, attn["self"]["value"]))
    if use_prefix:
        prefix = hooks.get(p, "prefix")
        k_BxSxNxH = blocks.with_rows(prefix["key"], k_BxSxNxH)
        v_BxSxNxH = blocks.with_rows(prefix["value"], v_BxSxNxH)
    context_BxTxNxH = blocks.dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, allowed_BxTxS)
    attn_BxTxD = _linear(context_BxTxNxH.reshape(b, t, c.hidden_size), attn["output"]["dense"])
    if hooks.get(p, "attn_output") is not None:  # a bottleneck adapter (Houlsby placement)
        attn_BxTxD = hooks.get(p, "attn_output")(attn_BxTxD)
    x_BxTxD = layer_norm(x_BxTxD + attn_BxTxD, attn["output"]["LayerNorm"], c.layer_norm_eps)
    h_BxTxF = _activation(c.hidden_act, _linear(x_BxTxD, p["intermediate"]["dense"]))
    mlp_BxTxD = _linear(h_BxTxF, p["output"]["dense"])
    if hooks.get(p, "mlp_output") is not None:
        mlp_BxTxD = hooks.get(p, "mlp_output")(mlp_BxTxD)
    return layer_norm(x_BxTxD + mlp_BxTxD, p["output"]["LayerNorm"], c.layer_norm_eps)


def _run_layers(params: dict, c: BertConfig, x_BxTxD, allowed_BxTxS, use_prefix: bool):
    layer = stack.remat_layer(functools.partial(_layer, c=c, allowed_BxTxS=allowed_BxTxS, use_prefix=use_prefix),
                              c.remat)

    def layer_fn(p, x_BxTxD):  # rows split like the batch's (no-op outside sharding.activation_rows)
        return sharding.constrain_rows(layer(p, sharding.constrain_rows(x_BxTxD)))

    if c.scan_layers:
        x_BxTxD, _ = stack.scan(lambda x, p, _: (layer_fn(p, x), None), x_BxTxD, params["layers"])
        return x_BxTxD
    for i in range(c.num_layers):
        x_BxTxD = layer_fn(params[f"layers_{i}"], x_BxTxD)
    return x_BxTxD


# ----------------------------------------------------------------------------- forward


def forward(params: dict, config: BertConfig, tokens_BxT: jax.Array | None = None, *,
            attention_mask_BxT: jax.Array | None = None, token_type_ids_BxT: jax.Array | None = None,
            positions_BxT: jax.Array | None = None, input_embeds_BxTxD: jax.Array | None = None,
            return_hidden: bool = True, cache=None, prepend_virtual: bool | None = None):
    """Run the encoder. Returns ``(hidden_BxTxD, None)``: the last layer's hidden states of the real tokens.

    Args:
      tokens_BxT: token ids; or ``input_embeds_BxTxD`` (word embeddings) instead.
      attention_mask_BxT: 1 for real tokens, 0 for padding (default all ones).
      token_type_ids_BxT: segment ids (default 0).
      positions_BxT: absolute positions (default ``0..T-1``; virtual tokens shift them by ``n``).
      return_hidden: accepted for the model interface; an encoder always returns hidden states.

    Example:
        >>> c = BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> p = model(c).init(jax.random.key(0))
        >>> forward(p, c, jnp.zeros((2, 3), "int32"), attention_mask_BxT=jnp.array([[1, 1, 0]] * 2))[0].shape
        (2, 3, 8)
    """
    del return_hidden, prepend_virtual
    if cache is not None:
        raise ValueError("a BERT encoder has no key/value cache (it is not a decoder)")
    if (tokens_BxT is None) == (input_embeds_BxTxD is None):
        raise ValueError("Pass exactly one of tokens_BxT and input_embeds_BxTxD.")
    emb = params["embeddings"]
    if input_embeds_BxTxD is None:
        x_BxTxD = ops.embed(tokens_BxT, emb["word_embeddings"]["embedding"], config.compute_dtype)
    else:
        x_BxTxD = input_embeds_BxTxD.astype(config.compute_dtype)
    b, t = x_BxTxD.shape[:2]
    mask_BxT = jnp.ones((b, t), bool) if attention_mask_BxT is None else attention_mask_BxT.astype(bool)
    types_BxT = jnp.zeros((b, t), jnp.int32) if token_type_ids_BxT is None else token_type_ids_BxT
    positions_BxT = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions_BxT is None
                     else positions_BxT.astype(jnp.int32))
    lengths = hooks.virtual_lengths(params, hook_points(config))
    n_prompt, n_prefix = lengths["prompt"], lengths["prefix"]
    if n_prompt and n_prefix:
        raise ValueError(f"params carry both a prompt ({n_prompt} tokens) and a prefix ({n_prefix} rows); "
                         "use one input adapter at a time.")
    if n_prompt:  # virtual word embeddings first: they take positions 0..n-1 and token type 0
        prompt_BxNxD, virtual_BxN = hooks.tokens_for_rows(hooks.read(params, hook_points(config)["prompt"]), b,
                                                          x_BxTxD.dtype)
        x_BxTxD = jnp.concatenate([prompt_BxNxD, x_BxTxD], axis=1)
        mask_BxT = jnp.concatenate([virtual_BxN, mask_BxT], axis=1)
        types_BxT = jnp.concatenate([jnp.zeros((b, n_prompt), jnp.int32), types_BxT], axis=1)
        positions_BxT = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_prompt, dtype=jnp.int32), (b, n_prompt)),
                                         positions_BxT + n_prompt], axis=1)
    if t + n_prompt > config.max_position_embeddings:
        raise ValueError(f"{t} tokens (+{n_prompt} virtual) are more than the model's "
                         f"max_position_embeddings={config.max_position_embeddings}; truncate the input")
    x_BxTxD = (x_BxTxD + ops.embed(positions_BxT, emb["position_embeddings"]["embedding"], config.compute_dtype)
               + ops.embed(types_BxT, emb["token_type_embeddings"]["embedding"], config.compute_dtype))
    x_BxTxD = layer_norm(x_BxTxD, emb["LayerNorm"], config.layer_norm_eps)
    keys_BxS = mask_BxT if not n_prefix else jnp.concatenate([jnp.ones((b, n_prefix), bool), mask_BxT], axis=1)
    allowed_BxTxS = jnp.broadcast_to(keys_BxS[:, None, :], (b, mask_BxT.shape[1], keys_BxS.shape[1]))
    x_BxTxD = _run_layers(params, config, x_BxTxD, allowed_BxTxS, n_prefix > 0)
    return x_BxTxD[:, n_prompt:], None


def pool(params: dict, config: BertConfig, hidden_BxTxD: jax.Array) -> jax.Array:
    """The pooler output ``tanh(dense(hidden[:, 0]))``, ``(B, D)``."""
    return jnp.tanh(_linear(hidden_BxTxD[:, 0], params["pooler"]["dense"]))


def sentence_embedding(hidden_BxTxD: jax.Array, attention_mask_BxT: jax.Array, *, normalize: bool = False):
    """Mean of the real tokens' hidden states ``(B, D)`` (sentence-transformers' mean pooling), float32.

    Example:
        >>> h = jnp.array([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
        >>> sentence_embedding(h, jnp.array([[1, 1, 0]])).tolist()
        [[2.0, 1.0]]
    """
    mask_BxTx1 = attention_mask_BxT.astype(jnp.float32)[..., None]
    total_BxD = jnp.sum(hidden_BxTxD.astype(jnp.float32) * mask_BxTx1, axis=1)
    mean_BxD = total_BxD / jnp.maximum(jnp.sum(mask_BxTx1, axis=1), 1e-9)
    if normalize:
        mean_BxD = mean_BxD / jnp.maximum(jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True), 1e-12)
    return mean_BxD


def classify(params: dict, config: BertConfig, hidden_BxTxD: jax.Array, attention_mask_BxT: jax.Array) -> jax.Array:
    """float32 class logits ``(B, num_labels)`` from the encoder's hidden states (see ``classifier_input``)."""
    if not config.num_labels or "classifier" not in params:
        raise ValueError("this BERT model has no classification head: set num_labels (model.replace(num_labels=n)) "
                         "and give the head's parameters")
    if config.classifier_input == "pooler":
        features_BxD = pool(params, config, hidden_BxTxD)
    elif config.classifier_input == "cls":
        features_BxD = hidden_BxTxD[:, 0]
    else:
        features_BxD = sentence_embedding(hidden_BxTxD, attention_mask_BxT).astype(hidden_BxTxD.dtype)
    return _linear(features_BxD, params["classifier"]).astype(jnp.float32)


# ----------------------------------------------------------------------------- checkpoint names


def _hf_table(prefix: str) -> NameTable:
    """``BertModel`` tensor names, each with ``prefix`` (``"bert."`` in ``BertForSequenceClassification``).

    Both spellings load whatever the table; the one listed first is what saving writes.
    """
    layer = "encoder.layer.{layer}."

    def rules(p: str):
        return (
            NameRule(p + "embeddings.LayerNorm.weight", "embeddings/LayerNorm/scale"),
            NameRule(p + "embeddings.LayerNorm.bias", "embeddings/LayerNorm/bias"),
            NameRule(p + "embeddings.{table}.weight", "embeddings/{table}/embedding"),
            NameRule(p + layer + "attention.self.{proj}.weight", "layers_{layer}/attention/self/{proj}/kernel", True),
            NameRule(p + layer + "attention.self.{proj}.bias", "layers_{layer}/attention/self/{proj}/bias"),
            NameRule(p + layer + "{block}.dense.weight", "layers_{layer}/{block}/dense/kernel", True),
            NameRule(p + layer + "{block}.dense.bias", "layers_{layer}/{block}/dense/bias"),
            NameRule(p + layer + "attention.output.dense.weight", "layers_{layer}/attention/output/dense/kernel",
                     True),
            NameRule(p + layer + "attention.output.dense.bias", "layers_{layer}/attention/output/dense/bias"),
            NameRule(p + layer + "{block}.LayerNorm.weight", "layers_{layer}/{block}/LayerNorm/scale"),
            NameRule(p + layer + "{block}.LayerNorm.bias", "layers_{layer}/{block}/LayerNorm/bias"),
            NameRule(p + layer + "attention.output.LayerNorm.weight",
                     "layers_{layer}/attention/output/LayerNorm/scale"),
            NameRule(p + layer + "attention.output.LayerNorm.bias", "layers_{layer}/attention/output/LayerNorm/bias"),
            NameRule(p + "pooler.dense.weight", "pooler/dense/kernel", True, optional=True),
            NameRule(p + "pooler.dense.bias", "pooler/dense/bias", optional=True),
        )

    other = "" if prefix else "bert."
    head = (NameRule("classifier.weight", "classifier/kernel", True), NameRule("classifier.bias", "classifier/bias"))
    return NameTable((*rules(prefix), *rules(other), *head),
                     ignored=(r"(bert\.)?embeddings\.position_ids", r"cls\..*"))


HF_ENCODER_NAMES = _hf_table("")
HF_CLASSIFIER_NAMES = _hf_table("bert.")


def hf_names(config: BertConfig) -> NameTable:
    """The Hugging Face name table for a config: ``BertForSequenceClassification``'s with a head, else ``BertModel``'s."""
    return HF_CLASSIFIER_NAMES if config.num_labels else HF_ENCODER_NAMES


# ----------------------------------------------------------------------------- the family


def _unstacked(config: BertConfig) -> BertConfig:
    return dataclasses.replace(config, scan_layers=False)


FAMILY = families.register(Family(
    name="bert", specs=specs, forward=forward, hooks=hook_points,
    names=CheckpointNames(hf=HF_ENCODER_NAMES, hf_model_types=MODEL_TYPES, from_hf_config=BertConfig.from_hf,
                          to_hf_config=BertConfig.to_hf, hf_for_config=hf_names),
    num_layers=operator.attrgetter("num_layers"), unstacked=_unstacked,
    max_positions=operator.attrgetter("max_position_embeddings"), classify=classify,
))


def model(config: BertConfig) -> Model:
    """The :class:`~jpeft.models.model.Model` value of this config."""
    return Model(FAMILY, config)
