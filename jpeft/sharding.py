"""Sharding on a device mesh: logical-axis rules -> ``NamedSharding``; adapters inherit.

Four pieces of data decide where every array lives:

* the **mesh**: named device axes, ``{"data": 1, "fsdp": -1, "tensor": 2}`` (-1 = the rest);
* the **logical axes** of every parameter, from the model: ``("embed", "q_heads")`` for a
  query kernel (:func:`jpeft.models.llama.param_axes`);
* the **rules**: logical name -> a mesh axis, a list of mesh axes (the dimension is split
  over their product) or ``None`` (replicated), kept as data in ``configs/sharding/*.yaml``;
* the **method**, which derives its adapter's axes from the parameters' (LoRA: ``A`` takes
  the weight's input axis, ``B`` its output axis, the rank axis ``"lora_rank"`` is replicated).

Shardings are computed from shapes alone (``jax.eval_shape``), then arrays are created
where they belong (``jax.jit(init, out_shardings=...)``): nothing is allocated whole.
Bad input is a :class:`ShardingError` raised before anything is compiled, naming the
parameter and the axis: a mesh that does not fit the devices, a rule that names no mesh
axis, a dimension that its mesh axes do not divide.

A mesh axis shards at most one dimension of an array: when two dimensions' rules name
the same mesh axis, the first dimension gets it and the later one is not split on it.

Example (the pattern a trainer follows; it runs on any number of devices):
    >>> import jax, jpeft, optax
    >>> from jpeft import sharding
    >>> from jpeft.models import llama
    >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                            num_layers=2, num_heads=4, num_kv_heads=2, scan_layers=True)
    >>> mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    >>> rules = sharding.load_rules("default")
    >>> axes = llama.param_axes(config)
    >>> key = jax.random.key(0)
    >>> params_sh = sharding.shardings_for(jax.eval_shape(llama.init_params, config, key), axes, mesh, rules)
    >>> params = jax.jit(llama.init_params, static_argnums=0, out_shardings=params_sh)(config, key)
    >>> method = jpeft.lora(rank=4, targets=r".*/q_proj/kernel")
    >>> adapter_sh = sharding.adapter_shardings(method, jax.eval_shape(method.init, key, params),
    ...                                         axes, mesh, rules)
    >>> adapter = jax.jit(method.init, out_shardings=adapter_sh)(key, params)
    >>> adapter["layers"]["self_attn"]["q_proj"]["kernel"]["a"].sharding.spec
    P(None, 'fsdp', None)
    >>> optimizer = optax.adam(1e-3)
    >>> opt_sh = sharding.optimizer_shardings(jax.eval_shape(optimizer.init, adapter), adapter,
    ...                                       adapter_sh, mesh)
    >>> opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(adapter)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jpeft import ops, tree
from jpeft.methods.base import Method, flatten_axes, inherited_axes
from jpeft.quant.array import QuantizedArray

RULES_DIR = Path(__file__).resolve().parents[1] / "configs" / "sharding"
Rules = Mapping[str, "str | tuple[str, ...] | None"]


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


def load_rules(source: str | os.PathLike | Mapping[str, Any] = "default") -> dict:
    """Logical-axis rules from a YAML file (its ``rules:`` mapping), a table name, or a mapping.

    A bare name such as ``"default"`` (FSDP x tensor) or ``"fsdp"`` (pure FSDP) reads
    ``configs/sharding/<name>.yaml``.

    Example:
        >>> load_rules("fsdp")["embed"], load_rules("default")["batch"]
        ('fsdp', ('data', 'fsdp'))
    """
    if isinstance(source, Mapping):
        return check_rules(source)
    path = Path(source)
    if path.suffix not in (".yaml", ".yml") and os.sep not in str(source):
        path = RULES_DIR / f"{source}.yaml"
    if not path.is_file():
        tables = sorted(p.stem for p in RULES_DIR.glob("*.yaml"))
        raise ShardingError(f"no sharding rules file {str(path)!r}; known tables: {tables}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "rules" not in data:
        raise ShardingError(f"{str(path)!r} has no 'rules:' mapping (logical name -> mesh axes)")
    return check_rules(data["rules"])


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


def _quantized_specs(q: QuantizedArray, axes: tuple, mesh: Mesh, rules: Rules, name: str) -> QuantizedArray:
    """Specs for a quantized weight's arrays, derived from the logical weight's axes.

    * codes (packed along the blocked axis) take the weight's axes; the packed
      dimension must still divide;
    * per-block scales take the same axes where their (blocked) dimensions divide,
      else that dimension is replicated;
    * double-quantized scales are flat per matrix (``(*lead, padded blocks)``): the flat
      dimension is split over every mesh axis that splits the codes' matrix, when it
      divides (so they shrink with the mesh like the codes); their per-256 scales and
      means are tiny and replicated. Leading (stacked-layer) axes follow the weight.
    """
    if len(axes) != q.ndim:
        raise ShardingError(f"{name}: logical axes {axes} do not match its shape {q.shape}")

    def spec(array_axes, array, what: str, strict: bool = True) -> PartitionSpec:
        return logical_spec(array_axes, array.shape, mesh, rules, name=f"{name} ({what})", strict=strict)

    codes = spec(axes, q.codes, f"codes, packed two per byte along axis {q.axis}" if q.fmt.packed else "codes")
    if not q.double_quant:
        return dataclasses.replace(q, codes=codes, scales=spec(axes, q.scales, "per-block scales", strict=False))
    lead = tuple(codes)[:-2]
    matrix_axes = tuple(a for entry in tuple(codes)[-2:] for a in _as_axes(entry))
    flat_ways = math.prod(mesh.shape[a] for a in matrix_axes)
    flat = None if not matrix_axes or q.scales.shape[-1] % flat_ways else (
        matrix_axes[0] if len(matrix_axes) == 1 else matrix_axes)
    return dataclasses.replace(q, codes=codes, scales=PartitionSpec(*lead, flat),
                               scales_scale=PartitionSpec(*lead, None), scales_mean=PartitionSpec(*lead))


def logical_specs(tree_: Any, axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """``PartitionSpec`` for every array of ``tree_`` (arrays or ``jax.ShapeDtypeStruct``).

    ``axes`` gives logical axes by path (a tree of tuples, e.g. ``llama.param_axes``); it
    may hold more paths than ``tree_`` (e.g. the whole model for a frozen subset). A
    :class:`~jpeft.quant.QuantizedArray` leaf takes its logical weight's axes and comes
    back as a ``QuantizedArray`` of specs (see :func:`_quantized_specs`).

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
                                f"every path (e.g. llama.param_axes(config) for the model's parameters)")
        if isinstance(leaf, QuantizedArray):
            return _quantized_specs(leaf, flat_axes[path], mesh, rules, path)
        if ops.is_wrapper(leaf):
            raise ShardingError(f"{path}: cannot shard a {type(leaf).__name__}; shard the frozen parameters "
                                f"and the adapter separately, before method.apply")
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
    """The adapter's logical axes: ``method.logical_axes``, else :func:`~jpeft.methods.base.inherited_axes`."""
    derive = method.logical_axes or inherited_axes
    return derive(adapter, param_axes)


