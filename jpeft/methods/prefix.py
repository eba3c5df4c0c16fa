"""Prefix tuning: trained keys and values in front of every attention layer's (Li & Liang, 2021).

Each layer attends to ``n`` extra key/value rows besides the real tokens' keys and
values. The adapter holds them for all layers at once, per key/value hook point the model
declares::

    {"prefix": {"key": (L, n, K*H), "value": (L, n, K*H)}}

(``L`` layers, ``K`` key/value heads of size ``H``; keys are used as they are, no RoPE).
``apply`` attaches them at the model's hook points (``kv``
:class:`~jpeft.models.hooks.HookPoint` values), so the same adapter works whether the model
stacks its layers or not. A decoder-only model and BERT have one point, ``prefix``; T5 has
three (``encoder_prefix``, ``prefix`` for the decoder's self-attention and ``cross_prefix``),
and the adapter has one entry per point fed (``hook_points=`` chooses). The prefix takes
the first ``n`` slots of the sequence (and of a KV cache); the real tokens start at
position ``n``, as in Hugging Face PEFT.

A direct prefix starts either from the base model's own keys and values of a text
(``init="text"``: the fresh adapter is exactly that text written before every input,
which trains stably) or at random (``init="normal"``, as Hugging Face PEFT; a random
prefix in key/value space disturbs a pretrained model and, on SmolLM2, diverged).

With ``projection=True`` (the paper's reparameterisation, PEFT's ``prefix_projection``)
training runs an MLP ``prefix = W2 tanh(W1 e + b1) + b2`` over free embeddings ``e``;
the adapter is ``{"prefix_encoder": {...}}`` (one output layer per hook point) and :func:`fold` turns it into the direct
form above for saving and inference. ``apply`` accepts both forms.

A prefix cannot be folded into the base weights: ``merge`` returns the base
parameters with the prefix attached.

Example:
    >>> import jax, jpeft
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                       num_layers=2, num_heads=4, num_kv_heads=2))
    >>> params = model.init(jax.random.key(0))
    >>> method = jpeft.prefix_tuning(num_virtual_tokens=3, model=model)
    >>> adapter = method.init(jax.random.key(1), params)
    >>> adapter["prefix"]["key"].shape
    (2, 3, 8)
    >>> model.forward(method.apply(params, adapter), jax.numpy.ones((1, 4), "int32"))[0].shape
    (1, 4, 32)
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.errors import SettingError
from jpeft.methods import registry
from jpeft.methods.base import Method, text_ids, tile_ids
import jpeft.models.hooks as hooks

def _points(model: Any, names: Sequence[str] | None) -> tuple[list[hooks.HookPoint], int]:
    """The key/value hook points to feed (every one the model has, or ``names``) and the model width ``D``."""
    if model is None:
        raise ValueError("prefix tuning feeds the model's key/value hook points: pass model= (a jpeft.models.Model)")
    kv = [p for p in model.hooks.values() if p.kind == "kv"]
    if not kv:
        raise ValueError(f"the {model.name!r} model has no key/value hook point, so it cannot take a prefix")
    if names is not None:
        known = {p.name: p for p in kv}
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise SettingError("hook_points", tuple(names), f"must name some of the {model.name!r} model's key/value "
                               f"hook points {sorted(known)}")
        kv = [known[n] for n in dict.fromkeys(names)]
    prompt = model.hooks.get("prompt")
    return kv, (prompt.width if prompt is not None else kv[0].width)


def _out_name(point_name: str) -> str:
    """The prefix encoder's output layer for one hook point (``dense_out`` for ``prefix``)."""
    return "dense_out" if point_name == "prefix" else f"dense_out_{point_name}"


def _leaves(names: Sequence[str], projection: bool) -> set[str]:
    if not projection:
        return {f"{n}/{kv}" for n in names for kv in ("key", "value")}
    return {"prefix_encoder/embedding", "prefix_encoder/dense_in/kernel", "prefix_encoder/dense_in/bias"} | {
        f"prefix_encoder/{_out_name(n)}/{w}" for n in names for w in ("kernel", "bias")}


