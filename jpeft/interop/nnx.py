"""jpeft's weight methods on an unmodified Flax nnx module, by graph surgery on a copy made inside the call.

:func:`wrap` splits the module into its graph definition, its ``nnx.Param`` state (the frozen
weights, as a plain nested dict) and the rest, and traces one call on example inputs
(``jax.eval_shape``) to record each registered layer's plan. The returned
:class:`jpeft.interop.FlaxModel`'s ``bind(method)`` is a pure function: it rebuilds the module
with ``nnx.merge`` from the frozen weights (a fresh object every call, so the user's module is
never changed), puts a routing object in place of every registered layer (it computes the
layer's methods through :mod:`jpeft.ops` with the method's wrapped leaves and reads anything
else from the original layer), and calls the copy. nnx has no method interceptors; replacing the
layer objects of a private copy is the out-of-place equivalent. Why layers and not
``dot_general``, and what the ``merge`` fallback costs: :mod:`jpeft.interop.core`.

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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpeft import ops, tree
from jpeft.interop import layers
from jpeft.interop.core import FlaxModel, InteropError, LayerMethod, LayerRegistry, build, path_str

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


class _Routed:
    """Stands in for a registered layer in a private copy of the graph: its registered methods go to ``call``."""

    def __init__(self, layer, methods: dict[str, LayerMethod], call: Callable):
        self._layer, self._methods, self._call = layer, methods, call

    def __call__(self, *args, **kwargs):
        return self._call(self._layer, "__call__", args, kwargs)

    def __getattr__(self, name):
        if name in self.__dict__.get("_methods", {}):
            return lambda *a, **kw: self._call(self._layer, name, a, kw)
        return getattr(self.__dict__["_layer"], name)


def _install(root, call: Callable):
    """Replaces every registered layer under ``root`` by a :class:`_Routed`; returns the (possibly replaced) root."""
    found = [(path, node) for path, node in nnx.iter_graph(root)
             if isinstance(node, nnx.Module) and _methods_for(node)]
    for path, node in found:
        routed = _Routed(node, _methods_for(node), call)
        if not path:
            return routed
        parent = root
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) or not hasattr(parent, str(key)) else getattr(parent, key)
        key = path[-1]
        if isinstance(parent, nnx.Module) and not isinstance(key, int) and hasattr(parent, key):
            setattr(parent, key, routed)
        else:
            parent[key] = routed
    return root


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

    def record(layer, name, a, kw):
        for weight, spec in _methods_for(layer)[name].plan(layer, *a, **kw).items():
            records.append((paths[id(layer)], type(layer).__name__, weight, spec))
        return getattr(layer, name)(*a, **kw)

    paths: dict[int, tuple] = {}

    def traced(pure):
        copy = rebuild(pure)
        paths.clear()
        paths.update({id(node): path for path, node in nnx.iter_graph(copy) if isinstance(node, nnx.Module)})
        return getattr(_install(copy, record), entry)(*args, **kwargs)

    jax.eval_shape(traced, params)
    if not records:
        raise InteropError(f"{type(module).__name__} called none of the layers jpeft computes (known: "
                           f"{_LAYERS.class_names()}); register its layer classes")

    def runner(by_site, applied, call_args, call_kwargs):
        planned = {path_str(p) + f"/{n}" for p, s in model.sites.items() for n in s.plans}
        flat = tree.flatten(applied)
        pure = tree.replace(params, {p: (jnp.zeros((), jnp.float32) if p in planned or ops.is_wrapper(leaf) else leaf)
                                     for p, leaf in flat.items()})
        copy = rebuild(pure)
        where = {id(node): path for path, node in nnx.iter_graph(copy) if isinstance(node, nnx.Module)}

        def call(layer, name, a, kw):
            weights = by_site.get(where[id(layer)])
            if weights is None:  # a registered layer the traced call did not use
                return getattr(layer, name)(*a, **kw)
            return _methods_for(layer)[name].run(layer, weights, *a, **kw)

        return getattr(_install(copy, call), entry)(*call_args, **call_kwargs)

    def plain(pure, call_args, call_kwargs):
        return getattr(rebuild(pure), entry)(*call_args, **call_kwargs)

    model = build(f"nnx:{type(module).__name__}", params, records, runner, plain, axes, axes_kind)
    return model
