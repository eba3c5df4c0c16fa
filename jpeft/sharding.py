"""Sharding on a device mesh: logical-axis rules -> ``NamedSharding``; adapters inherit.

Four pieces of data decide where every array lives:

* the **mesh**: named device axes, ``{"data": 1, "fsdp": -1, "tensor": 2}`` (-1 = the rest);
* the **logical axes** of every parameter, from the model: ``("embed", "q_heads")`` for a
  query kernel (``model.param_axes()``);
* the **rules**: logical name -> a mesh axis, a list of mesh axes (the dimension is split
  over their product) or ``None`` (replicated); :data:`RULE_TABLES` holds the named ones
  (``"default"``: FSDP x tensor, ``"fsdp"``: pure FSDP), and any mapping works;
* the **method**, which derives its adapter's axes from the parameters' (LoRA: ``A`` takes
  the weight's input axes, ``B`` its output axes, the rank axis ``"lora_rank"`` is replicated).

Shardings are computed from shapes alone (``jax.eval_shape``), then arrays are created
where they belong (``jax.jit(init, out_shardings=...)``): nothing is allocated whole.
A weight wrapper (a quantized weight) says how its arrays follow the weight's axes
(:meth:`jpeft.ops.WeightWrapper.partition_specs`). Bad input is a :class:`ShardingError`
raised before anything is compiled, naming the parameter and the axis: a mesh that does
not fit the devices, a rule that names no mesh axis, a dimension that its mesh axes do
not divide.

A mesh axis shards at most one dimension of an array: when two dimensions' rules name
the same mesh axis, the first dimension gets it and the later one is not split on it.

Example (the pattern a trainer follows; it runs on any number of devices):
    >>> import jax, jpeft, optax
    >>> from jpeft import sharding
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                       num_layers=2, num_heads=4, num_kv_heads=2, scan_layers=True))
    >>> mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    >>> rules = sharding.load_rules("default")
    >>> axes = model.param_axes()
    >>> params_sh = sharding.shardings_for(model.abstract_params(), axes, mesh, rules)
    >>> params = jax.jit(model.init, out_shardings=params_sh)(jax.random.key(0))
    >>> method = jpeft.lora(rank=4, targets=r".*/q_proj/kernel", model=model)
    >>> key = jax.random.key(1)
    >>> adapter_sh = sharding.adapter_shardings(method, jax.eval_shape(method.init, key, params),
    ...                                         axes, mesh, rules)
    >>> adapter = jax.jit(method.init, out_shardings=adapter_sh)(key, params)
    >>> adapter["layers"]["self_attn"]["q_proj"]["kernel"]["a"].sharding.spec
    P(None, 'fsdp', None)
    >>> optimizer = optax.adam(1e-3)
    >>> opt_sh = sharding.optimizer_shardings(optimizer, jax.eval_shape(optimizer.init, adapter), adapter_sh, mesh)
    >>> opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(adapter)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jpeft import ops, tree
from jpeft.layout import flatten_axes, inherited_axes

if TYPE_CHECKING:
    from jpeft.methods.base import Method

Rules = Mapping[str, "str | tuple[str, ...] | None"]

_WEIGHTS_REPLICATED = {"seq": None, "norm": None, "layers": None, "lora_rank": None,
                       "relpos_buckets": None, "heads": None}  # T5's relative position bias table: small
RULE_TABLES: dict[str, dict] = {
    # FSDP x tensor parallelism: the model dimension is split over fsdp (gathered per layer in the
    # forward pass), heads / MLP hidden / vocabulary over tensor (Megatron-style); batches over
    # data x fsdp. LoRA factors inherit their weight's axes; the rank is replicated.
    "default": {"batch": ("data", "fsdp"), "vocab": "tensor", "embed": "fsdp", "q_heads": "tensor",
                "kv_heads": "tensor", "mlp": "tensor", **_WEIGHTS_REPLICATED},
    # Pure FSDP: every weight split along the model dimension only.
    "fsdp": {"batch": ("data", "fsdp"), "vocab": None, "embed": "fsdp", "q_heads": None, "kv_heads": None,
             "mlp": None, **_WEIGHTS_REPLICATED},
}
"""Named logical-axis rule tables (data): ``load_rules("default")`` or ``load_rules("fsdp")``."""


class ShardingError(ValueError):
    """A mesh, a rule table or an array shape that cannot be sharded as asked."""


# ----------------------------------------------------------------------------- mesh


def mesh_sizes(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one ``-1`` size to the devices left over and checks the product.

    Example:
        >>> mesh_sizes({"data": 2, "fsdp": -1, "tensor": 2}, 8)
        {'data': 2, 'fsdp': 2, 'tensor': 2}
    """
    sizes = dict(shape)
    if not sizes:
        raise ShardingError("a mesh needs at least one axis, e.g. {'data': -1}")
    for name, size in sizes.items():
        if not isinstance(name, str) or not name:
            raise ShardingError(f"mesh axis names must be non-empty strings, got {name!r}")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not (size >= 1 or size == -1):
            raise ShardingError(f"mesh axis {name!r} has size {size!r}; sizes are positive ints or -1 (the rest)")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ShardingError(f"mesh {shape} has -1 for several axes {rest}; at most one axis takes the rest")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise ShardingError(f"mesh {shape}: the other axes take {known} devices, which does not "
                                f"divide the {num_devices} devices, so {rest[0]!r} cannot take the rest")
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        raise ShardingError(f"mesh {shape} needs {known} devices but there are {num_devices}; "
                            f"change the sizes, use -1 for one axis, or pass devices=... for a subset")
    return {name: int(size) for name, size in sizes.items()}


