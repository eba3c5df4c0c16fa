"""Prompt tuning and P-tuning: trained virtual tokens in front of the input.

Both methods give the model ``n`` virtual-token embeddings ``(n, D)`` at its ``prompt``
hook point (a ``tokens`` :class:`~jpeft.models.hooks.HookPoint` the model declares): the
model puts them before the input embeddings, extends the attention mask and positions,
and returns outputs for the real tokens only, so a loss over real tokens needs no change.

* Prompt tuning (Lester et al., 2021) trains the embeddings directly. The adapter is
  ``{"prompt": {"embeddings": (n, D)}}``, initialised from the embeddings of a text
  (``init_text`` with a tokenizer, or its ``init_ids``), of random vocabulary rows, or at random.
* P-tuning (Liu et al., 2021) trains a prompt encoder, an MLP or a bidirectional LSTM
  followed by an MLP (as Hugging Face PEFT's ``PromptEncoder``), that maps free input
  embeddings to the virtual tokens. The adapter is ``{"prompt_encoder": {...}}``;
  :func:`fold` (the method's ``fold``) turns it into the prompt-tuning form (the encoder is
  only needed for training), and :func:`p_tuning`'s ``apply`` accepts both forms.

A prompt cannot be folded into the base weights: ``merge`` returns the base
parameters with the prompt attached, which only models that declare the hook use.

Example:
    >>> import jax, jpeft
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                       num_layers=1, num_heads=4))
    >>> params = model.init(jax.random.key(0))
    >>> method = jpeft.prompt_tuning(num_virtual_tokens=5, init_ids=[3, 7], model=model)
    >>> adapter = method.init(jax.random.key(1), params)
    >>> adapter["prompt"]["embeddings"].shape
    (5, 16)
    >>> logits, _ = model.forward(method.apply(params, adapter), jax.numpy.ones((2, 4), "int32"))
    >>> logits.shape  # the 5 virtual tokens are not in the output
    (2, 4, 32)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jpeft import ops, tree
from jpeft.errors import SettingError
from jpeft.methods import registry
from jpeft.methods.base import Method, text_ids, tile_ids
import jpeft.models.hooks as hooks

_INITS = ("vocab", "text", "normal")
_ENCODERS = ("mlp", "lstm")


# ----------------------------------------------------------------------------- checks


def prompt_point(model: Any, method: str) -> hooks.HookPoint:
    """The model's ``prompt`` hook point (virtual tokens before the input)."""
    if model is None:
        raise ValueError(f"{method} feeds the model's 'prompt' hook point: pass model= (a jpeft.models.Model)")
    point = model.hook("prompt")
    if point.kind != "tokens" or point.source is None:
        raise ValueError(f"the {model.name!r} model's 'prompt' hook is not a tokens hook with an embedding table")
    return point


def _token_table(params: Any, point: hooks.HookPoint):
    """The base model's token embedding table ``(vocab, D)`` the hook point names."""
    flat = tree.flatten(params)
    if point.source not in flat:
        raise ValueError(f"the prompt hook reads the token embeddings at {point.source!r}, which these "
                         "parameters lack; are they the model's parameters?")
    return flat[point.source]


def _expect_leaves(adapter: Any, expected: set[str], method: str) -> dict:
    """The adapter's flat leaves, which must be exactly ``expected``."""
    flat = tree.flatten(adapter)
    if set(flat) != expected:
        raise ValueError(
            f"this is not a {method} adapter: expected leaves {sorted(expected)}, got {sorted(flat)[:6]}"
            f"{' ...' if len(flat) > 6 else ''}. Was it made by another method?")
    return flat


def _with_prompt(params: Any, point: hooks.HookPoint, embeddings_NxD: jax.Array) -> Any:
    """``params`` with the prompt attached at its hook point (the base arrays are not copied)."""
    d_model = _token_table(params, point).shape[-1]
    if embeddings_NxD.ndim != 2 or embeddings_NxD.shape[-1] != d_model:
        raise ValueError(f"the prompt has shape {tuple(embeddings_NxD.shape)} but this model's embeddings are "
                         f"{d_model} wide; was the adapter made for another model?")
    return hooks.attach(params, point, embeddings_NxD)


