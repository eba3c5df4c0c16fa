"""What the linen and nnx bridges share: layer plans, the canonical kernel layout, the :class:`FlaxModel`.

Why jpeft intercepts layers, not the contraction op
    A jpeft weight method wraps leaves (``LoraWeight``, ``QuantizedArray``, ``Ia3Weight``) that
    :mod:`jpeft.ops` computes without forming ``W + s * A @ B``. A Flax layer reads its raw kernel
    and calls ``dot_general`` itself, so the wrapped leaf must reach an op that knows it. jpeft
    replaces the *layer's method* (``Dense.__call__``, ``Embed.attend``, ...) by one that computes
    the same thing through :mod:`jpeft.ops` with the wrapped leaf: in linen with
    ``nn.intercept_methods`` (the module tree, its names and its non-adapted weights stay Flax's),
    in nnx by giving each registered layer a routing subclass in a fresh copy of the module
    graph made inside the call (``nnx.merge``; the user's module is never changed).
    Intercepting ``dot_general`` (qwix's way) would also catch contractions of activations
    (attention scores) and has to guess which operand is a weight from its shape; a layer knows
    which of its arrays is the kernel, which of its axes are inputs and outputs, and whether a
    table is looked up or attended to, so the layouts are exact and the user's rules name real
    parameter paths. A layer class jpeft does not know (a library's own ``Einsum``) is registered
    in a few lines: how to read its plan (which weights, which einsum) and how to compute it.

Why example inputs
    A kernel's input and output axes are fixed by the einsum its layer runs, and some layers get
    their equation only when called (``nn.Einsum(...)(x, "btd,dnh->btnh")``). ``wrap`` runs the
    model once under ``jax.eval_shape`` (nothing is computed) and records each registered layer's
    plan: the weights it reads, each kernel's einsum, and whether a table is used as an output head.

The canonical kernel layout
    jpeft's wrappers take a kernel as ``(*inputs, *outputs)`` (:mod:`jpeft.layout`). A kernel
    whose axes are ordered otherwise (Gemma's ``(heads, embed, head_dim)`` query kernel of
    ``"BTD,NDH->BTNH"``) is transposed once, when the model is wrapped, into ``(embed, heads,
    head_dim)``; ``FlaxModel.params`` holds it that way and the layer's equation is rewritten to
    match. ``FlaxModel.original_params`` transposes back (for ``merge``, or to save weights in the
    model's own layout).

The merge fallback, and its cost
    ``method.merge(frozen, adapter)`` then the unmodified model also runs any adapter on any
    Flax model (``FlaxModel.call_merged``), but inside a training loss it forms every adapted
    weight in full and its gradient: the backward pass of a LoRA step then costs about what full
    fine-tuning costs, and a 4-bit base is dequantized into a float copy. ``bind`` avoids both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpeft import ops, tree
from jpeft.models import capabilities
from jpeft.models.names import CheckpointNames
from jpeft.sharding import adapter_axes
from jpeft.layout import Layout

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class InteropError(ValueError):
    """A Flax model, layer or adapter that jpeft cannot run this way (the message says what to change)."""


class UnfactorableError(InteropError):
    """A kernel whose einsum has axes that are neither inputs nor outputs (an expert or batch axis)."""


class Contraction(NamedTuple):
    """A layer weight used as the kernel of a two-operand einsum ``"x,kernel->out"`` (``...`` allowed)."""

    eqn: str
    x_ndim: int


class Table(NamedTuple):
    """A layer weight used as a lookup table ``(rows, dim)``; ``head``: also as an output projection."""

    head: bool = False


class Plan(NamedTuple):
    """How jpeft holds one layer weight: ``kind``, its own axis order's subscripts, and the transpose to ``(*in, *out)``.

    ``kind`` ``"fixed"``: a weight the layer contracts in a way jpeft cannot factor into input and
    output axes (an MoE einsum's expert axis); it runs as written, and ``reason`` says why a
    method cannot adapt it. ``lead``: leading axes the parameter has and the layer does not see
    (a stack of layers that ``nnx.scan`` / ``nnx.vmap`` slices); ``shape`` and ``perm`` are the
    layer's view, one slice.
    """

    kind: str
    shape: tuple[int, ...]
    perm: tuple[int, ...] = ()
    inputs: int = 1
    reason: str = ""
    lead: int = 0

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.perm) if self.perm else self.shape

    @property
    def full_perm(self) -> tuple[int, ...]:
        """``perm`` over the whole parameter (its leading stack axes first, in place)."""
        return tuple(range(self.lead)) + tuple(self.lead + i for i in self.perm) if self.perm else ()


class LayerMethod(NamedTuple):
    """How jpeft computes one method of a layer class: ``plan`` (what it reads) and ``run`` (the computation)."""

    plan: Callable[..., dict]
    run: Callable[..., Any]


class LayerRegistry:
    """The layer classes (of one Flax API: linen or nnx) whose methods jpeft computes itself.

    Example:
        >>> class Base: ...
        >>> class Proj(Base):
        ...     def __call__(self, x): return x
        >>> layers = LayerRegistry(Base, "a toy")
        >>> layers.register(Proj, "__call__", plan=dict, run=lambda m, w, x: x)
        >>> sorted(layers.methods_for(Proj())), layers.class_names()
        (['__call__'], 'Proj')
    """

    def __init__(self, base: type, api: str):
        self.base, self.api = base, api
        self.rules: dict[type, dict[str, LayerMethod]] = {}

    def register(self, cls: type, method: str, plan: Callable[..., dict], run: Callable[..., Any]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise InteropError(f"register takes {self.api} Module class, got {cls!r}")
        if not callable(getattr(cls, method, None)):
            raise InteropError(f"{cls.__name__} has no method {method!r}")
        self.rules.setdefault(cls, {})[method] = LayerMethod(plan, run)

    def methods_for(self, module) -> dict[str, LayerMethod]:
        """``{method name: rule}`` for ``module``: the most derived registered class's rule of each method,
        unless ``module``'s class overrides that method (then jpeft does not know what it computes)."""
        return self.methods_for_class(type(module))

    def methods_for_class(self, own: type) -> dict[str, LayerMethod]:
        """:meth:`methods_for` of an instance of class ``own``."""
        out = {}
        for cls in reversed(own.__mro__):
            for name, rule in self.rules.get(cls, {}).items():
                if getattr(own, name) is getattr(cls, name):
                    out[name] = rule
        return out

    def registered(self, module) -> bool:
        """Whether ``module``'s class or a base of it is registered."""
        return any(cls in self.rules for cls in type(module).__mro__)

    def class_names(self) -> str:
        return ", ".join(sorted(c.__name__ for c in self.rules))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Transposed(ops.WeightWrapper):
    """A frozen kernel kept in its layer's own axis order, standing for its ``(*in, *out)`` transpose.

    ``shape`` is the transposed (canonical) shape that methods see; :meth:`einsum` contracts the
    array as stored, with the equation written back in its own order, so the layer computes
    exactly what Flax computes (a contraction over a transposed copy can round differently).
    ``perm`` orders the trailing axes; leading axes the array has beyond them (a stack of
    layers) stay in front, so a slice of the stack (``lax.scan``) is the layer's kernel.

    Example:
        >>> t = Transposed(jnp.ones((3, 2)), (1, 0))      # a (out, in) kernel seen as (in, out)
        >>> t.shape, t.einsum("bi,io->bo", jnp.ones((1, 2))).shape
        ((2, 3), (1, 3))
    """

    array: Any
    perm: tuple = dataclasses.field(metadata=dict(static=True))

    @property
    def _lead(self) -> int:
        return self.array.ndim - len(self.perm)

    @property
    def _full_perm(self) -> tuple[int, ...]:
        return tuple(range(self._lead)) + tuple(self._lead + i for i in self.perm)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[i] for i in self._full_perm)

    @property
    def dtype(self):
        return self.array.dtype

    def materialize(self, dtype=None) -> jax.Array:
        return jnp.transpose(self.array, self._full_perm).astype(dtype or self.array.dtype)

    def _own_order(self, w_sub: str) -> str:
        own = [""] * len(self.perm)
        for k, axis in enumerate(self.perm):
            own[axis] = w_sub[k]
        return "".join(own)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        x_sub, w_sub, out = expand(subscripts, x.ndim)
        return jnp.einsum(f"{x_sub},{self._own_order(w_sub)}->{out}", x, self.array.astype(x.dtype))

    def linear(self, x: jax.Array) -> jax.Array:
        return self.einsum("...i,io->...o", x)

    def partition_specs(self, axes: tuple, spec_for) -> "Transposed":
        own = [None] * len(self._full_perm)
        for k, axis in enumerate(self._full_perm):
            own[axis] = axes[k]
        return dataclasses.replace(self, array=spec_for(tuple(own), self.array.shape, "kernel"))


