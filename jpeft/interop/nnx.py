"""jpeft's weight methods on an unmodified Flax nnx module, by graph surgery on a copy made inside the call.

:func:`wrap` splits the module into its graph definition, its ``nnx.Param`` state (the frozen
weights, as a plain nested dict) and the rest, and traces one call on example inputs
(``jax.eval_shape``) to record each registered layer's plan. The returned
:class:`jpeft.interop.FlaxModel`'s ``bind(method)`` is a pure function: it rebuilds the module
with ``nnx.merge`` from the method's applied parameters (a fresh object every call, so the user's
module is never changed; an adapted weight's ``nnx.Param`` holds jpeft's wrapped leaf), gives
every registered layer of the copy a routing subclass of its own class (its registered methods
compute through :mod:`jpeft.ops` with the weights in the layer's own parameters), and calls the
copy. nnx has no method interceptors; changing the layer classes of a private copy is the
out-of-place equivalent. The routed layers are still nnx modules, so lifted transforms over
blocks (``nnx.remat``, ``nnx.scan``, ``nnx.vmap``) split, slice and merge them as they would the
originals: a stack of blocks made with ``nnx.vmap`` and run with ``nnx.scan`` has kernels with a
leading layer axis (their layouts' ``lead``), and each step's layer computes with its slice of
the adapter. Why layers and not ``dot_general``, and what the ``merge`` fallback costs:
:mod:`jpeft.interop.core`.

Known layers: ``nnx.Linear``, ``nnx.LinearGeneral`` (without ``batch_axis``), ``nnx.Einsum``,
``nnx.Embed`` (lookups and ``attend``); :func:`register` adds others.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> from flax import nnx
    >>> from jpeft.interop import nnx as jn
    >>> net = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((2, 4))
    >>> model = jn.wrap(net, x)
    >>> sorted(model.layouts())
    ['layers/0/kernel', 'layers/2/kernel']
    >>> method = jpeft.lora(rank=2, targets=r".*/kernel", model=model)
    >>> adapter = method.init(jax.random.key(1), model.params)
    >>> bool((model.bind(method)(adapter, model.params, x) == net(x)).all())
    True
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpeft import ops, tree
from jpeft.interop import layers
from jpeft.interop.core import FlaxModel, InteropError, LayerMethod, LayerRegistry, Weights, build, path_str

_LAYERS = LayerRegistry(nnx.Module, "an nnx")


def register(cls: type, method: str, plan: Callable[..., dict], run: Callable[..., Any]) -> None:
    """Teaches jpeft an nnx layer class (same contract as :func:`jpeft.interop.linen.register`).

    Weight names are the layer's attribute names of its ``nnx.Param`` s (``"kernel"``).

    Example:
        >>> from jpeft.interop.core import Contraction
        >>> class Proj(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.w = nnx.Param(jnp.ones((4, 2)))
        ...     def __call__(self, x):
        ...         return x @ self.w[...]
        >>> register(Proj, "__call__", plan=lambda m, x: {"w": Contraction("...i,io->...o", x.ndim)},
        ...          run=lambda m, w, x: w.einsum("w", "...i,io->...o", x))
    """
    _LAYERS.register(cls, method, plan, run)


def _methods_for(module) -> dict[str, LayerMethod]:
    return _LAYERS.methods_for(module)


register(nnx.Linear, "__call__", layers.dense_plan, layers.dense_run)
register(nnx.LinearGeneral, "__call__", layers.general_plan, layers.general_run)
register(nnx.Einsum, "__call__", layers.einsum_plan, layers.einsum_run)
register(nnx.Embed, "__call__", layers.embed_plan, layers.embed_run)
register(nnx.Embed, "attend", layers.attend_plan, layers.attend_run)


# The layer calls of one wrapped call (recording or running), seen by the routed layer classes below.
_HANDLER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("jpeft_nnx_handler", default=None)
_ROUTED: dict[type, type] = {}
_PATH = "_jpeft_path"


def _routed_class(cls: type) -> type:
    """A subclass of layer class ``cls`` whose registered methods go to the active handler.

    The layers of a private copy of the graph get this class (and their path as a static
    attribute), so they stay nnx modules: lifted transforms (``nnx.remat``, ``nnx.scan``,
    ``nnx.vmap``) split and merge them like any layer, slice their parameters, and the copy
    they call inside the transform still routes its methods to jpeft.
    """
    if cls not in _ROUTED:
        def route(name):
            def method(self, *args, **kwargs):
                handler = _HANDLER.get()
                original = getattr(cls, name)
                if handler is None:  # outside a wrapped call: the layer's own method
                    return original(self, *args, **kwargs)
                return handler(self, cls, name, original, args, kwargs)
            method.__name__ = name
            return method

        names = _LAYERS.methods_for_class(cls)
        _ROUTED[cls] = type(f"Routed{cls.__name__}", (cls,), {name: route(name) for name in names})
    return _ROUTED[cls]


def _install(root) -> None:
    """Gives every registered layer under ``root`` (a private copy) its routed class and its path."""
    for path, node in nnx.iter_graph(root):
        if isinstance(node, nnx.Module) and _methods_for(node):
            object.__setattr__(node, _PATH, tuple(path))
            node.__class__ = _routed_class(type(node))


def _own_weights(layer) -> dict[str, Any]:
    """The layer's own ``nnx.Param`` values (jpeft's wrapped leaves in a running copy; slices under ``nnx.scan``)."""
    return {name: value.get_value() for name, value in vars(layer).items() if isinstance(value, nnx.Param)}


def _pure_axes(state) -> tuple[dict[str, tuple], str]:
    out = {}
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
        if names is not None:
            out[path_str(path)] = tuple(names)
    return out, "mesh"


def wrap(module: nnx.Module, *args, method: str | None = None, **kwargs) -> FlaxModel:
    """A :class:`jpeft.interop.FlaxModel` for an nnx ``module``, traced on example ``args``.

    ``method`` names the module's method to call (default ``__call__``); the adapted call takes
    the same arguments. Partitioning metadata (``out_sharding``) becomes
    :meth:`~jpeft.interop.FlaxModel.param_axes`.
    """
    if not isinstance(module, nnx.Module):
        raise InteropError(f"jpeft.interop.nnx.wrap takes an nnx.Module, got {type(module).__name__} (for linen "
                           "modules use jpeft.interop.linen.wrap)")
    graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)
    axes, axes_kind = _pure_axes(param_state)
    entry = method or "__call__"

    def rebuild(pure):
        state = jax.tree.map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(graphdef, state, rest)

    records: list = []

    def record(layer, cls, name, original, a, kw):
        own = _own_weights(layer)
        for weight, spec in _LAYERS.methods_for_class(cls)[name].plan(layer, *a, **kw).items():
            seen = tuple(own[weight].shape) if weight in own else None
            records.append((getattr(layer, _PATH), cls.__name__, weight, spec, seen))
        return original(layer, *a, **kw)

    def traced(pure):
        copy = rebuild(pure)
        _install(copy)
        token = _HANDLER.set(record)
        try:
            return getattr(copy, entry)(*args, **kwargs)
        finally:
            _HANDLER.reset(token)

    jax.eval_shape(traced, params)
    if not records:
        raise InteropError(f"{type(module).__name__} called none of the layers jpeft computes (known: "
                           f"{_LAYERS.class_names()}); register its layer classes")

    def runner(by_site, applied, call_args, call_kwargs):
        del by_site  # each layer reads its weights from its own parameters (sliced by any lifted transform)
        copy = rebuild(tree.replace(params, tree.flatten(applied)))
        _install(copy)

        def call(layer, cls, name, original, a, kw):
            site = model.sites.get(getattr(layer, _PATH))
            if site is None:  # a registered layer the traced call did not use
                return original(layer, *a, **kw)
            weights = Weights(_own_weights(layer), site.plans, f"{site.kind} at {path_str(site.path)!r}")
            return _LAYERS.methods_for_class(cls)[name].run(layer, weights, *a, **kw)

        token = _HANDLER.set(call)
        try:
            return getattr(copy, entry)(*call_args, **call_kwargs)
        finally:
            _HANDLER.reset(token)

    def plain(pure, call_args, call_kwargs):
        return getattr(rebuild(pure), entry)(*call_args, **call_kwargs)

    model = build(f"nnx:{type(module).__name__}", params, records, runner, plain, axes, axes_kind)
    return model
