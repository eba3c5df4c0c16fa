"""Load GGUF files (llama.cpp format) into jpeft parameters.

The file is memory-mapped by ``gguf.GGUFReader``; its ``general.architecture`` picks
the model family (:mod:`jpeft.models.families`), whose GGUF name table maps every tensor
to a parameter path. Tensors are dequantized (Q4_1, Q8_0, F16, ...) to float32 one at a
time and converted to jpeft's layout:

* GGUF lists dims fastest-first, so a ``(out, in)`` matrix has ``tensor.shape == [in, out]``
  and its numpy data is ``(out, in)``, like a PyTorch Linear weight: transpose for a kernel;
* family-specific conversions (llama.cpp's rotary row order for Llama's q/k) come with
  the name table's rules.

``quantize=`` re-quantizes on load (e.g. to NF4 for QLoRA), one leaf at a time, exactly
as :func:`jpeft.io.hf.load_hf` does. The float32 values it starts from are the file's
dequantized ones (Q4_1 for SmolLM2), so NF4 here is a second rounding on top of the first.

Example:
    >>> from jpeft import assets
    >>> model, params = load_gguf(assets.smollm2_gguf_path())  # doctest: +SKIP
    >>> model.config.num_kv_heads  # doctest: +SKIP
    3
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError
from jpeft.io.assembler import ParamAssembler
from jpeft.io.hf import as_leaf_fn
from jpeft.models.model import Model
from jpeft.models.families import family_for_gguf


def open_reader(path: str | Path) -> gguf.GGUFReader:
    """A ``GGUFReader`` for ``path``, or a :class:`CheckpointError` saying why the file cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} " + ("is a folder; give the .gguf file in it" if path.is_dir()
                                                              else "does not exist"))
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct errors, IndexError... on a bad file
        raise CheckpointError(f"{str(path)!r} is not a readable GGUF file ({type(err).__name__}: {err}); is it "
                              "truncated or another format?") from None


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata field of an open GGUF file as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def read_gguf_config(reader: gguf.GGUFReader, source: str = "the GGUF file", **overrides) -> Model:
    """The :class:`~jpeft.models.Model` an open GGUF file describes (``source`` names it in errors)."""
    meta = metadata(reader)
    try:
        family = family_for_gguf(meta.get("general.architecture"))
        return Model(family, family.names.from_gguf_metadata(meta, {t.name for t in reader.tensors}, **overrides))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the metadata of {source} does not describe a model jpeft can run: {err}") from None


def _dequantize(tensor, path) -> np.ndarray:
    """float32 data of a GGUF tensor in numpy (slowest-first) order."""
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = tuple(int(n) for n in reversed(tensor.shape))
        return np.asarray(data, np.float32).reshape(expected)
    except (ValueError, IndexError, OSError, NotImplementedError) as err:
        raise CheckpointError(f"cannot read tensor {tensor.name!r} of GGUF file {path}: "
                              f"{type(err).__name__}: {err}") from None


def load_gguf(path: str | Path, *, dtype=jnp.float32, quantize=None, **overrides) -> tuple[Model, Any]:
    """Load ``(model, params)`` from a GGUF file, dequantized to ``dtype``.

    ``overrides`` change config fields (``scan_layers=True``). Raises
    :class:`CheckpointError` for an unreadable file and for missing / unexpected /
    mis-shaped tensors, ValueError for unsupported metadata. ``quantize``: ``None``, a
    format name or a ``leaf_fn``, as in :func:`jpeft.io.hf.load_hf`.

    Example:
        >>> from jpeft import assets
        >>> model, params = load_gguf(assets.smollm2_gguf_path(), quantize="nf4")  # doctest: +SKIP
        >>> params["layers_0"]["self_attn"]["k_proj"]["kernel"]  # doctest: +SKIP
        QuantizedArray(format='nf4', shape=(576, 192), dtype=float32, block_size=64, axis=-2, double_quant=True)
    """
    reader = open_reader(path)
    model = read_gguf_config(reader, f"GGUF file {path}", param_dtype=jnp.dtype(dtype).name, **overrides)
    table = model.names.gguf
    assembler = ParamAssembler(model, dtype, f"GGUF file {path}", as_leaf_fn(quantize, model))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    for name in assembler.read_order(tensors, table):
        assembler.add_named(table, name, lambda n: _dequantize(tensors[n], path))
    return model, assembler.finish()


def load_gguf_tokenizer(path: str | Path):
    """A ``transformers`` fast tokenizer built from the GGUF metadata (works offline; needs ``transformers``).

    Example:
        >>> from jpeft import assets
        >>> load_gguf_tokenizer(assets.smollm2_gguf_path()).eos_token  # doctest: +SKIP
        '<|im_end|>'
    """
    from transformers import AutoTokenizer

    open_reader(path)  # a missing or unreadable file is a CheckpointError, as for load_gguf
    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{str(path)!r}: no tokenizer can be built from its metadata ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
