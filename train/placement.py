"""Where a run's arrays live: rule tables from YAML, batches fed per process, the sharded train step.

The library (:mod:`jpeft.sharding`) turns logical axes into shardings; this module is
the program's side of it: a ``sharding.rules`` setting may name a library table
(``default``, ``fsdp``) or a YAML file with a ``rules:`` mapping, every process feeds
only its rows of a global batch, and the train step is jitted with shardings per
argument name.

Example:
    >>> rules_from_setting("fsdp")["embed"]
    'fsdp'
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft import sharding, tree
from jpeft.sharding import Rules


def rules_from_setting(source: str | os.PathLike | Mapping[str, Any] = "default") -> dict:
    """The rule table a ``sharding.rules`` setting names: a library table (``default``,
    ``fsdp``), a YAML file's ``rules:`` mapping, or a mapping.

    Raises:
        jpeft.sharding.ShardingError: for a name that is neither a table nor a file, or a bad table.
    """
    if isinstance(source, Mapping) or str(source) in sharding.RULE_TABLES:
        return sharding.load_rules(source if isinstance(source, Mapping) else str(source))
    path = Path(source)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise sharding.ShardingError(f"no sharding rule table or YAML file {str(source)!r}; known tables: "
                                     f"{sorted(sharding.RULE_TABLES)}, or give the path of a .yaml file with a "
                                     "'rules:' mapping")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise sharding.ShardingError(f"{str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or "rules" not in data:
        raise sharding.ShardingError(f"{str(path)!r} has no 'rules:' mapping (logical name -> mesh axes)")
    return sharding.check_rules(data["rules"])


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules, axes: Sequence[str] = ("batch", "seq")) -> Any:
    """Shardings for a batch tree: each leaf's dimensions take ``axes`` in order (the rest replicated).

    Example:
        >>> mesh = sharding.make_mesh({"data": -1})
        >>> batch = {"tokens_BxT": jax.ShapeDtypeStruct((2 * jax.device_count(), 16), "int32")}
        >>> batch_shardings(batch, mesh, {"batch": "data", "seq": None})["tokens_BxT"].spec
        P('data', None)
    """
    rules = sharding.check_rules(rules)

    def spec(keypath, leaf):
        ndim = len(leaf.shape)
        names = (*tuple(axes)[:ndim], *(None,) * (ndim - len(axes)))
        name = "batch/" + tree.path_to_str(keypath) if keypath else "batch"
        return NamedSharding(mesh, sharding.logical_spec(names, leaf.shape, mesh, rules, name=name))

    return jax.tree_util.tree_map_with_path(spec, batch)


# ----------------------------------------------------------------------------- feeding and stepping


def local_batch_slice(batch_sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
    """The rows of a global batch that this process feeds (all of them if rows are replicated).

    Example:
        >>> mesh = sharding.make_mesh({"data": -1})
        >>> n = 2 * jax.device_count()
        >>> local_batch_slice(NamedSharding(mesh, PartitionSpec("data")), (n, 16)) == slice(0, n)
        True
    """
    index_map = batch_sharding.addressable_devices_indices_map(tuple(global_shape))
    rows = sorted({index[0].indices(global_shape[0])[:2] for index in index_map.values()})
    start, stop = rows[0]
    for row_start, row_stop in rows[1:]:
        if row_start > stop:
            raise sharding.ShardingError(f"this process's rows of the batch {rows} are not one block; order the "
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
        >>> mesh = sharding.make_mesh({"fsdp": -1})
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
        >>> mesh = sharding.make_mesh({"fsdp": -1})
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
        >>> mesh = sharding.make_mesh({"data": -1})
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
        raise sharding.ShardingError(f"sharded_step needs plain positional parameters; {odd} are *args, **kwargs "
                            f"or keyword-only (bind them with functools.partial)")
    names = list(signature.parameters)
    for label, given in (("static_argnames", static_argnames), ("donate_argnames", donate_argnames),
                         ("in_shardings", in_shardings)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise sharding.ShardingError(f"{label} names {unknown}, which are not arguments of the step {names}")
    dynamic = [n for n in names if n not in static_argnames]
    missing = [n for n in dynamic if n not in in_shardings]
    if missing:
        raise sharding.ShardingError(f"in_shardings has no sharding for the step's argument(s) {missing}")
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