def adapter_shardings(method: Method, adapter: Any, param_axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for an adapter (or its ``jax.eval_shape``): factors inherit their weight's axes."""
    return shardings_for(adapter, adapter_axes(method, adapter, param_axes), mesh, rules)


def optimizer_shardings(opt_state: Any, adapter: Any, adapter_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state (e.g. ``jax.eval_shape(optimizer.init, adapter)``).

    A state leaf whose path ends with an adapter leaf's path and has its shape (Adam's
    ``mu``/``nu``, accumulators) gets that leaf's sharding; anything else (``count``,
    factored statistics) is replicated.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> mesh = make_mesh({"fsdp": -1})
        >>> adapter = {"w": jnp.zeros((jax.device_count(), 2))}
        >>> adapter_sh = {"w": NamedSharding(mesh, PartitionSpec("fsdp"))}
        >>> state_sh = optimizer_shardings(jax.eval_shape(optax.adam(0.1).init, adapter), adapter, adapter_sh, mesh)
        >>> state_sh[0].mu["w"].spec, state_sh[0].count.spec
        (P('fsdp',), P())
    """
    leaves = tree.flatten(adapter)
    shardings = tree.flatten(adapter_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(keypath, leaf):
        parts = tree.path_to_str(keypath).split("/")
        for start in range(len(parts)):  # longest adapter path that the state path ends with
            suffix = "/".join(parts[start:])
            if suffix in leaves and np.shape(leaves[suffix]) == np.shape(leaf):
                return shardings[suffix]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules, axes: Sequence[str] = ("batch", "seq")) -> Any:
    """Shardings for a batch tree: each leaf's dimensions take ``axes`` in order (the rest replicated).

    Example:
        >>> mesh = make_mesh({"data": -1})
        >>> batch = {"tokens_BxT": jax.ShapeDtypeStruct((2 * jax.device_count(), 16), "int32")}
        >>> batch_shardings(batch, mesh, {"batch": "data", "seq": None})["tokens_BxT"].spec
        P('data', None)
    """
    rules = check_rules(rules)

    def sharding(keypath, leaf):
        ndim = len(leaf.shape)
        names = (*tuple(axes)[:ndim], *(None,) * (ndim - len(axes)))
        name = "batch/" + tree.path_to_str(keypath) if keypath else "batch"
        return NamedSharding(mesh, logical_spec(names, leaf.shape, mesh, rules, name=name))

    return jax.tree_util.tree_map_with_path(sharding, batch)


# ----------------------------------------------------------------------------- feeding and stepping


def local_batch_slice(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
    """The rows of a global batch that this process feeds (all of them if rows are replicated).

    Example:
        >>> mesh = make_mesh({"data": -1})
        >>> n = 2 * jax.device_count()
        >>> local_batch_slice(NamedSharding(mesh, PartitionSpec("data")), (n, 16)) == slice(0, n)
        True
    """
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    rows = sorted({index[0].indices(global_shape[0])[:2] for index in index_map.values()})
    start, stop = rows[0]
    for row_start, row_stop in rows[1:]:
        if row_start > stop:
            raise ShardingError(f"this process's rows of the batch {rows} are not one block; order the "
                                f"mesh so that each process holds a contiguous block of the batch axis")
        stop = max(stop, row_stop)
    return slice(start, stop)


def shard_batch(local_batch: Any, shardings: Any) -> Any:
    """Global arrays from each process's slice of the batch (``jax.make_array_from_process_local_data``).

    With one process, the local batch is the global batch. Host arrays go straight to
    the devices that hold them; the global batch is never gathered on one device.
    """
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
                        local_batch, shardings)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves that carry a sharding: a restore target for orbax.

    Example:
        >>> mesh = make_mesh({"fsdp": -1})
        >>> target = with_shardings({"w": jax.ShapeDtypeStruct((8, 2), "float32")},
        ...                         {"w": NamedSharding(mesh, PartitionSpec())})
        >>> target["w"].sharding.spec
        P()
    """
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def from_host(host_tree: Any, shardings: Any) -> Any:
    """Global arrays from host (numpy) copies: each process puts only the shards its devices hold.

    For weights loaded on every host (e.g. from a checkpoint file): no device ever holds
    more than its shards, and nothing is compiled.

    Example:
        >>> mesh = make_mesh({"fsdp": -1})
        >>> x = from_host(np.ones((jax.device_count(), 2)), NamedSharding(mesh, PartitionSpec("fsdp")))
        >>> x.sharding.spec, x.addressable_shards[0].data.shape
        (P('fsdp',), (1, 2))
    """
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: x[index]),
                        host_tree, shardings)


