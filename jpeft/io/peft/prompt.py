"""Prompt tuning, P-tuning and prefix tuning in the Hugging Face PEFT format (PEFT's "prompt learning"), both directions.

PEFT saves one tensor, ``prompt_embeddings`` (a whole key, no prefix); ``modules_to_save`` copies
(a classifier) sit under ``base_model.<module>``, one level higher than for methods that wrap
layers. Its layout, with ``n = num_virtual_tokens``:

* ``PROMPT_TUNING`` / ``P_TUNING``: ``(n * S, D)``, the virtual-token embeddings. P-tuning's
  prompt encoder is already applied (PEFT saves the encoder's output, not the encoder), so
  jpeft writes :func:`jpeft.methods.prompt.fold` of its adapter and reads the file into the
  folded form. ``S = num_transformer_submodules`` is 2 for ``task_type: SEQ_2_SEQ_LM`` (rows
  ``n:`` are a decoder prompt that PEFT's seq2seq forward does not use; jpeft writes a copy of
  the encoder prompt there and reads rows ``:n``), else 1.
* ``PREFIX_TUNING``: ``(n, L * 2 * K * H)``, every layer's keys and values: block ``2l`` of
  width ``K * H`` is layer ``l``'s keys, block ``2l + 1`` its values, heads first within a
  block (jpeft's ``(L, n, K * H)`` rows). A projected prefix is saved folded (the MLP's output).
  PEFT feeds the decoder's self-attention only (jpeft's ``prefix`` hook point), and for
  ``SEQ_2_SEQ_LM`` its cache split gives decoder layer ``i`` the block pair ``2i mod L``: jpeft
  reads the file that way, and writes an adapter only where that map can hold it (for even
  ``L``, layers ``i`` and ``i + L / 2`` must have the same rows).

``task_type`` says where the virtual tokens go: ``SEQ_2_SEQ_LM`` in an encoder-decoder (the
encoder's input for prompts, the decoder for a prefix), ``CAUSAL_LM``, ``SEQ_CLS`` and
``FEATURE_EXTRACTION`` before the input of a decoder or an encoder. A file whose ``task_type``
(or ``num_transformer_submodules``) does not fit the model is refused. Written config: the
sizes PEFT derives from the model's config (``num_layers``, ``token_dim``,
``num_attention_heads``, with PEFT's grouped-query rule for prefixes) and
``num_transformer_submodules``.

Example:
    >>> PROMPT_TUNING.peft_type, PREFIX_TUNING.shared_keys, P_TUNING.prefix
    ('PROMPT_TUNING', ('prompt_embeddings',), 'base_model.')
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from jpeft.errors import CheckpointError
from jpeft.io.peft import common
from jpeft.methods import prefix as prefix_lib
from jpeft.methods import prompt as prompt_lib

KEY = "prompt_embeddings"
PREFIX = "base_model."
SEQ_2_SEQ = "SEQ_2_SEQ_LM"


def submodules(model) -> int:
    """PEFT's ``num_transformer_submodules`` for ``model``: 2 for an encoder-decoder, else 1."""
    return 2 if model.is_encoder_decoder else 1


