"""jpeft's weight methods on an unmodified Flax linen module, through ``nn.intercept_methods``.

:func:`wrap` traces ``module.apply`` once on example inputs (``jax.eval_shape``: nothing is
computed) and records every registered layer it calls; the returned
:class:`jpeft.interop.FlaxModel` runs ``module.apply`` under an interceptor that computes those
layers' methods through :mod:`jpeft.ops` with the method's wrapped leaves, and lets every other
module run as written (its own code, names, non-adapted weights and collections). Why layers and
not ``dot_general``, and what the ``merge`` fallback costs: :mod:`jpeft.interop.core`.

Known layers: ``nn.Dense``, ``nn.DenseGeneral`` (without ``batch_dims``), ``nn.Einsum``,
``nn.Embed`` (lookups and ``attend``). :func:`register` adds a class (a library's own einsum or
embedding module). A registered module's ``setup`` is skipped (jpeft computes all of its
registered methods); its weights, jpeft's wrapped leaves included, are handed to Flax as the
``params`` collection and each layer reads its own from its scope, so lifted transforms over
blocks (``nn.remat``, ``nn.scan`` with ``variable_axes={"params": 0}``) slice them as they slice
plain weights: a scanned stack's kernels have a leading layer axis (their layouts' ``lead``).

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> from flax import linen as nn
    >>> from jpeft.interop import linen as jl
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="up")(x)))
    >>> x = jnp.ones((2, 4))
    >>> net = MLP()
    >>> model = jl.wrap(net, net.init(jax.random.key(0), x), x)
    >>> method = jpeft.lora(rank=2, targets=r".*/kernel", model=model)
    >>> adapter = method.init(jax.random.key(1), model.params)
    >>> fn = model.bind(method)                  # fn(adapter, frozen, *args) -> outputs
    >>> bool((fn(adapter, model.params, x) == net.apply({"params": model.params}, x)).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax.core import meta, unfreeze

from jpeft import tree
from jpeft.interop import layers
from jpeft.interop.core import FlaxModel, InteropError, LayerMethod, LayerRegistry, Weights, build, path_str

_LAYERS = LayerRegistry(nn.Module, "a linen")


def register(cls: type, method: str, plan: Callable[..., dict], run: Callable[..., Any]) -> None:
    """Teaches jpeft a linen layer class: ``cls.<method>`` is computed as ``run(module, weights, *args, **kwargs)``.

    ``plan(module, *args, **kwargs)`` returns ``{weight name: Contraction(eqn, x_ndim) | Table()}``
    for the weights that method reads (names within the module's scope); ``run`` gets a
    :class:`jpeft.interop.Weights` and computes through it (``weights.einsum(name, eqn, x)``
    takes the equation in the module's own kernel axis order). Subclasses are covered unless
    they override the method.

    Example:
        >>> from jpeft.interop.core import Contraction
        >>> class MyProj(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return x @ self.param("w", nn.initializers.ones, (x.shape[-1], 2))
        >>> register(MyProj, "__call__",
        ...          plan=lambda m, x: {"w": Contraction("...i,io->...o", x.ndim)},
        ...          run=lambda m, w, x: w.einsum("w", "...i,io->...o", x))
    """
    _LAYERS.register(cls, method, plan, run)


def _rule_for(module: nn.Module, method: str) -> LayerMethod | None:
    return _LAYERS.methods_for(module).get(method)


def _registered(module: nn.Module) -> bool:
    return _LAYERS.registered(module)


register(nn.Dense, "__call__", layers.dense_plan, layers.dense_run)
register(nn.DenseGeneral, "__call__", layers.general_plan, layers.general_run)
register(nn.Einsum, "__call__", layers.einsum_plan, layers.einsum_run)
register(nn.Embed, "__call__", layers.embed_plan, layers.embed_run)
register(nn.Embed, "attend", layers.attend_plan, layers.attend_run)


def _own_weights(module: nn.Module) -> dict[str, Any]:
    """The module's own parameters (jpeft's wrapped leaves when running; one slice of a stack under ``nn.scan``)."""
    own = module.scope.variables().get("params", {}) if module.scope is not None else {}
    return {name: value for name, value in own.items() if not isinstance(value, Mapping)}


def _axes(boxed: Any) -> tuple[dict[str, tuple], str]:
    """``({path: names}, kind)`` from ``nn.Partitioned`` (mesh axes) / ``nn.LogicallyPartitioned`` (logical) boxes."""
    is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
    leaves, _ = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)
    out, kind = {}, "mesh"
    for keypath, leaf in leaves:
        names = getattr(leaf, "names", None) if is_box(leaf) else None
        if names is not None:
            out[tree.path_to_str(keypath)] = tuple(names)
            if isinstance(leaf, nn.LogicallyPartitioned):
                kind = "logical"
    return out, kind


def wrap(module: nn.Module, variables: Any, *args, method: str | Callable | None = None, **kwargs) -> FlaxModel:
    """A :class:`jpeft.interop.FlaxModel` for ``module`` with ``variables``, traced on example ``args``.

    ``method`` and ``kwargs`` are what you would pass to ``module.apply`` (e.g. ``method="encode"``);
    the adapted call takes the same. Boxed (partitioned) variables are unboxed; their names
    become :meth:`~jpeft.interop.FlaxModel.param_axes`.
    """
    variables = unfreeze(variables)
    if "params" not in variables:
        raise InteropError(f"variables have no 'params' collection (they have {sorted(variables)}); pass what "
                           "module.init returned")
    axes, axes_kind = _axes(variables["params"])
    params = meta.unbox(variables["params"])
    rest = {k: meta.unbox(v) for k, v in variables.items() if k != "params"}
    records: list = []

    def recorder(next_fun, call_args, call_kwargs, context):
        m = context.module
        rule = _rule_for(m, context.method_name) if m.scope is not None else None
        if rule is not None:
            for name, spec in rule.plan(m, *call_args, **call_kwargs).items():
                seen = _own_weights(m).get(name)
                records.append((tuple(m.scope.path), type(m).__name__, name, spec,
                                None if seen is None else tuple(seen.shape)))
        return next_fun(*call_args, **call_kwargs)

    def traced(p):
        with nn.intercept_methods(recorder):
            return module.apply({"params": p, **rest}, *args, method=method, **kwargs)

    jax.eval_shape(traced, params)
    if not records:
        raise InteropError(f"{type(module).__name__} called none of the layers jpeft computes (known: "
                           f"{_LAYERS.class_names()}); register its layer classes")

    def runner(by_site, applied, call_args, call_kwargs):
        del by_site  # each layer reads its weights from its own scope (sliced by any lifted transform)

        def interceptor(next_fun, a, kw, context):
            m = context.module
            if m.scope is not None and _registered(m):
                site = model.sites.get(tuple(m.scope.path))
                if site is not None:
                    if context.method_name == "setup":
                        return None
                    rule = _rule_for(m, context.method_name)
                    if rule is not None:
                        weights = Weights(_own_weights(m), site.plans, f"{site.kind} at {path_str(site.path)!r}")
                        return rule.run(m, weights, *a, **kw)
            return next_fun(*a, **kw)

        with nn.intercept_methods(interceptor):
            return module.apply({"params": applied, **rest}, *call_args, method=method, **call_kwargs)

    def plain(params_, call_args, call_kwargs):
        return module.apply({"params": params_, **rest}, *call_args, method=method, **call_kwargs)

    model = build(f"linen:{type(module).__name__}", params, records, runner, plain, axes, axes_kind)
    return model