def _text_embeddings(table, init_ids: Sequence[int], n: int, dtype) -> jax.Array:
    """``(n, D)``: the embeddings of ``init_ids`` repeated to ``n`` tokens, as Hugging Face PEFT does."""
    vocab = table.shape[-2]
    if isinstance(table, jax.ShapeDtypeStruct):
        raise ValueError("a text initialisation reads the embedding table, which is only a shape here; pass "
                         "concrete parameters, or use jax.eval_shape(method.init, key, params) for shapes")
    ids_N = jnp.asarray(tile_ids(init_ids, n, vocab), jnp.int32)
    return ops.embed(ids_N, table, jnp.float32).astype(dtype)


def _check_count(num_virtual_tokens: int) -> None:
    if not isinstance(num_virtual_tokens, int) or isinstance(num_virtual_tokens, bool) or num_virtual_tokens < 1:
        raise SettingError("num_virtual_tokens", num_virtual_tokens, "must be a positive int")


# ----------------------------------------------------------------------------- prompt tuning


def prompt_tuning(
    num_virtual_tokens: int = 20,
    *,
    init: Literal["text", "vocab", "normal"] | None = None,
    init_text: str | None = None,
    init_ids: Sequence[int] | None = None,
    init_std: float = 0.02,
    dtype=jnp.float32,
    model: Any = None,
    tokenizer: Any = None,
) -> Method:
    """Builds a prompt-tuning method: ``n`` trained virtual-token embeddings.

    Args:
        num_virtual_tokens: ``n``, typically 20 to 100.
        init: ``"text"`` (the embeddings of a text, repeated to fill ``n`` as Hugging Face
            PEFT does), ``"vocab"`` (rows of ``n`` random vocabulary tokens) or ``"normal"``
            (``N(0, init_std^2)``, needs only shapes). Default: ``"text"`` when a text is
            given, else ``"vocab"``.
        init_text: the initialisation text, e.g. ``"Write a headline for this article:"``
            (needs ``tokenizer``); or give its token ids as ``init_ids``.
        init_ids: token ids of the initialisation text.
        init_std: standard deviation for ``init="normal"``.
        dtype: dtype of the trained embeddings.
        model: the :class:`jpeft.models.Model` (its ``prompt`` hook point).
        tokenizer: turns ``init_text`` into ids (a Hugging Face tokenizer or ``text -> ids``).

    Returns:
        A :class:`jpeft.Method` whose adapter is ``{"prompt": {"embeddings": (n, D)}}``.
    """
    _check_count(num_virtual_tokens)
    if init not in (None, *_INITS):
        raise SettingError("init", init, f"must be one of {_INITS}", what="prompt")
    if not init_std > 0:
        raise SettingError("init_std", init_std, "must be > 0", what="prompt")
    has_text = init_text is not None or init_ids is not None
    init = init or ("text" if has_text else "vocab")
    if (init == "text") != has_text:
        raise SettingError("init", init, "needs init_text (or its init_ids)" if init == "text" else
                           "does not read a text; drop init_text/init_ids or use init='text'")
    init_ids = text_ids(init_text, init_ids, tokenizer, "prompt_tuning")
    if init_ids is not None and len(init_ids) == 0:
        raise SettingError("init_ids", init_ids, "is empty: give the token ids of a non-empty text")
    point = prompt_point(model, "prompt_tuning")

    def init_fn(key: jax.Array, params: Any) -> dict:
        table = _token_table(params, point)
        vocab, d_model = table.shape[-2:]
        if init == "normal":
            embeddings = init_std * jax.random.normal(key, (num_virtual_tokens, d_model), dtype)
            return {"prompt": {"embeddings": embeddings}}
        if isinstance(table, jax.ShapeDtypeStruct):
            raise ValueError(f"init={init!r} reads the embedding table, which is only a shape here; pass "
                             "concrete parameters, use jax.eval_shape(method.init, key, params) for shapes, "
                             "or init='normal'")
        if init == "text":
            return {"prompt": {"embeddings": _text_embeddings(table, init_ids, num_virtual_tokens, dtype)}}
        ids_N = jax.random.randint(key, (num_virtual_tokens,), 0, vocab)
        return {"prompt": {"embeddings": ops.embed(ids_N, table, jnp.float32).astype(dtype)}}

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        del rng
        flat = _expect_leaves(adapter, {"prompt/embeddings"}, "prompt_tuning")
        return _with_prompt(params, point, flat["prompt/embeddings"])

    label = "prompt_tuning" + {"text": " (text init)", "vocab": "", "normal": " (random init)"}[init]
    return Method("prompt_tuning", init_fn, apply_fn, apply_fn, merge_blocker=_not_mergeable, label=label)