def expand(eqn: str, x_ndim: int) -> tuple[str, str, str]:
    """``(x, kernel, out)`` subscripts of ``eqn`` with any ``...`` in ``x`` and ``out`` spelled out.

    Example:
        >>> expand("...F,NHF->...NH", 3)
        ('abF', 'NHF', 'abNH')
    """
    eqn = eqn.replace(" ", "")
    operands, arrow, out = eqn.partition("->")
    x_sub, comma, w_sub = operands.partition(",")
    if not arrow or not comma or "," in w_sub or "..." in w_sub:
        raise InteropError(f"einsum {eqn!r}: jpeft runs layer einsums of the form 'x,kernel->out' (an explicit "
                           "'->', two operands, no '...' in the kernel)")
    if "..." in x_sub:
        named = len(x_sub) - 3
        free = [c for c in _LETTERS if c not in eqn][:x_ndim - named]
        x_sub = x_sub.replace("...", "".join(free))
        out = out.replace("...", "".join(free))
    if len(x_sub) != x_ndim:
        raise InteropError(f"einsum {eqn!r} names {len(x_sub)} input axes but the input has {x_ndim}")
    return x_sub, w_sub, out


def plan_of(spec: Contraction | Table, shape: tuple[int, ...], where: str) -> Plan:
    """The :class:`Plan` of a weight of ``shape`` used as ``spec`` says (``where`` names it in errors).

    Example:
        >>> plan_of(Contraction("BTD,NDH->BTNH", 3), (4, 16, 8), "q")
        Plan(kind='kernel', shape=(4, 16, 8), perm=(1, 0, 2), inputs=1, reason='', lead=0)
    """
    shape = tuple(shape)
    if isinstance(spec, Table):
        if len(shape) != 2:
            raise InteropError(f"{where}: a lookup table must be (rows, dim), got shape {shape}")
        return Plan("table", shape)
    x_sub, w_sub, out = expand(spec.eqn, spec.x_ndim)
    if len(w_sub) != len(shape):
        raise InteropError(f"{where}: einsum {spec.eqn!r} names {len(w_sub)} kernel axes but the kernel has shape "
                           f"{shape}")
    ins = [i for i, c in enumerate(w_sub) if c in x_sub and c not in out]
    outs = [i for i, c in enumerate(w_sub) if c in out and c not in x_sub]
    other = [w_sub[i] for i in range(len(w_sub)) if i not in ins and i not in outs]
    if other or not ins or not outs:
        raise UnfactorableError(
            f"{where}: einsum {spec.eqn!r} uses kernel axes {other or w_sub!r} that are neither only contracted with "
            "the input nor only kept in the output; jpeft adapts kernels that map input axes to output axes. "
            "Leave this weight out of the targets")
    perm = tuple(ins + outs)
    return Plan("kernel", shape, () if perm == tuple(range(len(shape))) else perm, len(ins))


