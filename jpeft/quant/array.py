"""The quantized weight: a pytree leaf that dequantizes itself inside the op.

A :class:`QuantizedArray` stands for a float weight of shape ``(*lead, in, out)``
(a Flax kernel; ``lead`` are batch axes such as stacked layers) or ``(vocab, dim)``
(an embedding table). The weight is cut into blocks of ``block_size`` values along
its contraction axis (``in`` for a kernel, ``dim`` for a table: the axis ``axis``);
each block keeps its absmax, and each value the code of its nearest level.

Arrays it holds (every one carries the leading axes, so ``jax.lax.scan`` over
stacked layers slices all of them consistently):

* ``codes``: uint8; for 4-bit formats two codes per byte along ``axis``;
* ``scales``: the per-block absmax, float32 of shape ``(*lead, ..., in / block, ...)``,
  or, with double quantization, uint8 int8-codes of the absmax minus its mean,
  flattened per matrix and padded to a multiple of ``scale_block_size``;
* ``scales_scale``: float32 absmax per ``scale_block_size`` scales (double quant only);
* ``scales_mean``: float32 mean of the absmax, one per matrix (double quant only).

Static metadata: ``format``, ``block_size``, ``axis``, ``dtype`` (the logical dtype
of the weight it stands for) and ``scale_block_size``. The logical ``shape`` is read
from ``codes``, so it stays right when scan slices the leading axis off.

The weight is frozen: integer codes can only be inputs of ``jax.grad``, and the
float scales are wrapped in ``stop_gradient``. :meth:`linear` and :meth:`attend`
dequantize under ``jax.checkpoint``, so the backward pass dequantizes again instead
of keeping a float copy of every weight alive between forward and backward. A large
table used as a tied output head (:meth:`attend`) is dequantized a slice of rows at a
time (:data:`ATTEND_CHUNK_BYTES`), so a 128k-row vocabulary never exists whole in float.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jpeft import quant
    >>> w = jax.random.normal(jax.random.key(0), (128, 8))
    >>> q = quant.quantize_array(w, "nf4")
    >>> q.shape, q.dtype, q.codes.shape, q.codes.dtype
    ((128, 8), dtype('float32'), (64, 8), dtype('uint8'))
    >>> err = jnp.abs(q.materialize() - w).max() / jnp.abs(w).max()
    >>> bool(err < 0.2)
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.quant import formats, packing


# A tied head whose dequantized table would take more than this many bytes (in the compute
# dtype) is dequantized in slices of rows of about a quarter of this size each (see
# QuantizedArray.attend).
ATTEND_CHUNK_BYTES = 256 * 2**20


class QuantizationError(ValueError):
    """A weight or a quantized checkpoint that does not fit the requested quantization."""


def split_blocks(x: jax.Array, block_size: int, axis: int) -> tuple[jax.Array, int]:
    """Reshapes ``axis`` of length ``n`` into ``(n // block_size, block_size)``.

    Returns the reshaped array and the index of the within-block axis.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    return x.reshape(*x.shape[:axis], n // block_size, block_size, *x.shape[axis + 1:]), axis + 1


def decode_blocks(codes: jax.Array, fmt: formats.Format, absmax: jax.Array, block_size: int,
                  axis: int) -> jax.Array:
    """``table[codes] * absmax`` (float32), one absmax per block along ``axis``."""
    values, inner = split_blocks(formats.decode(codes, fmt), block_size, axis)
    return (values * jnp.expand_dims(absmax.astype(jnp.float32), inner)).reshape(codes.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class QuantizedArray(ops.WeightWrapper):
    """A blockwise-quantized frozen weight (see the module docstring for its layout).

    Make one with :func:`jpeft.quant.quantize_array` or :func:`jpeft.quant.quantize`.
    """

    codes: jax.Array
    scales: jax.Array
    scales_scale: jax.Array | None = None
    scales_mean: jax.Array | None = None
    format: str = dataclasses.field(default="nf4", metadata=dict(static=True))
    block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
    axis: int = dataclasses.field(default=-2, metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=np.dtype("float32"), metadata=dict(static=True))
    scale_block_size: int = dataclasses.field(default=256, metadata=dict(static=True))

    # ------------------------------------------------------------------ shape

    @property
    def fmt(self) -> formats.Format:
        return formats.get(self.format)

    @property
    def double_quant(self) -> bool:
        """Whether the per-block absmax values are themselves quantized to 8 bits."""
        return self.scales_mean is not None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.codes.shape)
        if self.fmt.packed:
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.codes.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks_shape(self) -> tuple[int, ...]:
        """Shape of the per-block absmax: ``shape`` with ``axis`` divided by the block size."""
        shape = list(self.shape)
        shape[self.axis] //= self.block_size
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held (codes and all scales)."""
        return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    def __repr__(self) -> str:
        return (f"QuantizedArray(format={self.format!r}, shape={self.shape}, dtype={self.dtype}, "
                f"block_size={self.block_size}, axis={self.axis}, double_quant={self.double_quant})")

    # ------------------------------------------------------------------ reading back

    def absmax(self) -> jax.Array:
        """The per-block absmax as float32, of shape :attr:`blocks_shape` (decoded if double-quantized)."""
        if not self.double_quant:
            return self.scales.astype(jnp.float32)
        *lead, rows, cols = self.blocks_shape
        flat = decode_blocks(self.scales, formats.INT8, self.scales_scale, self.scale_block_size, -1)
        flat = flat[..., : rows * cols] + self.scales_mean[..., None].astype(jnp.float32)
        return flat.reshape(*lead, rows, cols)

    def unpacked_codes(self) -> jax.Array:
        """One uint8 code per weight value, of :attr:`shape`."""
        return packing.unpack(self.codes, self.axis) if self.fmt.packed else self.codes

    def materialize(self, dtype=None) -> jax.Array:
        """The dequantized weight in ``dtype`` (default: the logical :attr:`dtype`).

        Computed in float32 and cast once at the end (XLA fuses it into one pass).
        """
        absmax = jax.lax.stop_gradient(self.absmax())
        w = decode_blocks(self.unpacked_codes(), self.fmt, absmax, self.block_size, self.axis)
        return w.astype(dtype or self.dtype)

    def metadata(self) -> dict[str, Any]:
        """JSON-able description: what a restored checkpoint must match."""
        return {"format": self.format, "block_size": self.block_size, "axis": self.axis,
                "double_quant": self.double_quant, "shape": list(self.shape),
                "dtype": np.dtype(self.dtype).name}

    # ------------------------------------------------------------------ ops

    def linear(self, x: jax.Array) -> jax.Array:
        """``x @ W``: dequantizes this weight in ``x.dtype``, then multiplies."""
        return _dequantize_matmul(x, self)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        """``einsum(subscripts, x, W)``: dequantizes this weight in ``x.dtype``, then contracts."""
        return _dequantize_einsum(subscripts, x, self)

    def attend(self, x: jax.Array) -> jax.Array:
        """``x @ W.T`` (tied output head): dequantizes in ``x.dtype``, then multiplies.

        A ``(vocab, dim)`` table whose float form would be larger than
        :data:`ATTEND_CHUNK_BYTES` is dequantized and multiplied one slice of rows at
        a time (forward and backward), so no float copy of the whole table is made.
        """
        chunks = self._attend_chunks(jnp.dtype(x.dtype).itemsize)
        if chunks == 1:
            return _dequantize_matmul_t(x, self)
        return _chunked_attend(x, self, chunks)

    @property
    def _along_dim(self) -> bool:
        """For a ``(vocab, dim)`` table: blocked along ``dim`` (else along ``vocab``)."""
        return self.axis % 2 == 1

    def _attend_chunks(self, itemsize: int) -> int:
        """How many row slices :meth:`attend` cuts the table into (1: none).

        A slice holds whole blocks: any number of rows for a table blocked along ``dim``; a
        multiple of the block size for one blocked along ``vocab`` (4-bit block sizes are
        even, so packed bytes stay whole too). At most one slice per such unit of rows.
        """
        if self.ndim != 2:
            return 1
        rows, cols = self.shape
        if rows * cols * itemsize <= ATTEND_CHUNK_BYTES:
            return 1
        units = rows if self._along_dim else rows // self.block_size
        chunks = min(math.ceil(rows * cols * itemsize / ATTEND_CHUNK_BYTES) * 4, units)
        while units % chunks:  # slices of equal size: the smallest count at least that which divides
            chunks += 1
        return chunks

    def partition_specs(self, axes: tuple, spec_for) -> "QuantizedArray":
        """Specs for the arrays held, derived from the logical weight's ``axes``.

        * codes (packed along the blocked axis) take the weight's axes; the packed
          dimension must still divide;
        * per-block scales take the same axes where their (blocked) dimensions divide,
          else that dimension is replicated;
        * double-quantized scales are flat per matrix (``(*lead, padded blocks)``): the flat
          dimension is split over every mesh axis that splits the codes' matrix, when it
          divides (so they shrink with the mesh like the codes); their per-256 scales and
          means are tiny and replicated. Leading axes follow the weight.
        """
        if len(axes) != self.ndim:
            raise ValueError(f"logical axes {axes} do not match the quantized weight's shape {self.shape}")
        packed = f"codes, packed two per byte along axis {self.axis}" if self.fmt.packed else "codes"
        codes = spec_for(axes, self.codes.shape, packed)
        if not self.double_quant:
            return dataclasses.replace(self, codes=codes,
                                       scales=spec_for(axes, self.scales.shape, "per-block scales", strict=False))
        lead = tuple(codes)[:-2]
        matrix_axes = tuple(a for entry in tuple(codes)[-2:] if entry is not None
                            for a in ((entry,) if isinstance(entry, str) else entry))
        flat = spec_for.flat_spec(matrix_axes, self.scales.shape[-1])
        return dataclasses.replace(self, codes=codes, scales=jax.sharding.PartitionSpec(*lead, flat),
                                   scales_scale=jax.sharding.PartitionSpec(*lead, None),
                                   scales_mean=jax.sharding.PartitionSpec(*lead))

    def embed(self, ids: jax.Array, dtype) -> jax.Array:
        """Rows ``W[ids]`` in ``dtype``; only those rows are dequantized.

        A ``(vocab, dim)`` table may be blocked along ``dim`` (what ``quantize(...,
        model=)`` does) or along ``vocab`` (a table quantized as if it were a kernel, e.g.
        without ``model=``): either way a row's codes and its absmax values are gathered.
        """
        if self.ndim != 2:
            return jnp.take(self.materialize(dtype), ids, axis=0)
        absmax = jax.lax.stop_gradient(self.absmax())
        if self._along_dim:  # a row holds whole blocks
            codes = jnp.take(self.codes, ids, axis=0)
            if self.fmt.packed:
                codes = packing.unpack(codes, -1)
            return decode_blocks(codes, self.fmt, jnp.take(absmax, ids, axis=0), self.block_size, -1).astype(dtype)
        # Blocked along vocab: row i shares its absmax with the block of rows i // block_size,
        # and (packed) its bytes with its pair row: unpack the pair, keep row i's half.
        if self.fmt.packed:
            pair_Ix2xD = packing.unpack(jnp.take(self.codes, ids // 2, axis=0)[..., None, :], -2)
            codes = jnp.take_along_axis(pair_Ix2xD, (ids % 2)[..., None, None], axis=-2)[..., 0, :]
        else:
            codes = jnp.take(self.codes, ids, axis=0)
        row_absmax = jnp.take(absmax, ids // self.block_size, axis=0)
        return (formats.decode(codes, self.fmt) * row_absmax).astype(dtype)


# Under jax.checkpoint the backward pass recomputes the dequantized weight from the
# codes; without it autodiff would keep every layer's float weight as a residual.
@jax.checkpoint
def _dequantize_matmul(x: jax.Array, q: QuantizedArray) -> jax.Array:
    return x @ q.materialize(x.dtype)


@jax.checkpoint
def _dequantize_matmul_t(x: jax.Array, q: QuantizedArray) -> jax.Array:
    return x @ q.materialize(x.dtype).T


def _chunked_attend(x: jax.Array, q: QuantizedArray, chunks: int) -> jax.Array:
    """``x @ W.T`` for a ``(vocab, dim)`` table, ``vocab / chunks`` rows dequantized at a time."""
    rows, axis = q.shape[0], -1 if q._along_dim else -2
    absmax_CxRxB = jax.lax.stop_gradient(q.absmax()).reshape(chunks, -1, q.blocks_shape[1])
    codes_CxRxP = q.codes.reshape(chunks, -1, q.codes.shape[1])

    @jax.checkpoint
    def one_slice(codes_RxP, absmax_RxB):
        codes = packing.unpack(codes_RxP, axis) if q.fmt.packed else codes_RxP
        w_RxD = decode_blocks(codes, q.fmt, absmax_RxB, q.block_size, axis).astype(x.dtype)
        return x @ w_RxD.T

    logits_Cx___xR = jax.lax.map(lambda slice_: one_slice(*slice_), (codes_CxRxP, absmax_CxRxB))
    return jnp.moveaxis(logits_Cx___xR, 0, -2).reshape(*x.shape[:-1], rows)


@functools.partial(jax.checkpoint, static_argnums=(0,))
def _dequantize_einsum(subscripts: str, x: jax.Array, q: QuantizedArray) -> jax.Array:
    return jnp.einsum(subscripts, x, q.materialize(x.dtype))


def is_quantized(leaf: Any) -> bool:
    """True for :class:`QuantizedArray` leaves."""
    return isinstance(leaf, QuantizedArray)


def describe(params: Any) -> dict[str, dict[str, Any]]:
    """``{path: metadata}`` for every quantized leaf: save it next to a quantized checkpoint.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft import quant
        >>> q = quant.quantize({"w": {"kernel": jnp.ones((64, 2))}}, r".*/kernel")
        >>> quant.describe(q)["w/kernel"]["format"]
        'nf4'
    """
    return {path: leaf.metadata() for path, leaf in tree.flatten(params).items() if is_quantized(leaf)}


def check_metadata(saved: dict[str, dict[str, Any]], like: Any) -> None:
    """Checks quantization metadata read from a checkpoint against the tree to restore into.

    ``like`` is the expected quantized tree (arrays or ``jax.ShapeDtypeStruct`` inside,
    e.g. ``jax.eval_shape(lambda p: quantize(p, ...), abstract_params)``). Int4 and NF4
    codes have identical array shapes, so restoring by array shapes alone would read
    one as the other silently; this check refuses it.

    Raises:
        QuantizationError: naming every path whose format, block size, axis, double
            quantization, shape or dtype differ, or that is quantized on one side only.
    """
    expected = describe(like)
    problems = []
    for path in sorted(set(saved) | set(expected)):
        if path not in expected:
            problems.append(f"{path}: quantized in the checkpoint ({saved[path]['format']}) "
                            f"but not in the tree to restore into")
        elif path not in saved:
            problems.append(f"{path}: quantized ({expected[path]['format']}) in the tree to restore "
                            f"into but not in the checkpoint")
        else:
            diffs = [f"{key} {saved[path].get(key)!r} in the checkpoint vs {want!r} expected"
                     for key, want in expected[path].items() if saved[path].get(key) != want]
            if diffs:
                problems.append(f"{path}: " + "; ".join(diffs))
    if problems:
        raise QuantizationError("quantized checkpoint does not fit:\n  " + "\n  ".join(problems))