def make_mesh(shape: Mapping[str, int], *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A device mesh from ``{axis name: size}`` (one size may be -1: the rest of the devices).

    Uses every device (all processes') unless ``devices`` is given; axes are
    ``AxisType.Auto``, so XLA propagates shardings through any model code.

    Raises:
        ShardingError: if the sizes do not multiply to the number of devices.

    Example:
        >>> mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
        >>> mesh.axis_names, mesh.size == jax.device_count()
        (('data', 'fsdp', 'tensor'), True)
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(shape, len(devices))
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes),
                         devices=devices)


# ----------------------------------------------------------------------------- rules


def _as_axes(value) -> tuple[str, ...]:
    """A rule's value as a tuple of mesh axis names (empty: replicated)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def check_rules(rules: Mapping[str, Any]) -> dict[str, str | tuple[str, ...] | None]:
    """Validates a rule table; returns it with lists turned into tuples.

    Example:
        >>> check_rules({"batch": ["data", "fsdp"], "embed": "fsdp", "norm": None})
        {'batch': ('data', 'fsdp'), 'embed': 'fsdp', 'norm': None}
    """
    if not isinstance(rules, Mapping):
        raise ShardingError(f"sharding rules must be a mapping logical name -> mesh axes, got {type(rules).__name__}")
    out = {}
    for name, value in rules.items():
        valid = value is None or isinstance(value, (str, list, tuple))
        axes = _as_axes(value) if valid else ()
        if not isinstance(name, str) or not valid or not all(isinstance(a, str) and a for a in axes):
            raise ShardingError(f"sharding rule {name!r}: {value!r} is not a mesh axis name, a list of "
                                f"them, or null (replicated)")
        if len(set(axes)) != len(axes):
            raise ShardingError(f"sharding rule {name!r}: {value!r} names a mesh axis twice")
        out[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return out


def load_rules(source: str | Mapping[str, Any] = "default") -> dict:
    """A rule table by name (:data:`RULE_TABLES`) or a mapping, validated.

    Example:
        >>> load_rules("fsdp")["embed"], load_rules("default")["batch"]
        ('fsdp', ('data', 'fsdp'))
    """
    if isinstance(source, Mapping):
        return check_rules(source)
    if source not in RULE_TABLES:
        raise ShardingError(f"no sharding rule table {source!r}; known tables: {sorted(RULE_TABLES)} (or pass a "
                            "mapping logical name -> mesh axes)")
    return check_rules(RULE_TABLES[source])


# ----------------------------------------------------------------------------- specs


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules, *,
                 name: str = "array", strict: bool = True) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with these logical axes.

    ``None`` in ``axes`` means a replicated dimension. With ``strict=False`` a dimension
    that its mesh axes do not divide is replicated instead of being an error.

    Raises:
        ShardingError: naming ``name`` and the axis, for a logical axis with no rule, a
            rule naming an axis the mesh lacks, or a dimension its mesh axes do not divide.

    Example:
        >>> mesh = make_mesh({"data": -1})
        >>> logical_spec(("batch", "seq"), (8 * jax.device_count(), 4), mesh, {"batch": "data", "seq": None})
        P('data', None)
    """
    if len(axes) != len(shape):
        raise ShardingError(f"{name}: logical axes {tuple(axes)} do not match its shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for dim, (logical, size) in enumerate(zip(axes, shape)):
        if logical is None:
            entries.append(None)
            continue
        if logical not in rules:
            raise ShardingError(f"{name}: logical axis {logical!r} (dimension {dim}) has no sharding rule; "
                                f"the rules cover {sorted(rules)} (add '{logical}: null' to replicate it)")
        mesh_axes = _as_axes(rules[logical])
        missing = [a for a in mesh_axes if a not in mesh.shape]
        if missing:
            raise ShardingError(f"{name}: the rule {logical!r} -> {rules[logical]!r} names mesh axis "
                                f"{missing[0]!r}, which the mesh {dict(mesh.shape)} does not have")
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % ways:
            if strict:
                raise ShardingError(
                    f"{name}: dimension {dim} (logical axis {logical!r}, size {size}) does not divide "
                    f"over mesh axes {mesh_axes} ({ways} devices; mesh {dict(mesh.shape)}); change the "
                    f"mesh, the rule for {logical!r}, or the model size")
            mesh_axes = ()
        used.update(mesh_axes)
        entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*entries)