def encode(adapter: Any) -> dict:
    """``{hook point: {"key", "value"}}``, each ``(L, n, K*H)``, of a prefix adapter (direct or projected).

    Example:
        >>> import jax.numpy as jnp
        >>> encode({"prefix": {"key": jnp.zeros((2, 3, 8)), "value": jnp.ones((2, 3, 8))}})["prefix"]["value"].shape
        (2, 3, 8)
    """
    if "prefix_encoder" not in adapter:
        return {name: {"key": rows["key"], "value": rows["value"]} for name, rows in adapter.items()}
    enc = adapter["prefix_encoder"]
    h_NxE = jnp.tanh(enc["embedding"] @ enc["dense_in"]["kernel"] + enc["dense_in"]["bias"])
    out = {}
    for layer_name, dense in enc.items():
        if not layer_name.startswith("dense_out"):
            continue
        kv_2xLxNxKH = jnp.einsum("ne,eslk->slnk", h_NxE, dense["kernel"]) + dense["bias"][:, :, None, :]
        point_name = "prefix" if layer_name == "dense_out" else layer_name[len("dense_out_"):]
        out[point_name] = {"key": kv_2xLxNxKH[0], "value": kv_2xLxNxKH[1]}
    return out


def fold(adapter: Any) -> dict:
    """The direct form ``{hook point: {"key", "value"}}`` of a prefix adapter.

    Folds the training-time MLP reparameterisation away; use it before saving. A direct
    adapter is returned as it is.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import llama
        >>> model = llama.model(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                                       num_layers=2, num_heads=2))
        >>> adapter = jpeft.prefix_tuning(4, projection=True, model=model).init(jax.random.key(1),
        ...                                                                    model.init(jax.random.key(0)))
        >>> fold(adapter)["prefix"]["value"].shape
        (2, 4, 8)
    """
    return encode(adapter)


def _text_prefix(params: Any, model: Any, init_ids: Sequence[int], n: int, dtype) -> dict:
    """``{"key", "value"}``: the model's keys and values of ``init_ids`` repeated to ``n`` tokens."""
    if model.family.keys_values_of_text is None:
        raise ValueError(f"the {model.name!r} model cannot compute the keys and values of a text; use init='normal'")
    if set(tree.flatten(params)) != set(tree.flatten(model.abstract_params())):
        raise ValueError("the model this method was built with does not describe these parameters (are their layers "
                         "stacked the same way?); build it with the parameters' own model")
    prompt = model.hooks.get("prompt")
    table = tree.flatten(params).get(prompt.source) if prompt is not None else None
    vocab = table.shape[0] if table is not None else max(int(i) for i in init_ids) + 1
    key_LxNxKH, value_LxNxKH = model.family.keys_values_of_text(params, model.config, tile_ids(init_ids, n, vocab))
    return {"key": key_LxNxKH.astype(dtype), "value": value_LxNxKH.astype(dtype)}


