"""Code tables: the values a quantized weight can take, before per-block scaling.

A format is a sorted table of levels in ``[-1, 1]``. A block of weights is divided
by its absolute maximum (absmax), each value is replaced by the index of the
nearest level (its *code*), and dequantization is ``table[code] * absmax``.

* ``nf4``: the 16 NormalFloat levels of QLoRA (Dettmers et al., 2023), exactly the
  constants bitsandbytes hardcodes: quantiles of N(0, 1) scaled to ``[-1, 1]``,
  with an exact zero. Best for normally distributed weights.
* ``int4``: symmetric 4-bit integers, levels ``k / 7`` for ``k = -7 .. 7``
  (15 levels; code 15 is never produced).
* ``int8``: symmetric 8-bit integers, levels ``k / 127`` for ``k = -127 .. 127``.

Example:
    >>> import numpy as np
    >>> from jpeft.quant import formats
    >>> f = formats.get("nf4")
    >>> f.bits, len(f.levels), f.levels[7]
    (4, 16, 0.0)
    >>> int(formats.nearest_code(np.float32(0.9), f))   # 0.9 is nearest to level 1.0
    15
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# The NormalFloat4 levels as bitsandbytes defines them (csrc/kernels.cu, functional.py).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclasses.dataclass(frozen=True)
class Format:
    """A code table: ``levels`` sorted ascending in ``[-1, 1]``, one code per level.

    Codes are stored in ``bits`` bits; 4-bit codes are packed two per byte.
    """

    name: str
    bits: int
    levels: tuple[float, ...]

    @property
    def packed(self) -> bool:
        """True when two codes share one byte."""
        return self.bits == 4

    def table(self, dtype=jnp.float32) -> np.ndarray:
        """The levels as an array (index = code)."""
        return np.asarray(self.levels, dtype=dtype)

    def thresholds(self) -> np.ndarray:
        """Midpoints between neighbouring levels (float32): the rounding boundaries."""
        levels = np.asarray(self.levels, np.float64)
        return ((levels[:-1] + levels[1:]) / 2).astype(np.float32)


def _symmetric(name: str, bits: int) -> Format:
    qmax = 2 ** (bits - 1) - 1
    return Format(name, bits, tuple(k / qmax for k in range(-qmax, qmax + 1)))


NF4 = Format("nf4", 4, NF4_LEVELS)
INT4 = _symmetric("int4", 4)
INT8 = _symmetric("int8", 8)
FORMATS = {f.name: f for f in (NF4, INT4, INT8)}


def get(name: str | Format) -> Format:
    """The format called ``name`` (``"nf4"``, ``"int4"``, ``"int8"``).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown quantization format {name!r}; known formats: {sorted(FORMATS)}") from None


def nearest_code(normed: jax.Array, fmt: Format) -> jax.Array:
    """Index of the nearest level for values already divided by their block's absmax.

    A value exactly halfway between two levels gets the lower code.
    """
    thresholds = jnp.asarray(fmt.thresholds())
    if thresholds.size <= 16:
        # Counting thresholds below the value is searchsorted(side="left") for small tables,
        # several times faster on CPU and with far less working memory.
        return jnp.sum(normed[..., None] > thresholds, axis=-1, dtype=jnp.uint8)
    return jnp.searchsorted(thresholds, normed, side="left").astype(jnp.uint8)


def decode(codes: jax.Array, fmt: Format) -> jax.Array:
    """Levels (float32) for codes: ``table[codes]``."""
    return jnp.take(jnp.asarray(fmt.table()), codes.astype(jnp.int32), axis=0, mode="clip")