def _not_mergeable(params: Any) -> str:
    del params
    return "a prompt is extra input, not a change of weights: run it with apply"


# ----------------------------------------------------------------------------- P-tuning


def _dense_init(key: jax.Array, d_in: int, d_out: int, dtype) -> dict:
    """PyTorch's ``nn.Linear`` default init: kernel and bias ~ U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(d_in)
    k_kernel, k_bias = jax.random.split(key)
    return {"kernel": jax.random.uniform(k_kernel, (d_in, d_out), dtype, -bound, bound),
            "bias": jax.random.uniform(k_bias, (d_out,), dtype, -bound, bound)}


def _mlp(layers: dict, x_NxI: jax.Array) -> jax.Array:
    """``dense_0 -> relu -> dense_1 -> ... -> dense_k`` (no activation after the last)."""
    for i in range(len(layers)):
        if i:
            x_NxI = jax.nn.relu(x_NxI)
        x_NxI = x_NxI @ layers[f"dense_{i}"]["kernel"] + layers[f"dense_{i}"]["bias"]
    return x_NxI


def _lstm_init(key: jax.Array, d_in: int, hidden: int, dtype) -> dict:
    """One direction: fused gate weights (order i, f, g, o, as PyTorch), init U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden)
    keys = jax.random.split(key, 3)
    uniform = lambda k, shape: jax.random.uniform(k, shape, dtype, -bound, bound)
    return {"w_ih": uniform(keys[0], (d_in, 4 * hidden)), "w_hh": uniform(keys[1], (hidden, 4 * hidden)),
            "bias": uniform(keys[2], (4 * hidden,))}


def _lstm_direction(p: dict, x_NxI: jax.Array, reverse: bool) -> jax.Array:
    """Hidden states ``(n, H)`` of one LSTM direction, aligned with the input rows."""
    hidden = p["w_hh"].shape[0]

    def step(carry, x_I):
        h_H, c_H = carry
        gates_4H = x_I @ p["w_ih"] + h_H @ p["w_hh"] + p["bias"]
        i_H, f_H, g_H, o_H = jnp.split(gates_4H, 4)
        c_H = jax.nn.sigmoid(f_H) * c_H + jax.nn.sigmoid(i_H) * jnp.tanh(g_H)
        h_H = jax.nn.sigmoid(o_H) * jnp.tanh(c_H)
        return (h_H, c_H), h_H

    zeros_H = jnp.zeros((hidden,), x_NxI.dtype)
    _, h_NxH = jax.lax.scan(step, (zeros_H, zeros_H), x_NxI, reverse=reverse)
    return h_NxH


def _bilstm(layers: dict, x_NxI: jax.Array) -> jax.Array:
    """Stacked bidirectional LSTM: each layer's output is ``[forward, backward]`` ``(n, 2H)``."""
    for i in range(len(layers)):
        layer = layers[f"layer_{i}"]
        x_NxI = jnp.concatenate([_lstm_direction(layer["forward"], x_NxI, reverse=False),
                                 _lstm_direction(layer["backward"], x_NxI, reverse=True)], axis=-1)
    return x_NxI


