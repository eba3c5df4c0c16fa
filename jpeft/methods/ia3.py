"""IA3: learned vectors that rescale activations (Liu et al., 2022, "(IA)^3").

IA3 multiplies the keys, the values and the feed-forward intermediate activations
by trained vectors ``l``, initialised to ones so a fresh adapter changes nothing.
Each is a weight transformation, so no model hook is needed:

* keys and values are outputs of ``k_proj`` / ``v_proj``: ``(x @ W) * l`` scales the
  kernel's output columns (and a bias, if the layer has one, as PEFT does);
* the intermediate activation is the input of ``down_proj``: ``(x * l) @ W`` scales
  the kernel's input rows (PEFT's ``feedforward_modules``).

:class:`Ia3Weight` computes exactly that in training (no full-size product, no
gradient for ``W``), and ``merge`` folds ``l`` into ``W`` (and the bias).

The adapter mirrors the targeted kernels' paths with ``{"ia3_l": l}`` at each; ``l``
has the kernel's output axes (or input axes for feed-forward targets), with any leading
stack axes kept. Which axes those are comes from the weight's logical axes (pass
``model=``; see :mod:`jpeft.layout`).

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"mlp": {"down_proj": {"kernel": jnp.ones((4, 2))}}}
    >>> method = jpeft.ia3(targets=r".*/kernel", feedforward=r".*/down_proj/kernel")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> adapter["mlp"]["down_proj"]["kernel"]["ia3_l"].shape   # one scale per input row
    (4,)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.methods import registry, rows
from jpeft.methods.base import Method
from jpeft.methods.lora import weight_layouts

_LEAF = "ia3_l"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ia3Weight(ops.OverBase):
    """A weight whose outputs (or, with ``on_input``, inputs) are scaled by ``scale``.

    ``base`` may itself be a wrapper (e.g. a quantized weight). A ``base`` with as many
    axes as ``scale`` is a bias: it is scaled like the output of its kernel. ``outputs``
    is the number of output axes of the kernel (the scale's trailing axes when it scales
    outputs).
    """

    base: Any
    scale: jax.Array
    on_input: bool = dataclasses.field(default=False, metadata=dict(static=True))
    outputs: int = dataclasses.field(default=1, metadata=dict(static=True))

    def linear(self, x: jax.Array) -> jax.Array:
        scale = self.scale.astype(x.dtype)
        if self.on_input:
            return ops.linear(x * scale, self.base)
        return ops.linear(x, self.base) * scale

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        scale = self.scale.astype(x.dtype)
        if self.on_input:
            return ops.einsum(subscripts, x * scale, self.base)
        return ops.einsum(subscripts, x, self.base) * scale

    def materialize(self, dtype=None) -> jax.Array:
        base = ops.as_array(self.base, jnp.float32)
        scale = self.scale.astype(jnp.float32)
        extra = base.ndim - scale.ndim  # the axes the scale does not cover: outputs, or inputs
        if extra:
            if self.on_input:
                scale = scale.reshape(*scale.shape, *(1,) * extra)
            else:
                lead = scale.ndim - self.outputs
                scale = scale.reshape(*scale.shape[:lead], *(1,) * extra, *scale.shape[lead:])
        return (base * scale).astype(dtype or self.dtype)


def ia3(
    targets: tree.Targets = r".*/(k_proj|v_proj|down_proj)/kernel",
    feedforward: tree.Targets | None = r".*/down_proj/kernel",
    *,
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """Builds an IA3 method.

    Args:
        targets: the kernels whose activations are rescaled: regex(es) fullmatched
            against ``/``-joined paths, predicates or :class:`jpeft.Rule` objects.
            The default is PEFT's choice for Llama: keys, values, FFN intermediate.
        feedforward: which of the targets scale their input (the FFN intermediate
            activation) rather than their output; every rule must match a target.
            ``()`` or ``None``: none.
        dtype: dtype of the trained vectors.
        model: the :class:`jpeft.models.Model`: each kernel's input and output axes come from
            its logical axes (default: ``(..., in, out)``).

    Returns:
        A :class:`jpeft.Method`; ``apply`` wraps targets in :class:`Ia3Weight`, ``merge``
        returns plain arrays with the vectors folded in.

    Example:
        >>> import jax, jax.numpy as jnp, jpeft
        >>> params = {"k_proj": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
        >>> method = jpeft.ia3(targets=r"k_proj/kernel", feedforward=())
        >>> adapter = {"k_proj": {"kernel": {"ia3_l": jnp.array([2.0, 0.5])}}}
        >>> merged = method.merge(params, adapter)
        >>> merged["k_proj"]["kernel"][0].tolist(), merged["k_proj"]["bias"].tolist()
        ([2.0, 0.5], [2.0, 0.5])
    """
    rules = tree.as_rules(targets)
    ff_rules = tree.as_rules(feedforward) if feedforward else ()
    for rule in (*rules, *ff_rules):
        if rule.settings:
            raise ValueError(f"{rule!r}: IA3 rules take no settings")

    def resolve(params: Any) -> dict[str, bool]:
        """``{kernel path: scales its input?}`` for every target."""
        flat = tree.flatten(params)
        layouts = weight_layouts(params, model)
        chosen = tree.assign(params, rules)
        unused = [r for r in ff_rules if not any(r.matches(p, flat[p]) for p in chosen)]
        if unused:
            raise tree.RuleError(f"feedforward rule(s) {unused} matched none of the IA3 targets "
                                 f"{sorted(chosen)[:6]}; a feed-forward module must also be a target")
        out = {}
        for path in chosen:
            shape = tuple(flat[path].shape)
            if layouts[path].kind != "kernel":
                raise ValueError(f"IA3 target {path!r} of shape {shape} is a {layouts[path].kind}, not a kernel "
                                 "(in, out); narrow the targets to linear kernels (e.g. '.*/k_proj/kernel')")
            out[path] = any(r.matches(path, flat[path]) for r in ff_rules)
        return out

    def vector_shape(params: Any, path: str, on_input: bool) -> tuple[tuple[int, ...], int]:
        """``(shape of l, number of output axes)`` for the kernel at ``path``."""
        shape = tuple(tree.flatten(params)[path].shape)
        lead, d_in, d_out = weight_layouts(params, model)[path].split(shape)
        return (*lead, *(d_in if on_input else d_out)), len(d_out)

    def init_fn(key: jax.Array, params: Any) -> dict:
        del key
        adapter = {f"{path}/{_LEAF}": jnp.ones(vector_shape(params, path, on_input)[0], dtype)
                   for path, on_input in resolve(params).items()}
        return tree.unflatten(adapter)

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> dict:
        del rng
        flat = tree.flatten(params)
        plan = resolve(params)
        scales = {}
        for path, leaf in tree.flatten(adapter).items():
            kernel_path, _, name = path.rpartition("/")
            if name != _LEAF:
                raise ValueError(f"adapter leaf {path!r} is not an IA3 vector (expected .../{_LEAF}); was this "
                                 "adapter made by another method?")
            scales[kernel_path] = leaf
        if set(scales) != set(plan):
            raise ValueError(
                "IA3 adapter does not fit these parameters: "
                f"adapter vectors without a target: {sorted(set(scales) - set(plan))[:5]}; "
                f"targets without a vector: {sorted(set(plan) - set(scales))[:5]}. "
                "Was it made for another model or with other targets?")
        wrapped = {}
        for path, on_input in plan.items():
            shape, scale = tuple(flat[path].shape), scales[path]
            want, outputs = vector_shape(params, path, on_input)
            if tuple(scale.shape) != want:
                raise ValueError(f"IA3 vector for {path!r} has shape {tuple(scale.shape)}, but the kernel "
                                 f"{shape} needs {want}; the adapter was made for another model")
            wrapped[path] = Ia3Weight(flat[path], scale, on_input, outputs)
            bias_path = path.rpartition("/")[0] + "/bias"
            if not on_input and bias_path in flat:
                wrapped[bias_path] = Ia3Weight(flat[bias_path], scale, outputs=outputs)
        return tree.replace(params, wrapped)

    def merge_fn(params: Any, adapter: Any) -> Any:
        applied = tree.flatten(apply_fn(params, adapter))
        return tree.replace(params, {p: v.materialize() for p, v in applied.items() if isinstance(v, Ia3Weight)})

    def merge_blocker(params: Any) -> str | None:
        flat = tree.flatten(params)
        wrapped = sorted(p for p in resolve(params) if ops.is_wrapper(flat[p]))
        if wrapped:
            return f"merging would turn the quantized base of {wrapped[0]!r} into a float weight"
        return None

    return Method("ia3", init_fn, apply_fn, merge_fn, merge_blocker=merge_blocker, label="ia3")


# ----------------------------------------------------------------------------- many adapters in one batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ia3Rows(ops.OverBase):
    """A weight (or bias) scaled by a different IA3 vector in every batch row (:class:`jpeft.MixedAdapters`).

    ``scale (*lead, S, *vec)``: a vector per slot (ones in an empty one); ``rows (*lead, B)``:
    a slot per row, ``-1`` for none (scale one). ``on_input`` and ``outputs`` mean what
    they mean for :class:`Ia3Weight`.
    """

    base: Any
    scale: jax.Array
    rows: jax.Array
    on_input: bool = dataclasses.field(default=False, metadata=dict(static=True))
    outputs: int = dataclasses.field(default=1, metadata=dict(static=True))

    def _scales(self, batch: int, ndim: int, dtype) -> jax.Array:
        """Each row's vector, shaped to broadcast against an ``ndim``-axis input or output."""
        rows.check_rows(self.rows, batch, self.rows.ndim - 1, "IA3 weight")
        idx, valid = rows.rows_and_valid(self.rows)
        s = jnp.take(self.scale, idx, axis=0)
        s = jnp.where(rows.per_row(valid, s.ndim), s, 1).astype(dtype)
        return s.reshape(s.shape[0], *(1,) * (ndim - s.ndim), *s.shape[1:])

    def linear(self, x: jax.Array) -> jax.Array:
        if self.on_input:
            return ops.linear(x * self._scales(x.shape[0], x.ndim, x.dtype), self.base)
        y = ops.linear(x, self.base)
        return y * self._scales(y.shape[0], y.ndim, y.dtype)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        if self.on_input:
            return ops.einsum(subscripts, x * self._scales(x.shape[0], x.ndim, x.dtype), self.base)
        y = ops.einsum(subscripts, x, self.base)
        return y * self._scales(y.shape[0], y.ndim, y.dtype)

    def add_bias(self, y: jax.Array) -> jax.Array:
        return y + ops.as_array(self.base, y.dtype) * self._scales(y.shape[0], y.ndim, y.dtype)

    materialize = rows.no_single_array


class _RowsPlan(NamedTuple):
    vector: tuple[int, ...]
    on_input: bool
    outputs: int
    dtype: str


def _rows_plan(leaves: list[Ia3Weight], lead: int, limits: dict) -> _RowsPlan:
    del limits
    kinds = {(tuple(x.scale.shape[lead:]), x.on_input, x.outputs) for x in leaves}
    if len(kinds) != 1:
        raise ValueError("IA3 adapters scale this weight in different ways (its inputs in one, its outputs in "
                         f"another: {sorted(kinds)}), which one batch cannot hold")
    (vector, on_input, outputs), = kinds
    return _RowsPlan(vector, on_input, outputs, jnp.dtype(jnp.result_type(*[x.scale.dtype for x in leaves])).name)


def _rows_stack(plan: _RowsPlan, leaves: list[Ia3Weight | None], lead_shape: tuple[int, ...]) -> dict:
    """The slots' vectors (host arrays: stacking compiles nothing); ones in an empty slot."""
    vectors, dtype = [], jnp.dtype(plan.dtype)
    for x in leaves:
        if x is None:
            vectors.append(np.ones((*lead_shape, *plan.vector), dtype))
            continue
        if (tuple(x.scale.shape[len(lead_shape):]), x.on_input, x.outputs) != plan[:3]:
            raise ValueError(f"its IA3 vector {tuple(x.scale.shape)} (on_input={x.on_input}) does not fit the slots' "
                             f"{plan.vector} (on_input={plan.on_input})")
        vectors.append(np.asarray(x.scale, dtype))
    return {"scale": np.stack(vectors, axis=len(lead_shape))}


def _rows_run(base, state: dict, plan: _RowsPlan, rows_: jax.Array) -> Ia3Rows:
    return Ia3Rows(base, state["scale"], rows_, on_input=plan.on_input, outputs=plan.outputs)


rows.register(Ia3Weight, rows.RowKind("ia3", _rows_plan, _rows_stack, _rows_run))


registry.register("ia3", ia3)
