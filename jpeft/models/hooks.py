"""Hook points: the places where input methods feed a model, declared by the model.

Weight methods (LoRA, IA3, quantization) change parameters the model already has.
Input methods add something the model must know how to use: virtual tokens before the
input (prompt tuning, P-tuning), extra key/value rows in every attention layer (prefix
tuning), a function applied to every block's output (bottleneck adapters). A model
declares which of these it supports as :class:`HookPoint` values (its ``hooks``), and
reads the values where it computes them; a method never writes a model's paths itself,
it calls :func:`attach` with a hook point's name.

Values live in the parameter tree under the key :data:`HOOKS`, so they travel with the
parameters through ``jit``, ``scan`` over stacked layers and sharding:

* a model-wide point (``per_layer=False``) at ``<scope>/hooks/<name>``;
* a per-layer point at ``<scope>/layers_{i}/hooks/<name>``, or with stacked layers at
  ``<scope>/layers/hooks/<name>`` with a leading layer axis. :func:`attach` takes a
  per-layer value with that leading axis in both cases and slices it when needed.

Kinds of hook point and the value each takes:

* ``"tokens"``: ``(n, width)`` virtual-token embeddings placed before the input, or a
  per-row value ``{"embeddings": (B, n, width), "mask": (B, n)}`` (:func:`row_tokens`)
  where each batch row has its own virtual tokens, ``mask`` False on a row's unused
  slots (several prompt adapters in one batch, :mod:`jpeft.methods.mixed`);
* ``"kv"``: ``{"key": (L, n, width), "value": (L, n, width)}`` rows every attention
  layer attends to besides the input's own keys and values;
* ``"block"``: a pytree callable ``h -> h`` (leaves with a leading ``L`` axis) applied to
  a block's output before the residual add.

Example:
    >>> import jax.numpy as jnp
    >>> point = HookPoint("prefix", "kv", width=4, layers=2)
    >>> params = {"layers_0": {"w": jnp.ones(1)}, "layers_1": {"w": jnp.ones(1)}}
    >>> value = {"key": jnp.zeros((2, 3, 4)), "value": jnp.zeros((2, 3, 4))}
    >>> hooked = attach(params, point, value)
    >>> get(hooked["layers_1"], "prefix")["key"].shape
    (3, 4)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from jpeft import stack

HOOKS = "hooks"
KINDS = ("tokens", "kv", "block")


class HookPoint(NamedTuple):
    """A place a model reads an input method's value (see the module docstring).

    Attributes:
        name: the point's name, e.g. ``"prompt"``, ``"prefix"``, ``"mlp_output"``.
        kind: ``"tokens"``, ``"kv"`` or ``"block"``.
        width: the last dimension a value must have (the model width for tokens and
            blocks, key/value heads x head size for ``kv``).
        layers: number of layers for per-layer points; 0 for a model-wide point.
        scope: path of the subtree that holds the layers (``""``: the top level).
        source: for ``"tokens"``, the path of the token embedding table (text inits read it).
    """

    name: str
    kind: str
    width: int
    layers: int = 0
    scope: str = ""
    source: str | None = None

    @property
    def per_layer(self) -> bool:
        return self.layers > 0


def get(node: Any, name: str) -> Any:
    """The value of hook ``name`` in a (layer's) parameter subtree, or ``None``."""
    if isinstance(node, stack.Segments):  # a stack handed over in parts: its hooks stay in the shared stack
        node = node.shared
    if not isinstance(node, dict):
        return None
    return (node.get(HOOKS) or {}).get(name)


def _scope(params: dict, scope: str) -> dict:
    node = params
    for key in filter(None, scope.split("/")):
        node = node[key]
    return node


def _replace_scope(params: dict, scope: str, new: dict) -> dict:
    keys = [k for k in scope.split("/") if k]
    if not keys:
        return new
    head, rest = keys[0], "/".join(keys[1:])
    return {**params, head: _replace_scope(params[head], rest, new)}


def _with_hook(node: dict, name: str, value: Any) -> dict:
    hooks = dict(node.get(HOOKS) or {})
    if name in hooks:
        raise ValueError(f"these parameters already carry a {name!r} value; apply one such adapter at a time")
    hooks[name] = value
    return {**node, HOOKS: hooks}


def check_value(point: HookPoint, value: Any) -> int:
    """Checks a value's shapes against the hook point; returns ``n`` (0 for blocks).

    Raises:
        ValueError: naming the point and the shape it needs.
    """
    if point.kind == "tokens":
        if isinstance(value, dict):
            return _check_row_tokens(point, value)
        shape = tuple(value.shape)
        if len(shape) != 2 or shape[1] != point.width:
            raise ValueError(f"the {point.name!r} value has shape {shape}, but this model needs (n, {point.width}): "
                             "n virtual tokens of the model's width. Was the adapter made for another model?")
        return shape[0]
    if point.kind == "kv":
        shapes = {part: tuple(value[part].shape) for part in ("key", "value")}
        for part, shape in shapes.items():
            if len(shape) != 3 or shape[0] != point.layers or shape[2] != point.width:
                raise ValueError(f"the {point.name!r} {part} has shape {shape}, but this model needs "
                                 f"({point.layers}, n, {point.width}) (layers, rows, key/value width). "
                                 "Was the adapter made for another model?")
        if shapes["key"] != shapes["value"]:
            raise ValueError(f"the {point.name!r} key and value shapes differ: {shapes}")
        return shapes["key"][1]
    return 0


def _check_row_tokens(point: HookPoint, value: dict) -> int:
    if set(value) != {"embeddings", "mask"}:
        raise ValueError(f"a per-row {point.name!r} value is {{'embeddings', 'mask'}}, got keys {sorted(value)}")
    shape, mask = tuple(value["embeddings"].shape), tuple(value["mask"].shape)
    if len(shape) != 3 or shape[2] != point.width or mask != shape[:2]:
        raise ValueError(f"the per-row {point.name!r} value has embeddings {shape} and mask {mask}, but this model "
                         f"needs (B, n, {point.width}) and (B, n). Was the adapter made for another model?")
    return shape[1]


def row_tokens(embeddings_BxNxD: jax.Array, mask_BxN: jax.Array) -> dict:
    """A per-row ``tokens`` value: row ``b`` puts ``embeddings[b][mask[b]]`` before its input.

    Example:
        >>> import jax.numpy as jnp
        >>> value = row_tokens(jnp.ones((2, 3, 4)), jnp.array([[True] * 3, [False, True, True]]))
        >>> check_value(HookPoint("prompt", "tokens", 4), value)
        3
    """
    return {"embeddings": embeddings_BxNxD, "mask": jax.numpy.asarray(mask_BxN, bool)}


def tokens_for_rows(value: Any, batch: int, dtype) -> tuple[jax.Array, jax.Array]:
    """``(embeddings (B, n, D), mask (B, n))`` of a ``tokens`` value for a batch of ``batch`` rows.

    A shared ``(n, D)`` value is the same for every row (mask all True); a per-row value
    (:func:`row_tokens`) must have ``batch`` rows. Models call this where they put virtual
    tokens before the input, so both kinds of value work unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> embeddings, mask = tokens_for_rows(jnp.ones((3, 4)), 2, jnp.float32)
        >>> embeddings.shape, mask.tolist()
        ((2, 3, 4), [[True, True, True], [True, True, True]])
    """
    if isinstance(value, dict):
        embeddings, mask = value["embeddings"], value["mask"]
        if embeddings.shape[0] != batch:
            raise ValueError(f"the per-row virtual tokens are for {embeddings.shape[0]} rows, but the batch has "
                             f"{batch}; make the rows for this batch")
        return embeddings.astype(dtype), mask.astype(bool)
    n = value.shape[0]
    return jax.numpy.broadcast_to(value.astype(dtype), (batch, *value.shape)), jax.numpy.ones((batch, n), bool)


def _layer_length(point: HookPoint, value: Any) -> int | None:
    """``n`` of one layer's slice of a ``kv`` value (``(n, width)`` key and value)."""
    return check_value(point._replace(layers=1), jax.tree.map(lambda x: x[None], value))


def attach(params: dict, point: HookPoint, value: Any) -> dict:
    """``params`` with ``value`` at hook ``point`` (a new tree; the base arrays are shared, not copied)."""
    check_value(point, value)
    container = _scope(params, point.scope)
    if not point.per_layer:
        return _replace_scope(params, point.scope, _with_hook(container, point.name, value))
    container = dict(container)
    if stack.STACK in container:
        container[stack.STACK] = _with_hook(container[stack.STACK], point.name, value)
    else:
        names = stack.layer_names(container)
        if len(names) != point.layers:
            raise ValueError(f"hook {point.name!r} expects {point.layers} layers but the parameters have "
                             f"{len(names)} layers_{{i}} subtrees")
        for i, layer in enumerate(names):
            container[layer] = _with_hook(container[layer], point.name, jax.tree.map(lambda x: x[i], value))
    return _replace_scope(params, point.scope, container)


def read(params: dict, point: HookPoint) -> Any:
    """The value at hook ``point`` (per-layer values stacked along a leading axis), or ``None``."""
    container = _scope(params, point.scope)
    if not point.per_layer:
        return get(container, point.name)
    if stack.STACK in container:
        return get(container[stack.STACK], point.name)
    values = [get(container[n], point.name) for n in stack.layer_names(container)]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"hook {point.name!r} is set in some layers only")
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *values)


def length(params: dict, point: HookPoint) -> int:
    """``n``, the slots a ``tokens`` or ``kv`` value at ``point`` takes before the input (0: none).

    Reads shapes only: nothing is computed, so models call it while tracing.
    """
    container = _scope(params, point.scope)
    if not point.per_layer:
        value = get(container, point.name)
        return 0 if value is None else check_value(point, value)
    if stack.STACK in container:
        value = get(container[stack.STACK], point.name)
        return 0 if value is None else check_value(point, value)
    lengths = set()
    for name in stack.layer_names(container):
        value = get(container[name], point.name)
        lengths.add(None if value is None else _layer_length(point, value))
    if len(lengths) > 1:
        raise ValueError(f"hook {point.name!r} has values of different lengths (or none) across layers: "
                         f"{sorted(lengths, key=str)}")
    return lengths.pop() or 0


def virtual_lengths(params: dict, points: dict[str, HookPoint]) -> dict[str, int]:
    """``{name: n}`` for every ``tokens`` and ``kv`` hook point (0 where no value is attached)."""
    return {name: length(params, point) for name, point in points.items() if point.kind in ("tokens", "kv")}