class _SpecMaker:
    """``spec_for(axes, shape, what, strict=True)`` for one named array, handed to weight wrappers."""

    def __init__(self, mesh: Mesh, rules: Rules, name: str):
        self.mesh, self.rules, self.name = mesh, rules, name

    def __call__(self, axes, shape, what: str, strict: bool = True) -> PartitionSpec:
        return logical_spec(axes, shape, self.mesh, self.rules, name=f"{self.name} ({what})", strict=strict)

    def flat_spec(self, mesh_axes: tuple[str, ...], size: int):
        """The spec entry splitting a flat dimension of ``size`` over ``mesh_axes``, or ``None`` if they do not divide it."""
        ways = math.prod(self.mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or size % ways:
            return None
        return mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def logical_specs(tree_: Any, axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """``PartitionSpec`` for every array of ``tree_`` (arrays or ``jax.ShapeDtypeStruct``).

    ``axes`` gives logical axes by path (a tree of tuples, e.g. ``model.param_axes()``); it
    may hold more paths than ``tree_`` (e.g. the whole model for a frozen subset). A weight
    wrapper (a :class:`~jpeft.quant.QuantizedArray`) takes its logical weight's axes and
    comes back as a wrapper of specs (:meth:`jpeft.ops.WeightWrapper.partition_specs`).

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh({"fsdp": -1})
        >>> specs = logical_specs({"w": jnp.zeros((8 * jax.device_count(), 3))}, {"w": ("embed", None)},
        ...                       mesh, {"embed": "fsdp"})
        >>> specs["w"]
        P('fsdp', None)
    """
    rules = check_rules(rules)
    flat_axes = flatten_axes(axes)

    def spec(path: str, leaf):
        if path not in flat_axes:
            raise ShardingError(f"{path}: no logical axes for this array; the axes tree must cover "
                                f"every path (e.g. model.param_axes() for the model's parameters)")
        if ops.is_wrapper(leaf):
            try:
                return leaf.partition_specs(flat_axes[path], _SpecMaker(mesh, rules, path))
            except (NotImplementedError, ValueError) as err:
                if isinstance(err, ShardingError):
                    raise
                raise ShardingError(f"{path}: {err}") from None
        return logical_spec(flat_axes[path], leaf.shape, mesh, rules, name=path)

    return jax.tree_util.tree_map_with_path(lambda kp, leaf: spec(tree.path_to_str(kp), leaf), tree_,
                                            is_leaf=ops.is_wrapper)


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shardings_for(tree_: Any, axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` for every array of ``tree_``: :func:`logical_specs` on ``mesh``.

    Use it on ``jax.eval_shape`` output, then create the arrays in place:
    ``jax.jit(init, out_shardings=shardings_for(abstract, axes, mesh, rules))``.
    """
    return _named(mesh, logical_specs(tree_, axes, mesh, rules))


def adapter_axes(method: Method, adapter: Any, param_axes: Any) -> Any:
    """The adapter's logical axes: ``method.logical_axes``, else :func:`~jpeft.layout.inherited_axes`."""
    derive = method.logical_axes or inherited_axes
    return derive(adapter, param_axes)


def adapter_shardings(method: Method, adapter: Any, param_axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for an adapter (or its ``jax.eval_shape``): factors inherit their weight's axes."""
    return shardings_for(adapter, adapter_axes(method, adapter, param_axes), mesh, rules)


def optimizer_shardings(optimizer: optax.GradientTransformation, opt_state: Any, adapter_shardings: Any,
                        mesh: Mesh) -> Any:
    """Shardings for an optax state (e.g. ``jax.eval_shape(optimizer.init, adapter)``).

    Every copy of the adapter's tree inside the state (Adam's ``mu``/``nu``,
    accumulators) takes the adapter's shardings, found by ``optax.tree_map_params``;
    anything else (``count``, factored statistics) is replicated.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> mesh = make_mesh({"fsdp": -1})
        >>> adapter = {"w": jnp.zeros((jax.device_count(), 2))}
        >>> adapter_sh = {"w": NamedSharding(mesh, PartitionSpec("fsdp"))}
        >>> opt = optax.adam(0.1)
        >>> state_sh = optimizer_shardings(opt, jax.eval_shape(opt.init, adapter), adapter_sh, mesh)
        >>> state_sh[0].mu["w"].spec, state_sh[0].count.spec
        (P('fsdp',), P())
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_state, adapter_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


# ----------------------------------------------------------------------------- measuring


def bytes_per_device(tree_: Any) -> dict[jax.Device, int]:
    """Bytes of ``tree_``'s arrays that each local device holds (from ``addressable_shards``).

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh({"fsdp": -1})
        >>> x = jax.device_put(jnp.zeros((jax.device_count(), 4)), NamedSharding(mesh, PartitionSpec("fsdp")))
        >>> set(bytes_per_device({"x": x}).values())
        {16}
    """
    counts: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree_):
        for shard in leaf.addressable_shards:
            counts[shard.device] = counts.get(shard.device, 0) + shard.data.nbytes
    return counts


# ----------------------------------------------------------------------------- activations

_ROWS: contextvars.ContextVar = contextvars.ContextVar("jpeft_activation_rows", default=None)


@contextlib.contextmanager
def activation_rows(batch_sharding: NamedSharding | None):
    """Within the block, :func:`constrain_rows` splits activations' rows as ``batch_sharding`` splits a batch's.

    A step traced inside it (``with activation_rows(tokens_sharding): jax.grad(loss)(...)``)
    keeps every layer's activations split by rows over the mesh axes of the batch's first
    dimension. Without it XLA's sharding propagation may follow the weights instead: under
    FSDP it splits activations along the model dimension (as it splits the weights) and
    gathers the whole batch on every chip. ``None`` (or a sharding whose first dimension is
    not split) turns the constraint off. Values are unchanged either way.
    """
    token = _ROWS.set(batch_sharding)
    try:
        yield
    finally:
        _ROWS.reset(token)


def constrain_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """``x`` with dimension ``axis`` split like the batch rows of :func:`activation_rows` (else unchanged).

    Other dimensions are left to the compiler (``PartitionSpec.UNCONSTRAINED``); a dimension
    the rows' mesh axes do not divide is left alone.

    Example:
        >>> constrain_rows(jax.numpy.ones((2, 3))).shape  # no activation_rows around: unchanged
        (2, 3)
    """
    batch = _ROWS.get()
    if batch is None or not isinstance(batch, NamedSharding) or not len(batch.spec) or batch.spec[0] is None:
        return x
    rows = batch.spec[0]
    size = math.prod(batch.mesh.shape[a] for a in ((rows,) if isinstance(rows, str) else rows))
    axis = axis % x.ndim
    if size == 1 or x.shape[axis] % size:
        return x
    spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
    spec[axis] = rows
    return jax.lax.with_sharding_constraint(x, NamedSharding(batch.mesh, PartitionSpec(*spec)))

