"""Two 4-bit codes per byte, and back.

Codes are paired along one axis: elements ``2i`` and ``2i+1`` of that axis share
byte ``i``, the first in the high nibble and the second in the low nibble (the
order bitsandbytes uses). Packing along the blocked axis keeps every other axis,
leading stacked-layer axes included, unchanged, so slicing a packed array along
them is slicing the weight.

Example:
    >>> import numpy as np
    >>> from jpeft.quant import packing
    >>> codes = np.array([[1, 2], [3, 4]], np.uint8)        # (in=2, out=2)
    >>> packed = packing.pack(codes, axis=0)
    >>> packed.shape, [hex(b) for b in np.asarray(packed).ravel()]
    ((1, 2), ['0x13', '0x24'])
    >>> np.asarray(packing.unpack(packed, axis=0)).tolist()
    [[1, 2], [3, 4]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pairs_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return (*shape[:axis], shape[axis] // 2, 2, *shape[axis + 1:])


def pack(codes: jax.Array, axis: int = -1) -> jax.Array:
    """Packs 4-bit codes (uint8 values 0..15) two per byte along ``axis``.

    Raises:
        ValueError: if ``codes.shape[axis]`` is odd.
    """
    axis = axis % codes.ndim
    if codes.shape[axis] % 2:
        raise ValueError(f"cannot pack 4-bit codes in pairs along axis {axis} of odd length "
                         f"{codes.shape[axis]} (shape {tuple(codes.shape)})")
    pairs = jnp.asarray(codes, jnp.uint8).reshape(_pairs_shape(codes.shape, axis))
    first = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
    second = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
    return (first << 4) | (second & 0xF)


def unpack(packed: jax.Array, axis: int = -1) -> jax.Array:
    """Inverse of :func:`pack`: uint8 codes, ``packed.shape[axis] * 2`` along ``axis``."""
    axis = axis % packed.ndim
    packed = jnp.asarray(packed, jnp.uint8)
    pairs = jnp.stack([packed >> 4, packed & 0xF], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return pairs.reshape(shape)