def encode(adapter: Any) -> jax.Array:
    """The virtual-token embeddings ``(n, D)`` of a P-tuning (or prompt-tuning) adapter.

    Example:
        >>> import jax.numpy as jnp
        >>> encode({"prompt": {"embeddings": jnp.zeros((3, 4))}}).shape
        (3, 4)
    """
    if "prompt" in adapter:
        return adapter["prompt"]["embeddings"]
    encoder = adapter["prompt_encoder"]
    x_NxI = encoder["embedding"]
    if "lstm" in encoder:
        x_NxI = _bilstm(encoder["lstm"], x_NxI)
    if "residual_mlp" in encoder:  # residual reparameterisation: embedding + encoder(embedding)
        return encoder["embedding"] + _mlp(encoder["residual_mlp"], x_NxI)
    return _mlp(encoder["mlp"], x_NxI)


def fold(adapter: Any) -> dict:
    """The prompt-tuning form ``{"prompt": {"embeddings"}}`` of a P-tuning adapter.

    Use it before saving: the encoder is only needed for training. An adapter that is
    already folded is returned as it is.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> encoder = {"embedding": jnp.ones((3, 4)), "mlp": {"dense_0": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}}}
        >>> fold({"prompt_encoder": encoder})["prompt"]["embeddings"].tolist()[0]
        [1.0, 1.0, 1.0, 1.0]
    """
    return {"prompt": {"embeddings": encode(adapter)}}


def _encoder_leaves(mlp_layers: int, lstm_layers: int, residual: bool) -> set[str]:
    """The leaf paths of a P-tuning adapter with this structure."""
    leaves = {"prompt_encoder/embedding"}
    mlp = "residual_mlp" if residual else "mlp"
    leaves |= {f"prompt_encoder/{mlp}/dense_{i}/{w}" for i in range(mlp_layers) for w in ("kernel", "bias")}
    leaves |= {f"prompt_encoder/lstm/layer_{i}/{d}/{w}" for i in range(lstm_layers)
               for d in ("forward", "backward") for w in ("w_ih", "w_hh", "bias")}
    return leaves