def prefix_tuning(
    num_virtual_tokens: int = 20,
    *,
    init: Literal["text", "normal"] | None = None,
    init_text: str | None = None,
    init_ids: Sequence[int] | None = None,
    projection: bool = False,
    hidden_size: int | None = None,
    init_std: float = 1.0,
    dtype=jnp.float32,
    model: Any = None,
    tokenizer: Any = None,
    hook_points: Sequence[str] | None = None,
) -> Method:
    """Builds a prefix-tuning method.

    Args:
        num_virtual_tokens: ``n``, the prefix length of every layer.
        init: how a direct prefix starts. ``"text"``: the base model's own keys and
            values of a text (repeated to fill ``n``), so the fresh adapter acts exactly as
            that text written before the input (Li & Liang, 2021, found initialising from
            real words' activations trains more stably). ``"normal"``: ``N(0, init_std^2)``
            (Hugging Face PEFT's choice). Default: ``"text"`` when a text is given.
        init_text: the initialisation text, e.g. ``"Write a headline for this article:"``
            (needs ``tokenizer``); or give its token ids as ``init_ids``.
        init_ids: token ids of the initialisation text.
        projection: train through the MLP reparameterisation (see the module docstring);
            its free embeddings start ``N(0, 1)`` and the MLP as PyTorch's ``nn.Linear``.
            Only with ``init="normal"``: an MLP output cannot start at a given text.
        hidden_size: width of that MLP; default the model width ``D``.
        init_std: standard deviation for ``init="normal"`` (PEFT: 1).
        dtype: dtype of the trained arrays.
        model: the :class:`jpeft.models.Model` (its ``prefix`` hook point, and for
            ``init="text"`` the keys and values of the text).
        tokenizer: turns ``init_text`` into ids.
        hook_points: the model's key/value hook points to feed; default every one it
            declares (a decoder-only model or BERT: ``prefix``; T5: ``encoder_prefix``,
            ``prefix`` and ``cross_prefix``, the paper's encoder-decoder setting). Hugging
            Face PEFT's T5 prefix feeds the decoder's self-attention only: ``("prefix",)``.

    Returns:
        A :class:`jpeft.Method`; its ``apply`` and ``merge`` accept direct and projected
        adapters.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import llama
        >>> model = llama.model(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
        ...                                       num_layers=2, num_heads=2))
        >>> method = jpeft.prefix_tuning(4, projection=True, hidden_size=16, model=model)
        >>> adapter = method.init(jax.random.key(1), model.init(jax.random.key(0)))
        >>> adapter["prefix_encoder"]["dense_out"]["kernel"].shape  # (hidden, key|value, L, K*H)
        (16, 2, 2, 8)
    """
    if not isinstance(num_virtual_tokens, int) or isinstance(num_virtual_tokens, bool) or num_virtual_tokens < 1:
        raise SettingError("num_virtual_tokens", num_virtual_tokens, "must be a positive int")
    if hidden_size is not None and (not isinstance(hidden_size, int) or hidden_size < 1):
        raise SettingError("hidden_size", hidden_size, "must be a positive int or None")
    if not init_std > 0:
        raise SettingError("init_std", init_std, "must be > 0")
    if init not in (None, "text", "normal"):
        raise SettingError("init", init, "must be one of ('text', 'normal')", what="prefix")
    has_text = init_text is not None or init_ids is not None
    init = init or ("text" if has_text else "normal")
    if init == "text":
        if not has_text:
            raise SettingError("init", init, "needs init_text (or its init_ids): a non-empty text")
        if projection:
            raise SettingError("projection", projection, "needs init='normal': an MLP's output cannot start at a "
                               "text's keys and values (use projection=False with init='text')")
    elif has_text:
        raise SettingError("init", init, "does not read a text; drop init_text/init_ids or use init='text'")
    init_ids = text_ids(init_text, init_ids, tokenizer, "prefix_tuning")
    points, d_model = _points(model, hook_points)
    names = [p.name for p in points]
    if init == "text" and names != ["prefix"]:
        raise SettingError("init", init, f"starts only the 'prefix' hook point from a text, but this method feeds "
                           f"{names}; pass hook_points=('prefix',) or use init='normal'")
    expected = _leaves(names, projection)

    def init_fn(key: jax.Array, params: Any) -> dict:
        n = num_virtual_tokens
        if init == "text":
            return {"prefix": _text_prefix(params, model, init_ids, n, dtype)}
        keys = iter(jax.random.split(key, 3 + 2 * len(points)))
        if not projection:
            return {p.name: {"key": init_std * jax.random.normal(next(keys), (p.layers, n, p.width), dtype),
                             "value": init_std * jax.random.normal(next(keys), (p.layers, n, p.width), dtype)}
                    for p in points}
        hidden = hidden_size or d_model
        uniform = lambda k, shape, fan_in: jax.random.uniform(k, shape, dtype, -1 / math.sqrt(fan_in),
                                                              1 / math.sqrt(fan_in))
        encoder = {"embedding": jax.random.normal(next(keys), (n, d_model), dtype),
                   "dense_in": {"kernel": uniform(next(keys), (d_model, hidden), d_model),
                                "bias": uniform(next(keys), (hidden,), d_model)}}
        for p in points:
            encoder[_out_name(p.name)] = {"kernel": uniform(next(keys), (hidden, 2, p.layers, p.width), hidden),
                                          "bias": uniform(next(keys), (2, p.layers, p.width), hidden)}
        return {"prefix_encoder": encoder}

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> dict:
        del rng
        model.check_params(params)
        leaves = set(tree.flatten(adapter))
        direct = _leaves(names, projection=False)
        if leaves != expected and leaves != direct:
            raise ValueError(
                f"this is not a prefix_tuning adapter for hook points {names}: expected leaves {sorted(expected)}"
                f"{'' if expected == direct else f' (or, folded, {sorted(direct)})'}, got {sorted(leaves)[:6]}. "
                "Was it made by another method, or for other hook points?")
        if "prefix_encoder" in adapter and adapter["prefix_encoder"]["embedding"].shape[-1] != d_model:
            raise ValueError(f"the prefix encoder's embeddings are "
                             f"{adapter['prefix_encoder']['embedding'].shape[-1]} wide but this model's are "
                             f"{d_model}; was the adapter made for another model?")
        rows = encode(adapter)
        for point in points:
            params = hooks.attach(params, point, rows[point.name])
        return params

    label = "prefix_tuning" + (" (text init)" if init == "text" else " (random init)") + (
        ", projection" if projection else "")
    return Method("prefix_tuning", init_fn, apply_fn, apply_fn, fold=fold, merge_blocker=_not_mergeable,
                  label=label)


def _not_mergeable(params: Any) -> str:
    del params
    return "a prefix is extra keys and values, not a change of weights: run it with apply"


registry.register("prefix_tuning", prefix_tuning)
