"""Prefix tuning: trained keys and values in front of every attention layer's (Li & Liang, 2021).

Each layer attends to ``n`` extra key/value rows besides the real tokens' keys and
values. The adapter holds them for all layers at once::

    {"prefix": {"key": (L, n, K*H), "value": (L, n, K*H)}}

(``L`` layers, ``K`` key/value heads of size ``H``; keys are used as they are, no
RoPE). ``apply`` puts each layer's rows at the model's ``self_attn/prefix/{key,value}``
hook (see :mod:`jpeft.models.llama`), stacked under ``layers`` when the parameters
are, so the same adapter works with ``scan_layers`` on or off. The prefix takes the
first ``n`` slots of the sequence (and of a KV cache); the real tokens start at
position ``n``, as in Hugging Face PEFT.

A direct prefix starts either from the base model's own keys and values of a text
(``init="text"``: the fresh adapter is exactly that text written before every input,
which trains stably) or at random (``init="normal"``, as Hugging Face PEFT; a random
prefix in key/value space disturbs a pretrained model and, on SmolLM2, diverged).

With ``projection=True`` (the paper's reparameterisation, PEFT's ``prefix_projection``)
training runs an MLP ``prefix = W2 tanh(W1 e + b1) + b2`` over free embeddings ``e``;
the adapter is ``{"prefix_encoder": {...}}`` and :func:`fold` turns it into the direct
form above for saving and inference. ``apply`` accepts both forms.

A prefix cannot be folded into the base weights: ``merge`` returns the base
parameters plus the prefix hook entries as plain arrays.

Example:
    >>> import jax, jpeft
    >>> from jpeft.models import llama
    >>> config = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                            num_layers=2, num_heads=4, num_kv_heads=2)
    >>> params = llama.init_params(config, jax.random.key(0))
    >>> method = jpeft.prefix_tuning(num_virtual_tokens=3)
    >>> adapter = method.init(jax.random.key(1), params)
    >>> adapter["prefix"]["key"].shape
    (2, 3, 8)
    >>> llama.forward(method.apply(params, adapter), config, jax.numpy.ones((1, 4), "int32"))[0].shape
    (1, 4, 32)
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.methods.base import Method, tile_ids

_DIRECT = {"prefix/key", "prefix/value"}
_ENCODER = {"prefix_encoder/embedding", "prefix_encoder/dense_in/kernel", "prefix_encoder/dense_in/bias",
            "prefix_encoder/dense_out/kernel", "prefix_encoder/dense_out/bias"}


def _layout(params: Any) -> tuple[list[str], bool, int, int, int]:
    """``(layer names, stacked?, num_layers, K*H, D)`` of a Llama-family parameter tree."""
    stacked = "layers" in params
    names = ["layers"] if stacked else sorted(
        (k for k in params if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k.split("_")[1]))
    try:
        k_proj = params[names[0]]["self_attn"]["k_proj"]["kernel"]
        d_model = params["embed_tokens"]["embedding"].shape[-1]
    except (IndexError, KeyError, TypeError):
        raise ValueError("prefix tuning needs a Llama-family parameter tree (layers_{i}/self_attn/k_proj/kernel "
                         "or a stacked layers/... subtree, and embed_tokens/embedding); see jpeft.models.llama"
                         ) from None
    num_layers = k_proj.shape[0] if stacked else len(names)
    return names, stacked, num_layers, k_proj.shape[-1], d_model


def encode(adapter: Any) -> tuple[jax.Array, jax.Array]:
    """``(key, value)``, each ``(L, n, K*H)``, of a prefix adapter (direct or projected).

    Example:
        >>> import jax.numpy as jnp
        >>> encode({"prefix": {"key": jnp.zeros((2, 3, 8)), "value": jnp.ones((2, 3, 8))}})[1].shape
        (2, 3, 8)
    """
    if "prefix" in adapter:
        return adapter["prefix"]["key"], adapter["prefix"]["value"]
    enc = adapter["prefix_encoder"]
    h_NxE = jnp.tanh(enc["embedding"] @ enc["dense_in"]["kernel"] + enc["dense_in"]["bias"])
    kv_2xLxNxKH = jnp.einsum("ne,eslk->slnk", h_NxE, enc["dense_out"]["kernel"])
    kv_2xLxNxKH = kv_2xLxNxKH + enc["dense_out"]["bias"][:, :, None, :]
    return kv_2xLxNxKH[0], kv_2xLxNxKH[1]


def fold(adapter: Any) -> dict:
    """The direct form ``{"prefix": {"key", "value"}}`` of a prefix adapter.

    Folds the training-time MLP reparameterisation away; use it before saving. A direct
    adapter is returned as it is.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import llama
        >>> c = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2)
        >>> params = llama.init_params(c, jax.random.key(0))
        >>> adapter = jpeft.prefix_tuning(4, projection=True).init(jax.random.key(1), params)
        >>> fold(adapter)["prefix"]["value"].shape
        (2, 4, 8)
    """
    key_LxNxKH, value_LxNxKH = encode(adapter)
    return {"prefix": {"key": key_LxNxKH, "value": value_LxNxKH}}


def _with_prefix(params: Any, key_LxNxKH: jax.Array, value_LxNxKH: jax.Array) -> dict:
    """``params`` plus each layer's ``self_attn/prefix`` entry (the base arrays are not copied)."""
    names, stacked, num_layers, kv_width, _ = _layout(params)
    for name, x in (("key", key_LxNxKH), ("value", value_LxNxKH)):
        if x.ndim != 3 or x.shape[0] != num_layers or x.shape[2] != kv_width:
            raise ValueError(f"the prefix {name} has shape {tuple(x.shape)} but this model needs "
                             f"({num_layers}, n, {kv_width}) (layers, prefix length, key/value width); "
                             "was the adapter made for another model?")
    if key_LxNxKH.shape != value_LxNxKH.shape:
        raise ValueError(f"prefix key and value shapes differ: {key_LxNxKH.shape} vs {value_LxNxKH.shape}")
    out = dict(params)
    for i, name in enumerate(names):
        attn = dict(out[name]["self_attn"])
        if "prefix" in attn:
            raise ValueError("these parameters already carry a prefix; apply one prefix at a time.")
        attn["prefix"] = ({"key": key_LxNxKH, "value": value_LxNxKH} if stacked
                          else {"key": key_LxNxKH[i], "value": value_LxNxKH[i]})
        out[name] = {**out[name], "self_attn": attn}
    return out