def p_tuning(
    num_virtual_tokens: int = 20,
    *,
    encoder: Literal["mlp", "lstm"] = "mlp",
    hidden_size: int | None = None,
    lstm_layers: int = 2,
    init: Literal["text", "normal"] | None = None,
    init_text: str | None = None,
    init_ids: Sequence[int] | None = None,
    residual: bool = False,
    dtype=jnp.float32,
    model: Any = None,
    tokenizer: Any = None,
) -> Method:
    """Builds a P-tuning method: virtual tokens made by a trained prompt encoder.

    The encoder follows Hugging Face PEFT's ``PromptEncoder``: free input embeddings
    ``(n, D)`` (``N(0, 1)``), then either an MLP ``D -> H -> H -> D`` with ReLUs
    (``encoder="mlp"``) or a bidirectional LSTM of ``lstm_layers`` layers and width ``H``
    followed by an MLP ``2H -> 2H -> D`` (``encoder="lstm"``).

    Args:
        num_virtual_tokens: ``n``.
        encoder: ``"mlp"`` or ``"lstm"``.
        hidden_size: ``H``; default the model width ``D``.
        lstm_layers: LSTM depth (``encoder="lstm"`` only).
        init: how the free input embeddings start: ``"text"`` (a text's embeddings) or
            ``"normal"`` (``N(0, 1)``, PEFT's choice). Default: ``"text"`` when a text is given.
        init_text: a text whose embeddings (repeated to fill ``n``) the free input
            embeddings start from, instead of ``N(0, 1)`` (needs ``tokenizer``).
        init_ids: the token ids of that text, instead of ``init_text``.
        residual: the residual reparameterisation of Razdaibiedina et al. (2023): the
            virtual tokens are ``embedding + encoder(embedding)`` and the encoder's last
            layer starts at zero, so a fresh adapter is exactly the prompt ``embedding``
            (with ``init_ids``: the text). PEFT's P-tuning has no such option; on a short
            SmolLM2 job it trains far better than the plain encoder (see the README).
        dtype: dtype of the encoder's weights.
        model: the :class:`jpeft.models.Model` (its ``prompt`` hook point).
        tokenizer: turns ``init_text`` into ids.

    Returns:
        A :class:`jpeft.Method` whose adapter is ``{"prompt_encoder": {"embedding", "mlp"
        (``"residual_mlp"`` with ``residual``), ("lstm")}}``. Its ``apply`` also accepts the
        folded form (see :func:`fold`).

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import llama
        >>> model = llama.model(llama.LlamaConfig(vocab_size=6, hidden_size=4, intermediate_size=8,
        ...                                       num_layers=1, num_heads=2))
        >>> method = jpeft.p_tuning(3, encoder="lstm", hidden_size=8, model=model)
        >>> adapter = method.init(jax.random.key(0), model.init(jax.random.key(1)))
        >>> method.fold(adapter)["prompt"]["embeddings"].shape
        (3, 4)
    """
    _check_count(num_virtual_tokens)
    if init not in (None, "text", "normal"):
        raise SettingError("init", init, "must be one of ('text', 'normal')", what="P-tuning")
    if init == "normal" and (init_text is not None or init_ids is not None):
        raise SettingError("init", init, "does not read a text; drop init_text/init_ids or use init='text'")
    if init == "text" and init_text is None and init_ids is None:
        raise SettingError("init", init, "needs init_text (or its init_ids)")
    if encoder not in _ENCODERS:
        raise SettingError("encoder", encoder, f"must be one of {_ENCODERS}", what="P-tuning")
    if hidden_size is not None and (not isinstance(hidden_size, int) or hidden_size < 1):
        raise SettingError("hidden_size", hidden_size, "must be a positive int or None")
    if encoder == "lstm" and (not isinstance(lstm_layers, int) or lstm_layers < 1):
        raise SettingError("lstm_layers", lstm_layers, "must be a positive int")
    init_ids = text_ids(init_text, init_ids, tokenizer, "p_tuning")
    if init_ids is not None and len(init_ids) == 0:
        raise SettingError("init_ids", init_ids, "is empty: give the token ids of a non-empty text, or None")
    point = prompt_point(model, "p_tuning")
    n_lstm = lstm_layers if encoder == "lstm" else 0
    mlp_name = "residual_mlp" if residual else "mlp"

    def init_fn(key: jax.Array, params: Any) -> dict:
        table = _token_table(params, point)
        d_model = table.shape[-1]
        hidden = hidden_size or d_model
        keys = iter(jax.random.split(key, 4 + 2 * n_lstm))
        k_embedding = next(keys)
        out = {"embedding": jax.random.normal(k_embedding, (num_virtual_tokens, d_model), dtype)
               if init_ids is None else _text_embeddings(table, init_ids, num_virtual_tokens, dtype)}
        if encoder == "mlp":
            widths = [d_model, hidden, hidden, d_model]
        else:
            widths = [2 * hidden, 2 * hidden, d_model]
            out["lstm"] = {f"layer_{i}": {
                direction: _lstm_init(next(keys), d_model if i == 0 else 2 * hidden, hidden, dtype)
                for direction in ("forward", "backward")} for i in range(n_lstm)}
        mlp = {f"dense_{i}": _dense_init(next(keys), widths[i], widths[i + 1], dtype)
               for i in range(len(widths) - 1)}
        if residual:  # the encoder adds nothing yet: the virtual tokens are the embeddings
            mlp[f"dense_{len(widths) - 2}"] = jax.tree.map(jnp.zeros_like, mlp[f"dense_{len(widths) - 2}"])
        out[mlp_name] = mlp
        return {"prompt_encoder": out}

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> dict:
        del rng
        if "prompt" in adapter:  # folded
            flat = _expect_leaves(adapter, {"prompt/embeddings"}, "p_tuning (folded)")
            return _with_prompt(params, point, flat["prompt/embeddings"])
        _expect_leaves(adapter, _encoder_leaves(3 if encoder == "mlp" else 2, n_lstm, residual),
                       f"p_tuning ({encoder}{', residual' if residual else ''})")
        return _with_prompt(params, point, encode(adapter))

    label = f"p_tuning ({'residual, ' if residual else ''}{'text' if init_ids is not None else 'random'} init)"
    return Method("p_tuning", init_fn, apply_fn, apply_fn, fold=fold, merge_blocker=_not_mergeable, label=label)


registry.register("prompt_tuning", prompt_tuning)
registry.register("p_tuning", p_tuning)
