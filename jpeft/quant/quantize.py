"""Float weights to :class:`~jpeft.quant.QuantizedArray` leaves, and back.

Blockwise absmax quantization (QLoRA, Dettmers et al., 2023): a weight is cut into
blocks of ``block_size`` (default 64) consecutive values along its contraction axis
(the last input axis of a kernel, ``in`` of a ``(*lead, in, out)`` one; ``dim`` of a
``(vocab, dim)`` embedding table). Which is which comes from the weight's logical axes
(pass ``model=``; see :mod:`jpeft.layout`); without a model every weight is a kernel
``(*lead, in, out)``. Each value is divided by its block's
absmax and replaced by the code of the nearest level of the format's table.

Double quantization (on by default for NF4, as in QLoRA) stores the float32 absmax
values in 8 bits: per matrix, their mean is subtracted, and the rest is quantized
to symmetric int8 in blocks of 256 with one float32 scale per block. NF4 then costs
``4 + 8/64 + 32/(64*256)`` bits per parameter (about 4.127) instead of ``4 + 32/64``.
(bitsandbytes uses its dynamic 8-bit float map for these constants; jpeft uses
linear int8, whose error is well below the 4-bit error it scales.)

A weight whose blocked dimension is not a multiple of ``block_size`` is refused with
a :class:`QuantizationError` naming it, its shape and the block size; jpeft does not
pad, so a quantized leaf always has the exact shape of the weight it replaces. Leave
such weights out of the targets, or choose a block size that divides them.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jpeft import quant
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 4)),
    ...                     "bias": jnp.zeros(4)}}
    >>> qparams = quant.quantize(params, r".*/kernel", format="nf4")
    >>> qparams["dense"]["kernel"]
    QuantizedArray(format='nf4', shape=(128, 4), dtype=float32, block_size=64, axis=-2, double_quant=True)
    >>> quant.dequantize(qparams)["dense"]["kernel"].shape
    (128, 4)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.layout import Layout, default_layout, flatten_axes, layout_of, layouts_for
from jpeft import stack
from jpeft.quant import formats, packing
from jpeft.quant.array import QuantizationError, QuantizedArray, is_quantized, split_blocks

SCALE_BLOCK_SIZE = 256
_SETTINGS = ("format", "block_size", "double_quant", "axis")


def _encode_blocks(x: jax.Array, fmt: formats.Format, block_size: int,
                   axis: int) -> tuple[jax.Array, jax.Array]:
    """``(codes, absmax)``: nearest-level codes (uint8, unpacked, ``x.shape``) and per-block absmax."""
    blocks, inner = split_blocks(x.astype(jnp.float32), block_size, axis)
    absmax = jnp.max(jnp.abs(blocks), axis=inner, keepdims=True)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)
    codes = formats.nearest_code(normed, fmt).reshape(x.shape)
    return codes, jnp.squeeze(absmax, inner)


def _double_quantize(absmax: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(int8 codes, scale per block, mean)`` of the absmax of each matrix (last two axes)."""
    lead = absmax.shape[:-2]
    flat = absmax.reshape(*lead, -1)
    mean = flat.mean(axis=-1)
    pad = (-flat.shape[-1]) % block_size
    centered = jnp.pad(flat - mean[..., None], [(0, 0)] * len(lead) + [(0, pad)])
    codes, scale = _encode_blocks(centered, formats.INT8, block_size, -1)
    return codes, scale, mean


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "axis", "double_quant"))
def _quantize(x, *, fmt, block_size, axis, double_quant):
    codes, absmax = _encode_blocks(x, fmt, block_size, axis)
    if fmt.packed:
        codes = packing.pack(codes, axis)
    if not double_quant:
        return codes, absmax, None, None
    return (codes, *_double_quantize(absmax, SCALE_BLOCK_SIZE))


