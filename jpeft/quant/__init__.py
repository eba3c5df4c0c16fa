"""Blockwise 4-bit and 8-bit weight quantization: the frozen half of QLoRA.

* :mod:`~jpeft.quant.formats`: code tables (NF4, int4, int8);
* :mod:`~jpeft.quant.packing`: two 4-bit codes per byte;
* :mod:`~jpeft.quant.array`: :class:`QuantizedArray`, the leaf that dequantizes inside the op;
* :mod:`~jpeft.quant.quantize`: :func:`quantize` (a tree transform), :func:`quantize_on_load`.

QLoRA is composition, not a separate method: quantize the frozen weights, then
apply LoRA on top; ``LoraWeight(base=QuantizedArray)`` dispatches to the quantized
matmul through :mod:`jpeft.ops`.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> from jpeft import quant
    >>> params = {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (64, 16))}}
    >>> qparams = quant.quantize(params, r".*/kernel")                  # NF4 + double quant
    >>> method = jpeft.lora(rank=4, targets=r".*/kernel")
    >>> adapter = method.init(jax.random.key(1), qparams)
    >>> y = jpeft.ops.linear(jnp.ones((2, 64)), method.apply(qparams, adapter)["q_proj"]["kernel"])
    >>> y.shape
    (2, 16)
"""

from jpeft.quant import formats, packing
from jpeft.quant.array import (
    QuantizationError,
    QuantizedArray,
    check_metadata,
    describe,
    is_quantized,
)
from jpeft.quant.formats import FORMATS, INT4, INT8, NF4, Format
from jpeft.quant.quantize import (
    QuantizeOnLoad,
    dequantize,
    quantize,
    quantize_array,
    quantize_on_load,
)

__all__ = [
    "FORMATS",
    "INT4",
    "INT8",
    "NF4",
    "Format",
    "QuantizationError",
    "QuantizeOnLoad",
    "QuantizedArray",
    "check_metadata",
    "dequantize",
    "describe",
    "formats",
    "is_quantized",
    "packing",
    "quantize",
    "quantize_array",
    "quantize_on_load",
]