class Weights:
    """The weights of one layer as its jpeft computation sees them (plain arrays or jpeft wrappers).

    ``w["kernel"]`` is the leaf; :meth:`einsum`, :meth:`linear`, :meth:`embed` and :meth:`attend`
    run it through :mod:`jpeft.ops`, :meth:`einsum` with the equation written in the model's own
    kernel axis order (jpeft rewrites it for the canonical ``(*in, *out)`` order it holds).
    """

    def __init__(self, leaves: Mapping[str, Any], plans: Mapping[str, Plan], where: str):
        self._leaves, self._plans, self.where = dict(leaves), dict(plans), where

    def __getitem__(self, name: str) -> Any:
        if name not in self._leaves:
            raise InteropError(f"{self.where} has no weight {name!r}; it has {sorted(self._leaves)}")
        return self._leaves[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._leaves.get(name, default)

    def einsum(self, name: str, eqn: str, x: jax.Array) -> jax.Array:
        """``jnp.einsum(eqn, x, W)`` for the kernel ``name``, in ``x``'s dtype."""
        plan = self._plans[name]
        x_sub, w_sub, out = expand(eqn, x.ndim)
        if plan.perm:
            w_sub = "".join(w_sub[i] for i in plan.perm)
        return ops.einsum(f"{x_sub},{w_sub}->{out}", x, self[name])

    def linear(self, name: str, x: jax.Array) -> jax.Array:
        """``x @ W`` for a ``(in, out)`` kernel."""
        return ops.linear(x, self[name])

    def embed(self, name: str, ids: jax.Array, dtype) -> jax.Array:
        return ops.embed(ids, self[name], dtype)

    def attend(self, name: str, x: jax.Array) -> jax.Array:
        return ops.attend(x, self[name])

    def bias_shape(self, name: str, eqn: str, x_ndim: int) -> tuple[int, ...]:
        """The shape a bias of the einsum's kept kernel axes broadcasts to in its output (Flax's ``Einsum``)."""
        x_sub, w_sub, out = expand(eqn, x_ndim)
        sizes = dict(zip(w_sub, self._plans[name].shape))
        return tuple(sizes.get(c, 1) for c in out)


def dtype_of(leaf) -> Any:
    return None if leaf is None else getattr(leaf, "dtype", jnp.float32)


def compute_dtype(module, *leaves):
    """The dtype Flax's ``promote_dtype`` computes a layer in: its ``dtype``, else the operands' result type."""
    own = getattr(module, "dtype", None)
    return own if own is not None else jnp.result_type(*[dtype_of(x) for x in leaves if x is not None])


def add_bias(y: jax.Array, bias, dtype, shape=None) -> jax.Array:
    """``y + bias`` (a wrapper bias, e.g. IA3's, is materialized: it is a vector)."""
    if bias is None:
        return y
    b = ops.as_array(bias, dtype)
    return y + (b if shape is None else b.reshape(shape))


class Site(NamedTuple):
    """One registered layer in the model: its path, its class name and the plans of the weights it adapts."""

    path: tuple
    kind: str
    plans: dict[str, Plan]


class _DottedNames:
    """Hugging Face-style module names from module paths: ``model/layers_0/q_proj/kernel`` -> ``model.layers.0.q_proj.weight``."""

    def to_name(self, path: str):
        parts = path.split("/")
        leaf = {"kernel": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
        mods = []
        for part in parts[:-1]:
            head, sep, tail = part.rpartition("_")
            mods.extend([head, tail] if sep and tail.isdigit() and head else [part])
        return ".".join([*mods, leaf]), None


def path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


class FlaxModel:
    """A Flax model as jpeft's methods see it (made by :func:`jpeft.interop.linen.wrap` or ``nnx.wrap``).

    Attributes:
        name: ``"linen:<class>"`` or ``"nnx:<class>"``.
        params: the frozen weights, a plain nested dict (kernels in the canonical ``(*in, *out)``
            order, see the module docstring): what a method's ``init`` and ``apply`` take.
        sites: ``{module path: Site}`` for every layer jpeft computes.
    """

    def __init__(self, name: str, params: Any, sites: dict[tuple, Site], runner: Callable, plain_runner: Callable,
                 axes: dict[str, tuple] | None = None, axes_kind: str = "mesh", tied: dict[str, str] | None = None):
        self.name, self.params, self.sites = name, params, sites
        self._tied = dict(tied or {})
        self._runner, self._plain = runner, plain_runner
        self._axes, self.axes_kind = axes or {}, axes_kind
        self._by_str = {path_str(p): s for p, s in sites.items()}

    # ------------------------------------------------------------------ what methods ask a model

    capabilities = frozenset({capabilities.WeightLayouts})
    """What it offers (:mod:`jpeft.models.capabilities`): weight methods, through its layers' layouts."""

    def layouts(self) -> dict[str, Layout]:
        """``{param path: Layout}`` for every weight a registered layer uses as a kernel or table (and can adapt)."""
        out = {}
        for prefix, site in self._by_str.items():
            for name, plan in site.plans.items():
                if plan.kind == "fixed":
                    continue
                out[f"{prefix}/{name}" if prefix else name] = (
                    Layout("table") if plan.kind == "table" else Layout("kernel", plan.lead, plan.inputs))
        return out

    @property
    def tied_tables(self) -> dict[str, str]:
        """Tables the model also uses as an output projection (``Embed.attend``): ``{path: path}``."""
        return dict(self._tied)

    @property
    def names(self) -> CheckpointNames:
        """Hugging Face-style names from the module paths (for :func:`jpeft.io.peft.save_peft`)."""
        return CheckpointNames(hf=_DottedNames())

    def param_axes(self) -> dict:
        """Logical (or mesh) axis names of every parameter from the model's partitioning metadata; ``None`` where none."""
        flat = tree.flatten(self.params)
        return tree.unflatten({p: self._axes.get(p, (None,) * len(leaf.shape)) for p, leaf in flat.items()})

    def adapter_axes(self, method, adapter) -> Any:
        """Axis names of every adapter leaf, inherited from the weight it adapts (LoRA's rank axis: ``"lora_rank"``)."""
        return adapter_axes(method, adapter, self.param_axes())

    def adapter_specs(self, method, adapter, rules: Any = None) -> Any:
        """A ``PartitionSpec`` per adapter leaf: the adapted kernel's sharding on its input/output axes.

        Names from ``nn.Partitioned`` and nnx's ``out_sharding`` are mesh axes; names from
        ``nn.LogicallyPartitioned`` are mapped with ``rules`` (Flax's ``logical_axis_rules`` pairs).
        jpeft's own names (``"lora_rank"``) are replicated.
        """
        axes = self.adapter_axes(method, adapter)

        def spec(names):
            if self.axes_kind == "logical":
                from flax import linen as nn

                known = {logical for logical, _ in (rules or ())}
                return nn.logical_to_mesh_axes(tuple(n if n in known else None for n in names), rules or ())
            return jax.sharding.PartitionSpec(*(None if n == "lora_rank" else n for n in names))

        return jax.tree.map(spec, axes, is_leaf=lambda x: isinstance(x, tuple))

    # ------------------------------------------------------------------ running

    def apply(self, method, adapter: Any, frozen: Any, *args, rng: jax.Array | None = None, **kwargs) -> Any:
        """The model's output with ``method``'s adapter, adapted layers computed through :mod:`jpeft.ops`."""
        applied = method.apply(frozen, adapter) if rng is None else method.apply(frozen, adapter, rng=rng)
        self._check_wrapped(applied)
        return self._runner(self._leaves_by_site(applied), applied, args, kwargs)

    def bind(self, method) -> Callable[..., Any]:
        """``fn(adapter, frozen, *args, rng=None, **kwargs) -> outputs``: the model with ``method`` (see :meth:`apply`)."""
        def fn(adapter, frozen, *args, rng=None, **kwargs):
            return self.apply(method, adapter, frozen, *args, rng=rng, **kwargs)
        return fn

    def call_plain(self, params: Any, *args, **kwargs) -> Any:
        """The unmodified model on plain ``params`` (in jpeft's canonical layout, e.g. ``method.merge``'s output)."""
        return self._plain(self.original_params(params), args, kwargs)

    def call_merged(self, method, adapter: Any, frozen: Any, *args, **kwargs) -> Any:
        """The merge fallback: ``merge``, then the unmodified model (full-size weights; see the module docstring)."""
        return self.call_plain(method.merge(frozen, adapter), *args, **kwargs)

    def original_params(self, params: Any) -> Any:
        """``params`` with every transposed kernel back in the model's own axis order."""
        flat = tree.flatten(params)
        back = {}
        for prefix, site in self._by_str.items():
            for name, plan in site.plans.items():
                path = f"{prefix}/{name}" if prefix else name
                if plan.perm and path in flat:
                    leaf = flat[path]
                    back[path] = leaf.array if isinstance(leaf, Transposed) else jnp.transpose(
                        ops.as_array(leaf), _inverse(plan.full_perm))
        return tree.replace(params, back) if back else params

    # ------------------------------------------------------------------ internals

    def _leaves_by_site(self, applied: Any) -> dict[tuple, Weights]:
        flat = tree.flatten(applied)
        grouped: dict[str, dict[str, Any]] = {}
        for path, leaf in flat.items():
            prefix, _, name = path.rpartition("/")
            grouped.setdefault(prefix, {})[name] = leaf
        return {p: Weights(grouped.get(path_str(p), {}), site.plans, f"{site.kind} at {path_str(p)!r}")
                for p, site in self.sites.items()}

    def _check_wrapped(self, applied: Any) -> None:
        for path, leaf in tree.flatten(applied).items():
            if not ops.is_wrapper(leaf):
                continue
            prefix, _, name = path.rpartition("/")
            site = self._by_str.get(prefix)
            if site is not None and name in site.plans and site.plans[name].kind == "fixed":
                raise InteropError(site.plans[name].reason)
            if site is None:
                known = sorted(f"{p}/{n}" if p else n for p, s in self._by_str.items() for n in s.plans)
                raise InteropError(
                    f"the method adapted {path!r}, which is not a weight of a layer jpeft computes in this model "
                    f"({self.name}); narrow the targets to the weights of its registered layers (register the "
                    f"layer's class otherwise). Adaptable weights: {', '.join(known[:8])}"
                    + (f" ... ({len(known) - 8} more)" if len(known) > 8 else ""))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def build(name: str, params: Any, records: list[tuple], runner, plain_runner,
          axes: dict[str, tuple] | None = None, axes_kind: str = "mesh") -> FlaxModel:
    """A :class:`FlaxModel` from the recorded ``(module path, class name, weight name, spec[, seen shape])`` of a
    traced call.

    ``seen shape``: the weight's shape as the layer saw it, when a lifted transform
    (``nnx.scan``) handed the layer one slice of a stacked parameter; the axes in front
    become the plan's ``lead``. Transposes kernels to ``(*in, *out)`` (and their axis names
    with them).
    """
    flat = tree.flatten(params)
    axes = dict(axes or {})
    sites: dict[tuple, Site] = {}
    tied = {}
    for path, kind, weight, spec, *seen in records:
        full = f"{path_str(path)}/{weight}" if path else weight
        if full not in flat:
            raise InteropError(f"{kind} at {path_str(path)!r} reads a weight {weight!r} that is not in the model's "
                               f"params (at {full!r})")
        where = f"{kind} at {path_str(path)!r}"
        stored = tuple(flat[full].shape)
        shape = tuple(seen[0]) if seen and seen[0] is not None else stored
        lead = len(stored) - len(shape)
        if lead < 0 or stored[lead:] != shape:
            raise InteropError(f"{where} sees its weight {weight!r} as {shape}, but the parameter is {stored}; jpeft "
                               "follows a transform that slices leading (stacked) axes only")
        try:
            plan = plan_of(spec, shape, where)._replace(lead=lead)
        except UnfactorableError as err:  # runs as written; an error only if a method's targets select it
            plan = Plan("fixed", shape, reason=f"{err} (a method's targets select {full!r})", lead=lead)
        if lead and plan.kind == "table":
            plan = Plan("fixed", shape, reason=f"{where}: jpeft adapts lookup tables of one layer, not a stack of "
                                               f"them ({full!r} has {lead} stacked axes); leave it out of the targets",
                        lead=lead)
        site = sites.setdefault(path, Site(path, kind, {}))
        if weight in site.plans and site.plans[weight] != plan:
            raise InteropError(f"{where} uses its weight {weight!r} in two ways ({site.plans[weight]} and {plan}); "
                               "jpeft needs one layout per weight")
        site.plans[weight] = plan
        if isinstance(spec, Table) and spec.head:
            tied[full] = full
    moved = {}
    for path, site in sites.items():
        for weight, plan in site.plans.items():
            if plan.perm:
                full = f"{path_str(path)}/{weight}" if path else weight
                moved[full] = Transposed(flat[full], plan.perm)
                if full in axes:
                    axes[full] = tuple(axes[full][i] for i in plan.full_perm)
    return FlaxModel(name, tree.replace(params, moved) if moved else params, sites, runner, plain_runner,
                     axes, axes_kind, tied)


def count_bits(tree_: Any) -> float:
    """Bits per logical parameter of a tree's leaves (wrappers count the arrays they hold).

    Example:
        >>> count_bits({"w": jnp.zeros((4, 4), jnp.bfloat16)})
        16.0
    """
    flat = tree.flatten(tree_)
    return 8 * sum(tree.leaf_bytes(x) for x in flat.values()) / max(1, sum(math.prod(x.shape) for x in flat.values()))