def _check(x, fmt: formats.Format, block_size, axis, name: str) -> None:
    shape = tuple(x.shape)
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
        raise QuantizationError(f"block_size must be a positive int, got {block_size!r} (quantizing {name!r})")
    if fmt.packed and block_size % 2:
        raise QuantizationError(f"block_size must be even for the 4-bit format {fmt.name!r}, "
                                f"got {block_size} (quantizing {name!r})")
    if len(shape) < 2:
        raise QuantizationError(f"cannot quantize {name!r} of shape {shape}: only weights of at least "
                                f"2 dims (in, out) or (vocab, dim) are quantized; narrow the targets")
    if not isinstance(axis, (int, np.integer)) or not -len(shape) <= axis < 0:
        raise QuantizationError(f"axis must be a negative axis of the weight (-2: a kernel's 'in', -1: a table's "
                                f"'dim'), got {axis!r} for shape {shape} (quantizing {name!r})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise QuantizationError(f"cannot quantize {name!r}: dtype {x.dtype} is not a float dtype")
    if shape[axis] % block_size:
        raise QuantizationError(
            f"cannot quantize {name!r} of shape {shape}: its blocked dimension (axis {axis}, "
            f"length {shape[axis]}) is not a multiple of the block size {block_size}. jpeft does "
            f"not pad; leave this weight out of the targets or pick a block size that divides it")


def _check_finite(x, name: str) -> None:
    """A NaN or inf would poison its block's absmax and, through double quantization, the whole matrix:
    refuse it (for concrete arrays; shapes under ``eval_shape``/``jit`` cannot be checked)."""
    if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
        return
    bad = int(jnp.size(x) - jnp.sum(jnp.isfinite(x)))
    if bad:
        raise QuantizationError(f"cannot quantize {name!r}: it holds {bad} non-finite values (NaN or inf); the "
                                "checkpoint is damaged or the weight diverged. Reload a good copy of the weights")


def quantize_array(x: jax.Array, format: str = "nf4", *, block_size: int = 64, axis: int = -2,
                   double_quant: bool | None = None, name: str = "array") -> QuantizedArray:
    """Quantizes one weight.

    Args:
        x: float weight, ``(*lead, in, out)`` (``axis=-2``) or ``(vocab, dim)`` (``axis=-1``).
        format: ``"nf4"``, ``"int4"`` or ``"int8"``.
        block_size: values per absmax block along ``axis``; must divide ``x.shape[axis]``.
        axis: the blocked (contraction) axis, counted from the end (``-2``: a kernel's
            ``in``; ``-1``: a table's ``dim``).
        double_quant: 8-bit absmax constants; default on for NF4 only.
        name: how error messages call the weight (its path).

    Raises:
        QuantizationError: for an unknown format, a block size that does not divide
            the blocked dimension, or a weight that is not a float matrix.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_array(jnp.linspace(-1, 1, 128).reshape(64, 2), "int8")
        >>> q.codes.shape, q.scales.shape, float(q.materialize()[0, 0])
        ((64, 2), (1, 2), -1.0)
    """
    try:
        fmt = formats.get(format)
    except ValueError as err:
        raise QuantizationError(f"{err} (quantizing {name!r})") from None
    if is_quantized(x) or ops.is_wrapper(x):
        raise QuantizationError(f"{name!r} is already a {type(x).__name__}; quantize plain float weights, "
                                f"before applying adapters")
    _check(x, fmt, block_size, axis, name)
    _check_finite(x, name)
    if double_quant is None:
        double_quant = fmt is formats.NF4
    codes, scales, scales_scale, scales_mean = _quantize(
        jnp.asarray(x), fmt=fmt, block_size=int(block_size), axis=axis, double_quant=bool(double_quant))
    return QuantizedArray(codes, scales, scales_scale, scales_mean, format=fmt.name,
                          block_size=int(block_size), axis=axis, dtype=np.dtype(x.dtype),
                          scale_block_size=SCALE_BLOCK_SIZE)


def dequantize(x: Any, dtype=None) -> Any:
    """Float weights for a :class:`QuantizedArray`, or for every quantized leaf of a tree."""
    if is_quantized(x):
        return x.materialize(dtype)
    return jax.tree.map(lambda leaf: leaf.materialize(dtype) if is_quantized(leaf) else leaf,
                        x, is_leaf=ops.is_wrapper)


def block_axis(layout: Layout, ndim: int) -> int:
    """The axis a weight is blocked along, counted from the end: a table's row width, a kernel's last input.

    Example:
        >>> block_axis(Layout("kernel", lead=1, inputs=1), 3), block_axis(Layout("table"), 2)
        (-2, -1)
    """
    if layout.kind == "table":
        return -1
    return layout.lead + layout.inputs - 1 - ndim


def layer_kernels(layouts: dict[str, Layout] | None = None) -> tree.Predicate:
    """A target rule: every kernel inside the model's layers (what QLoRA quantizes).

    Embedding tables, norms, biases and kernels outside the layers (an untied output head)
    stay float, as in QLoRA / bitsandbytes.
    """
    def rule(path: str, leaf) -> bool:
        in_layers = stack.in_stack(path) or stack.stacked_path(path)[1] is not None
        layout = (layouts or {}).get(path) or default_layout(leaf.shape)
        return in_layers and layout.kind == "kernel"

    rule.__name__ = "layer_kernels"
    return rule


def _rules(targets: tree.Targets) -> tuple[tree.Rule, ...]:
    rules = tree.as_rules(targets)
    for rule in rules:
        unknown = set(rule.settings) - set(_SETTINGS)
        if unknown:
            raise QuantizationError(f"{rule!r} has unknown quantization setting(s) {sorted(unknown)}; "
                                    f"valid: {list(_SETTINGS)}")
    return rules


def _quantize_leaf(path: str, leaf, rule: tree.Rule, defaults: dict, layout: Layout | None) -> QuantizedArray:
    layout = layout or default_layout(leaf.shape)
    if ops.is_wrapper(leaf) and not is_quantized(leaf):  # e.g. a kernel held in another axis order: its weight
        leaf = leaf.materialize()
    if layout.kind == "vector":
        raise QuantizationError(f"cannot quantize {path!r} of shape {tuple(leaf.shape)}: only weights of at least 2 "
                                "dims (kernels, tables) are quantized and this is a vector (a bias or a norm "
                                "scale); narrow the targets")
    settings = {"axis": block_axis(layout, len(leaf.shape)), **defaults, **rule.settings}
    return quantize_array(leaf, settings["format"], block_size=settings["block_size"],
                          axis=settings["axis"], double_quant=settings["double_quant"], name=path)


def quantize(params: Any, targets: tree.Targets, format: str = "nf4", *, block_size: int = 64,
             double_quant: bool | None = None, model: Any = None, axes: Any = None) -> Any:
    """Replaces the weights that ``targets`` select with :class:`QuantizedArray` leaves.

    ``targets`` follow :mod:`jpeft.tree` rules (regex fullmatch, first match wins,
    an unused rule is an error); a :class:`jpeft.Rule` may override ``format``,
    ``block_size``, ``double_quant`` or ``axis`` for the weights it selects. ``model``
    (or a logical ``axes`` tree) gives each weight's role, hence its blocked axis. Works
    under ``jax.eval_shape`` (abstract params in, abstract quantized tree out).

    Example:
        >>> import jax.numpy as jnp, jpeft
        >>> params = {"a": {"kernel": jnp.ones((64, 2))}, "b": {"kernel": jnp.ones((128, 2))}}
        >>> q = quantize(params, [jpeft.Rule("a/kernel", format="int8"), "b/kernel"])
        >>> q["a"]["kernel"].format, q["b"]["kernel"].format
        ('int8', 'nf4')
    """
    rules = _rules(targets)
    defaults = {"format": format, "block_size": block_size, "double_quant": double_quant}
    flat, layouts = tree.flatten(params), layouts_for(params, model=model, axes=axes)
    return tree.replace(params, {path: _quantize_leaf(path, flat[path], rule, defaults, layouts.get(path))
                                 for path, rule in tree.assign(params, rules).items()})


class QuantizeOnLoad:
    """The per-tensor hook of :func:`quantize_on_load`: ``leaf_fn(path, array) -> leaf``."""

    def __init__(self, targets: tree.Targets, format: str, block_size: int, double_quant: bool | None,
                 layouts: dict[str, Layout] | None = None):
        formats.get(format)  # fail early on an unknown format
        self.rules = _rules(targets)
        self.defaults = {"format": format, "block_size": block_size, "double_quant": double_quant}
        self.layouts = dict(layouts or {})
        self.used = [False] * len(self.rules)

    def __call__(self, path: str, array: np.ndarray) -> Any:
        for i, rule in enumerate(self.rules):
            if rule.matches(path, array):
                self.used[i] = True
                return _quantize_leaf(path, array, rule, self.defaults, self.layouts.get(path))
        return jnp.asarray(array)

    def check_all_used(self) -> None:
        """Raises :class:`jpeft.RuleError` if a rule matched none of the tensors seen so far."""
        unused = [rule for rule, used in zip(self.rules, self.used) if not used]
        if unused:
            raise tree.RuleError(f"quantization target rule(s) {', '.join(map(repr, unused))} matched "
                                 f"no tensor of the checkpoint")


def quantize_on_load(targets: tree.Targets | None = None, format: str = "nf4", *, block_size: int = 64,
                     double_quant: bool | None = None, model: Any = None, axes: Any = None) -> QuantizeOnLoad:
    """A ``leaf_fn(path, array)`` for checkpoint loaders: quantizes each targeted tensor as it is read.

    The loader calls it once per tensor with the tensor's ``/``-joined jpeft path
    and a host array; targeted tensors come back as :class:`QuantizedArray`, the
    others as device arrays. Only one float tensor is alive at a time, so the float
    model is never held whole. After loading, ``leaf_fn.check_all_used()`` reports
    rules that matched nothing. ``targets=None`` quantizes :func:`layer_kernels`;
    ``model`` (or a logical ``axes`` tree) gives each weight's role (its blocked axis).

    Example:
        >>> import numpy as np
        >>> leaf_fn = quantize_on_load(r".*/kernel", format="int4")
        >>> leaf_fn("dense/kernel", np.ones((64, 8), np.float32)).format
        'int4'
        >>> leaf_fn("dense/bias", np.zeros(8, np.float32)).shape
        (8,)
        >>> leaf_fn.check_all_used()
    """
    layouts = model.layouts() if model is not None else {}
    if axes is not None:
        layouts.update({p: layout_of(names) for p, names in flatten_axes(axes).items()})
    if targets is None:
        targets = layer_kernels(layouts)
    return QuantizeOnLoad(targets, format, block_size, double_quant, layouts)