def _text_prefix(params: Any, config: Any, init_ids: Sequence[int], n: int, num_layers: int, dtype) -> dict:
    """``{"key", "value"}``: the model's keys and values of ``init_ids`` repeated to ``n`` tokens."""
    from jpeft.models import llama  # the method module stays importable without the model

    if config.num_layers != num_layers or config.scan_layers != ("layers" in params):
        raise ValueError(f"config (num_layers={config.num_layers}, scan_layers={config.scan_layers}) does not "
                         f"describe these parameters ({num_layers} layers, "
                         f"{'stacked' if 'layers' in params else 'unstacked'}); pass the model's own config")
    tiled = tile_ids(init_ids, n, config.vocab_size)
    key_LxNxKH, value_LxNxKH = llama.keys_values_of_text(params, config, tiled)
    return {"key": key_LxNxKH.astype(dtype), "value": value_LxNxKH.astype(dtype)}


def prefix_tuning(
    num_virtual_tokens: int = 20,
    *,
    init: str | None = None,
    init_ids: Sequence[int] | None = None,
    config: Any = None,
    projection: bool = False,
    hidden_size: int | None = None,
    init_std: float = 1.0,
    dtype=jnp.float32,
) -> Method:
    """Builds a prefix-tuning method.

    Args:
        num_virtual_tokens: ``n``, the prefix length of every layer.
        init: how a direct prefix starts. ``"text"``: the base model's own keys and
            values of the text ``init_ids`` (repeated to fill ``n``), so the fresh adapter
            acts exactly as that text written before the input (Li & Liang, 2021, found
            initialising from real words' activations trains more stably); needs ``config``.
            ``"normal"``: ``N(0, init_std^2)`` (Hugging Face PEFT's choice). Default:
            ``"text"`` when ``init_ids`` is given, else ``"normal"``.
        init_ids: token ids of the initialisation text, e.g. the tokenized
            ``"Write a headline for this article:"``.
        config: the model's :class:`jpeft.models.llama.LlamaConfig` (``init="text"`` runs
            the model over the text).
        projection: train through the MLP reparameterisation (see the module docstring);
            its free embeddings start ``N(0, 1)`` and the MLP as PyTorch's ``nn.Linear``.
            Only with ``init="normal"``: an MLP output cannot start at a given text.
        hidden_size: width of that MLP; default the model width ``D``.
        init_std: standard deviation for ``init="normal"`` (PEFT: 1).
        dtype: dtype of the trained arrays.

    Returns:
        A :class:`jpeft.Method`; its ``apply`` and ``merge`` accept direct and projected
        adapters.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import llama
        >>> c = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2)
        >>> params = llama.init_params(c, jax.random.key(0))
        >>> method = jpeft.prefix_tuning(4, projection=True, hidden_size=16)
        >>> adapter = method.init(jax.random.key(1), params)
        >>> adapter["prefix_encoder"]["dense_out"]["kernel"].shape  # (hidden, key|value, L, K*H)
        (16, 2, 2, 8)
    """
    if not isinstance(num_virtual_tokens, int) or isinstance(num_virtual_tokens, bool) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
    if hidden_size is not None and (not isinstance(hidden_size, int) or hidden_size < 1):
        raise ValueError(f"hidden_size must be a positive int or None, got {hidden_size!r}")
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    init = init or ("text" if init_ids is not None else "normal")
    if init not in ("text", "normal"):
        raise ValueError(f"prefix init must be 'text' or 'normal', got {init!r}")
    if init == "text":
        if init_ids is None or len(init_ids) == 0 or config is None:
            raise ValueError("init='text' needs init_ids (token ids of a non-empty text) and config (the "
                             "model's LlamaConfig, to run the model over the text)")
        if projection:
            raise ValueError("init='text' sets the prefix itself, but with projection=True an MLP produces it; "
                             "use projection=False with init='text', or init='normal' with projection=True")
    elif init_ids is not None:
        raise ValueError("init_ids is only used by init='text'")
    expected = _ENCODER if projection else _DIRECT

    def init_fn(key: jax.Array, params: Any) -> dict:
        _, _, num_layers, kv_width, d_model = _layout(params)
        n = num_virtual_tokens
        if init == "text":
            return {"prefix": _text_prefix(params, config, init_ids, n, num_layers, dtype)}
        if not projection:
            k_key, k_value = jax.random.split(key)
            shape = (num_layers, n, kv_width)
            return {"prefix": {"key": init_std * jax.random.normal(k_key, shape, dtype),
                               "value": init_std * jax.random.normal(k_value, shape, dtype)}}
        hidden = hidden_size or d_model
        keys = jax.random.split(key, 5)
        uniform = lambda k, shape, fan_in: jax.random.uniform(k, shape, dtype, -1 / math.sqrt(fan_in),
                                                              1 / math.sqrt(fan_in))
        return {"prefix_encoder": {
            "embedding": jax.random.normal(keys[0], (n, d_model), dtype),
            "dense_in": {"kernel": uniform(keys[1], (d_model, hidden), d_model),
                         "bias": uniform(keys[2], (hidden,), d_model)},
            "dense_out": {"kernel": uniform(keys[3], (hidden, 2, num_layers, kv_width), hidden),
                          "bias": uniform(keys[4], (2, num_layers, kv_width), hidden)},
        }}

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> dict:
        del rng
        leaves = set(tree.flatten(adapter))
        if leaves != expected and leaves != _DIRECT:
            raise ValueError(
                f"this is not a prefix_tuning adapter: expected leaves {sorted(expected)}"
                f"{'' if expected == _DIRECT else f' (or, folded, {sorted(_DIRECT)})'}, got {sorted(leaves)[:6]}. "
                "Was it made by another method?")
        if leaves == _ENCODER:
            d_model = _layout(params)[4]
            if adapter["prefix_encoder"]["embedding"].shape[-1] != d_model:
                raise ValueError(f"the prefix encoder's embeddings are "
                                 f"{adapter['prefix_encoder']['embedding'].shape[-1]} wide but this model's are "
                                 f"{d_model}; was the adapter made for another model?")
        return _with_prefix(params, *encode(adapter))

    return Method("prefix_tuning", init_fn, apply_fn, apply_fn)