def sharded_step(step_fn: Callable, *, in_shardings: Mapping[str, Any], out_shardings: Any,
                 donate_argnames: Sequence[str] = (), static_argnames: Sequence[str] = ()) -> Callable:
    """``jax.jit`` of a train step with shardings given per argument name.

    Every non-static argument of ``step_fn`` needs an entry in ``in_shardings`` (a
    sharding tree, e.g. from :func:`shardings_for`); donated arguments (usually the
    adapter and the optimizer state) are reused for the outputs. The returned function
    takes arguments by position or name, and has ``.lower(...)`` like a jitted function.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh({"data": -1})
        >>> rows, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
        >>> step = sharded_step(lambda w, x_B: (w + x_B.sum(), x_B.mean()), in_shardings={"w": whole, "x_B": rows},
        ...                     out_shardings=(whole, whole), donate_argnames=("w",))
        >>> float(step(jnp.zeros(()), x_B=jnp.ones(jax.device_count()))[1])
        1.0
    """
    signature = inspect.signature(step_fn)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    odd = [p.name for p in signature.parameters.values() if p.kind not in kinds]
    if odd:
        raise ShardingError(f"sharded_step needs plain positional parameters; {odd} are *args, **kwargs "
                            f"or keyword-only (bind them with functools.partial)")
    names = list(signature.parameters)
    for label, given in (("static_argnames", static_argnames), ("donate_argnames", donate_argnames),
                         ("in_shardings", in_shardings)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ShardingError(f"{label} names {unknown}, which are not arguments of the step {names}")
    dynamic = [n for n in names if n not in static_argnames]
    missing = [n for n in dynamic if n not in in_shardings]
    if missing:
        raise ShardingError(f"in_shardings has no sharding for the step's argument(s) {missing}")
    jitted = jax.jit(step_fn, in_shardings=tuple(in_shardings[n] for n in dynamic),
                     out_shardings=out_shardings, donate_argnames=tuple(donate_argnames),
                     static_argnames=tuple(static_argnames))

    def positional(args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.args

    def step(*args, **kwargs):
        return jitted(*positional(args, kwargs))

    step.lower = lambda *args, **kwargs: jitted.lower(*positional(args, kwargs))
    step.jitted = jitted
    return step


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
