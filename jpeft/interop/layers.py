"""Flax's own layers computed through :mod:`jpeft.ops`: plans and computations shared by linen and nnx.

Each layer has a ``plan(module, *args, **kwargs) -> {weight name: Contraction | Table}`` (what it
reads, called once on example inputs) and a ``run(module, weights, *args, **kwargs)`` that
computes what the layer's own method does, with the operands promoted as Flax's
``promote_dtype`` does (the layer's ``dtype``, else the operands' result type), so a plain or
fresh-adapter weight gives the layer's exact output. linen's ``Dense`` / nnx's ``Linear``,
``DenseGeneral`` / ``LinearGeneral``, ``Einsum`` and ``Embed`` (lookups and ``attend``) share
attribute names where it matters (``dtype``, ``axis``, ``einsum_str``, ``num_embeddings``).

Example:
    >>> import jax.numpy as jnp
    >>> general_eqn(3, (1, 2), 2)
    'abc,bcde->ade'
"""

from __future__ import annotations

import jax.numpy as jnp

from jpeft import ops
from jpeft.interop.core import Contraction, InteropError, Table, Weights, add_bias, compute_dtype

_L = "abcdefghijklmnopqrstuvwxyz"


def _no_extra(kind: str, kwargs: dict) -> None:
    extra = {k: v for k, v in kwargs.items() if v is not None}
    if extra:
        raise InteropError(f"{kind}: jpeft computes this layer without {sorted(extra)}; call it without them")


def general_eqn(x_ndim: int, axis, n_out: int) -> str:
    """The einsum of a ``DenseGeneral`` contracting input ``axis`` with a ``(*in, *out)`` kernel."""
    axis = tuple(a % x_ndim for a in ((axis,) if isinstance(axis, int) else tuple(axis)))
    x = _L[:x_ndim]
    outs = _L[x_ndim:x_ndim + n_out]
    w = "".join(x[a] for a in axis) + outs
    return f"{x},{w}->{''.join(c for i, c in enumerate(x) if i not in axis)}{outs}"


# ----------------------------------------------------------------------------- Dense / Linear


def dense_plan(module, x, *args, **kwargs):
    return {"kernel": Contraction("...i,io->...o", jnp.ndim(x))}


def dense_run(module, w: Weights, x, *args, **kwargs):
    _no_extra(type(module).__name__, kwargs)
    kernel, bias = w["kernel"], w.get("bias")
    dtype = compute_dtype(module, x, kernel, bias)
    return add_bias(w.linear("kernel", jnp.asarray(x, dtype)), bias, dtype)


# ----------------------------------------------------------------------------- DenseGeneral / LinearGeneral


def _check_batch(module) -> None:
    if getattr(module, "batch_dims", ()) or getattr(module, "batch_axis", {}):
        raise InteropError(f"{type(module).__name__} with batch axes (a separate kernel per batch index) is not "
                           "supported by jpeft; leave it out of the targets or use one without batch axes")


def general_plan(module, x, *args, **kwargs):
    _check_batch(module)
    n_out = _kernel_ndim(module) - len(_axes(module.axis))
    return {"kernel": Contraction(general_eqn(jnp.ndim(x), module.axis, n_out), jnp.ndim(x))}


def _axes(axis):
    return (axis,) if isinstance(axis, int) else tuple(axis)


def _kernel_ndim(module) -> int:
    features = getattr(module, "features", None)
    if features is None:
        features = module.out_features
    return len(_axes(module.axis)) + len((features,) if isinstance(features, int) else tuple(features))


def general_run(module, w: Weights, x, *args, **kwargs):
    _check_batch(module)
    _no_extra(type(module).__name__, kwargs)
    kernel, bias = w["kernel"], w.get("bias")
    dtype = compute_dtype(module, x, kernel, bias)
    eqn = general_eqn(jnp.ndim(x), module.axis, _kernel_ndim(module) - len(_axes(module.axis)))
    return add_bias(w.einsum("kernel", eqn, jnp.asarray(x, dtype)), bias, dtype)


# ----------------------------------------------------------------------------- Einsum


def _einsum_str(module, given):
    eqn = given if given is not None else getattr(module, "einsum_str", None)
    if eqn is None:
        raise InteropError(f"{type(module).__name__} was called without an einsum_str")
    return eqn.replace(" ", "")


def einsum_plan(module, x, einsum_str=None, **kwargs):
    return {"kernel": Contraction(_einsum_str(module, einsum_str), jnp.ndim(x))}


def einsum_run(module, w: Weights, x, einsum_str=None, **kwargs):
    _no_extra(type(module).__name__, kwargs)
    eqn = _einsum_str(module, einsum_str)
    kernel, bias = w["kernel"], w.get("bias")
    dtype = compute_dtype(module, x, kernel, bias)
    y = w.einsum("kernel", eqn, jnp.asarray(x, dtype))
    shape = None if bias is None else w.bias_shape("kernel", eqn, jnp.ndim(x))
    return add_bias(y, bias, dtype, shape)


# ----------------------------------------------------------------------------- Embed


def embed_plan(module, ids, *args, **kwargs):
    return {"embedding": Table()}


def embed_run(module, w: Weights, ids, *args, **kwargs):
    table = w["embedding"]
    dtype = compute_dtype(module, table)
    if module.num_embeddings == 1:  # Flax broadcasts the one row to every input
        row = ops.as_array(table, dtype)
        return jnp.broadcast_to(row, jnp.shape(ids) + (row.shape[-1],))
    return w.embed("embedding", ids, dtype)


def attend_plan(module, query, *args, **kwargs):
    return {"embedding": Table(head=True)}


def attend_run(module, w: Weights, query, *args, **kwargs):
    _no_extra(f"{type(module).__name__}.attend", kwargs)
    table = w["embedding"]
    dtype = compute_dtype(module, query, table)
    return w.attend("embedding", jnp.asarray(query, dtype))