def peft_sizes(model, *, prefix: bool) -> dict:
    """``num_layers``, ``token_dim``, ``num_attention_heads`` as PEFT derives them from the model's Hugging Face config.

    For a prefix with grouped-query attention PEFT counts key/value heads: ``token_dim`` is
    their total width. Example (a Llama with 4 query and 2 key/value heads of 16):
    ``{"num_layers": 2, "token_dim": 32, "num_attention_heads": 2}``.
    """
    names = model.names
    if names is None or names.to_hf_config is None:
        raise ValueError(f"the {model.name!r} model has no Hugging Face config, so PEFT's prompt-learning sizes "
                         "cannot be written")
    hf = names.to_hf_config(model.config)
    first = lambda *keys: next((hf[k] for k in keys if hf.get(k) is not None), None)  # noqa: E731
    sizes = {"num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
             "token_dim": first("hidden_size", "n_embd", "d_model"),
             "num_attention_heads": first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")}
    if prefix and hf.get("num_key_value_heads") is not None:
        head_dim = hf.get("head_dim") or sizes["token_dim"] // sizes["num_attention_heads"]
        sizes["token_dim"] = head_dim * hf["num_key_value_heads"]
        sizes["num_attention_heads"] = hf["num_key_value_heads"]
    return sizes


def check_task(config: dict, model) -> int:
    """The file's ``num_transformer_submodules`` after checking that its ``task_type`` fits ``model``."""
    task = config.get("task_type")
    seq2seq = model.is_encoder_decoder
    if (task == SEQ_2_SEQ) != seq2seq:
        want = SEQ_2_SEQ if seq2seq else "CAUSAL_LM, SEQ_CLS or FEATURE_EXTRACTION"
        raise CheckpointError(f"the {config['peft_type']} adapter has task_type={task!r}, but the {model.name!r} model "
                              f"takes {want}: PEFT places virtual tokens by task_type, so it was saved for another "
                              "kind of model")
    count = config.get("num_transformer_submodules") or submodules(model)
    if count != submodules(model):
        raise CheckpointError(f"the {config['peft_type']} adapter has num_transformer_submodules={count}, but the "
                              f"{model.name!r} model has {submodules(model)}")
    return count


def _shared_tensor(shared: dict, peft_type: str) -> np.ndarray:
    if KEY not in shared:
        raise CheckpointError(f"the {peft_type} adapter file has no {KEY!r} tensor")
    return shared[KEY]


def _count(config: dict) -> int:
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CheckpointError(f"the adapter config's num_virtual_tokens is {n!r}; a positive integer is needed")
    return n


# ----------------------------------------------------------------------------- prompt tuning, P-tuning


def _export_prompt(method, params: Any, adapter: Any, model, extra_config: dict) -> tuple[dict, dict]:
    rows_NxD = np.asarray(prompt_lib.encode(method.saved_form(adapter)), np.float32)
    width = prompt_lib.prompt_point(model, method.name).width
    if rows_NxD.shape[-1] != width:
        raise ValueError(f"the prompt is {rows_NxD.shape[-1]} wide, but the {model.name!r} model's embeddings are "
                         f"{width}; it was made for another model")
    count = submodules(model)
    config = {"num_virtual_tokens": int(rows_NxD.shape[0]), "num_transformer_submodules": count,
              **peft_sizes(model, prefix=False), "token_dim": width}
    return {KEY: np.concatenate([rows_NxD] * count)}, {**config, **extra_config}


def _export_prompt_tuning(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    return _export_prompt(method, params, adapter, model, {
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None})


def _export_p_tuning(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    # PEFT runs no encoder over a saved prompt in inference mode; these fields describe a fresh one
    width = prompt_lib.prompt_point(model, method.name).width
    return _export_prompt(method, params, adapter, model, {
        "encoder_reparameterization_type": "MLP", "encoder_hidden_size": width, "encoder_num_layers": 2,
        "encoder_dropout": 0.0})


def _load_prompt(config: dict, modules: dict, params: Any, model, problems: list[str], *,
                 shared: dict) -> tuple[Any, dict]:
    del modules, params
    count, n = check_task(config, model), _count(config)
    rows = _shared_tensor(shared, config["peft_type"])
    width = prompt_lib.prompt_point(model, "prompt tuning").width
    if rows.shape != (n * count, width):
        problems.append(f"{KEY} has shape {rows.shape}, but {n} virtual tokens of the {model.name!r} model's width "
                        f"{width} (num_transformer_submodules={count}) make {(n * count, width)}")
        return None, {}
    if config.get("task_type") == "SEQ_CLS":
        warnings.warn("PEFT's sequence classifier pools the output of the first virtual token, jpeft's the input's "
                      "own first token: the prompt loads exactly (the input tokens' hidden states are PEFT's), but a "
                      "classifier trained in PEFT on it gives other outputs here", stacklevel=3)
    if config["peft_type"] == "P_TUNING":
        encoder = "lstm" if str(config.get("encoder_reparameterization_type", "MLP")).upper() == "LSTM" else "mlp"
        method = prompt_lib.p_tuning(n, encoder=encoder, init="normal", model=model)
    else:
        method = prompt_lib.prompt_tuning(n, init="normal", model=model)
    return method, {"prompt/embeddings": rows[:n]}   # rows n: are PEFT's unused decoder prompt (seq2seq)


# ----------------------------------------------------------------------------- prefix tuning


def _layer_pairs(model, layers: int) -> list[int]:
    """The block pair of the file each decoder layer reads: ``i``, or ``2i mod L`` for PEFT's seq2seq cache split."""
    return [(2 * i) % layers if submodules(model) == 2 else i for i in range(layers)]


def _prefix_point(model):
    points = {p.name: p for p in model.hooks.values() if p.kind == "kv"}
    if "prefix" not in points:
        raise ValueError(f"the {model.name!r} model has no 'prefix' hook point (self-attention keys and values), "
                         "which PEFT's prefix tuning feeds")
    return points["prefix"]


def _export_prefix(method, params: Any, adapter: Any, model) -> tuple[dict, dict]:
    folded = method.saved_form(adapter)
    other = sorted(set(folded) - {"prefix"})
    if other:
        raise ValueError(f"PEFT's prefix tuning feeds only the (decoder's) self-attention, the 'prefix' hook point; "
                         f"this adapter also feeds {other}, which a PEFT file cannot hold. Train it with "
                         "prefix_tuning(..., hook_points=('prefix',))")
    key_LxNxW, value_LxNxW = (np.asarray(folded["prefix"][k], np.float32) for k in ("key", "value"))
    layers, n, width = key_LxNxW.shape
    sizes = peft_sizes(model, prefix=True)
    if sizes["token_dim"] != width:
        raise ValueError(f"PEFT would lay this model's prefix out {sizes['token_dim']} wide per layer "
                         f"({sizes['num_attention_heads']} heads), but its keys are {width} wide; PEFT's prefix "
                         "tuning cannot hold it")
    pairs_Lx2xNxW = np.zeros((layers, 2, n, width), np.float32)
    written: dict[int, int] = {}
    for i, j in enumerate(_layer_pairs(model, layers)):
        rows = np.stack([key_LxNxW[i], value_LxNxW[i]])
        if j in written and not np.array_equal(pairs_Lx2xNxW[j], rows):
            raise ValueError(f"PEFT's seq2seq prefix gives decoder layers {written[j]} and {i} the same rows (its "
                             f"cache split reads block pair {j} for both), but this adapter's differ; PEFT cannot "
                             "hold it (a decoder with an odd number of layers has no such pairs)")
        pairs_Lx2xNxW[j], written[j] = rows, i
    config = {"num_virtual_tokens": n, "num_transformer_submodules": submodules(model), **sizes,
              "num_layers": layers, "encoder_hidden_size": width, "prefix_projection": False}
    return {KEY: pairs_Lx2xNxW.transpose(2, 0, 1, 3).reshape(n, layers * 2 * width)}, config


def _load_prefix(config: dict, modules: dict, params: Any, model, problems: list[str], *,
                 shared: dict) -> tuple[Any, dict]:
    del modules, params
    check_task(config, model)
    n, point = _count(config), _prefix_point(model)
    rows = _shared_tensor(shared, "PREFIX_TUNING")
    layers, width = point.layers, point.width
    if config.get("num_layers") not in (None, layers) or rows.shape != (n, layers * 2 * width):
        problems.append(f"{KEY} has shape {rows.shape} (num_layers={config.get('num_layers')}), but {n} virtual "
                        f"tokens for the {model.name!r} model's {layers} layers of key/value width {width} make "
                        f"{(n, layers * 2 * width)}")
        return None, {}
    pairs_Lx2xNxW = rows.reshape(n, layers, 2, width).transpose(1, 2, 0, 3)
    chosen = pairs_Lx2xNxW[_layer_pairs(model, layers)]
    method = prefix_lib.prefix_tuning(n, init="normal", model=model, hook_points=("prefix",))
    return method, {"prefix/key": chosen[:, 0], "prefix/value": chosen[:, 1]}


def _codec(peft_type: str, export, load) -> common.PeftCodec:
    return common.PeftCodec(peft_type, (), export, load, "prompt embeddings", shared_keys=(KEY,), prefix=PREFIX)


PROMPT_TUNING = _codec("PROMPT_TUNING", _export_prompt_tuning, _load_prompt)
P_TUNING = _codec("P_TUNING", _export_p_tuning, _load_prompt)
PREFIX_TUNING = _codec("PREFIX_TUNING", _export_prefix, _load_prefix)
