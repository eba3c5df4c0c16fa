"""Arrays kept in host memory between train steps (memory kinds): the JAX form of paged optimizers.

Adam's two moments are twice the trainable weights in float32: for full fine-tuning of an
8B model, 64 GB that the step touches once, in the update. With :func:`to_host` the
optimizer state's shardings name the ``pinned_host`` memory kind, and the jitted step
streams it through device memory one parameter leaf at a time (:func:`update_streamed`):
a leaf's state comes in, is updated on the device with that leaf's gradient and weight,
and goes back before the next leaf's comes in. HBM holds one leaf's state at a time. (An
update run in host memory, ``compute_on("device_host")``, copied every gradient and weight
to the host and back instead, and XLA's TPU compiler kept more in HBM for it than the
state it kept out: 22.45 GiB per chip against 18.71 GiB without offloading, for 8B full
fine-tuning on v5e-8.)

Backends with memory kinds (TPU, GPU, and the CPU client of recent jaxlibs) list
``pinned_host`` among a device's memories; elsewhere :func:`to_host` raises a
:class:`HostMemoryError` that says so.

Example:
    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec, Mesh
    >>> mesh = Mesh(jax.devices()[:1], ("data",))
    >>> s = to_host({"mu": NamedSharding(mesh, PartitionSpec())})["mu"]
    >>> s.memory_kind, on_host({"mu": s})
    ('pinned_host', True)
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Sharding
from optax import tree_utils

from jpeft import optim, stack, tree

HOST = "pinned_host"
DEVICE = "device"


class HostMemoryError(ValueError):
    """The devices have no host memory kind to keep arrays in."""


def host_memory_available(device: Any) -> bool:
    """Whether ``device`` has a ``pinned_host`` memory (TPU and GPU always; otherwise as the device lists).

    A compile-only TPU device (from ``jax.experimental.topologies``) of another host lists no
    memories, so TPU and GPU devices are taken at their runtime's word.
    """
    if getattr(device, "platform", None) in ("tpu", "gpu", "cuda", "rocm"):
        return True
    try:
        return HOST in {memory.kind for memory in device.addressable_memories()}
    except Exception:  # a device that cannot list its memories has no memory kinds to offer
        return False


def _shardings(tree: Any) -> list[Sharding]:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Sharding))


def to_host(shardings: Any, what: str = "the optimizer state", setting: str = "offload_optimizer") -> Any:
    """``shardings`` moved to the ``pinned_host`` memory kind (same devices and layout).

    ``what`` and ``setting`` name the arrays and the setting that asked for it, for the error.

    Raises:
        HostMemoryError: when a device has no host memory kind (the message names the device).
    """
    for sharding in _shardings(shardings):
        device = next(iter(sharding.device_set))
        if not host_memory_available(device):
            raise HostMemoryError(
                f"{device.platform} device {device} has no {HOST!r} memory kind, so {what} cannot "
                f"live in host memory here; run without offloading ({setting}: false) or on TPU/GPU")
    return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings, is_leaf=lambda x: isinstance(x, Sharding))


def on_host(shardings: Any) -> bool:
    """Whether any of ``shardings`` names host memory."""
    return any(s.memory_kind == HOST for s in _shardings(shardings))


def _with_kind(shardings: Any, kind: str) -> Any:
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings, is_leaf=lambda x: isinstance(x, Sharding))


def update_streamed(optimizer, grads: Any, opt_state: Any, params: Any, state_shardings: Any,
                    keep: jax.Array, leafwise: bool = True) -> tuple[Any, Any]:
    """Inside a jitted step: ``(new params, new optimizer state in host memory)``, the state streamed through HBM.

    The update runs one parameter leaf at a time: that leaf's state (Adam's two moments)
    is copied from host memory to the device, updated there with its gradient and
    parameter, and copied back (``jax.device_put`` to the ``device`` and ``pinned_host``
    memory kinds); the next leaf's state is copied in only after that (an
    ``optimization_barrier`` orders them). HBM holds one leaf's state at a time, never all
    of it, and no second copy of the weights or gradients.

    The optimizer must update each leaf from that leaf alone (optax's elementwise
    transformations, AdamW) but for global-norm clipping, which must be
    :func:`jpeft.optim.clip_by_global_norm`: it is given the whole gradient's norm. State
    that is not per parameter (a step count) is updated alike by every leaf's call; the
    last one's is kept. ``keep`` (decided before the update, e.g. from the loss and
    gradient norm) chooses leaf by leaf between the new and the old parameters and state:
    where it is False both come back unchanged. ``leafwise=False`` (an optimizer whose update
    mixes leaves, such as a method's own transformation) updates every leaf in one call: the
    whole state comes into HBM for it.
    """
    is_none = lambda x: x is None
    leaves, treedef = jax.tree.flatten(params)
    index = jax.tree.unflatten(treedef, range(len(leaves)))
    state_kinds = jax.tree.leaves(state_shardings, is_leaf=lambda x: isinstance(x, Sharding))
    norm = optim.global_norm(grads)
    choose = lambda new, old: jax.numpy.where(keep, new, old)
    if not leafwise:
        on_device = jax.device_put(opt_state, _with_kind(state_shardings, DEVICE))
        updates, new_state = optimizer.update(grads, on_device, params)
        new_params = jax.tree.map(choose, optax.apply_updates(params, updates), params)
        return new_params, jax.device_put(jax.tree.map(choose, new_state, on_device),
                                          _with_kind(state_shardings, HOST))
    new_leaves, new_states, previous = [], [], None
    for i in range(len(leaves)):
        only = lambda x, j, i=i: x if j == i else None
        sub_state = tree_utils.tree_map_params(optimizer, only, opt_state, index)
        flat_state, state_def = jax.tree.flatten(sub_state, is_leaf=is_none)
        on_device = [x if x is None else jax.device_put(x, s.with_memory_kind(DEVICE))
                     for x, s in zip(flat_state, state_kinds)]
        if previous is not None:  # this leaf's state is used after the last one went out
            on_device, _ = jax.lax.optimization_barrier((on_device, previous))
        sub_state = jax.tree.unflatten(state_def, on_device)
        sub_params = jax.tree.map(only, params, index)
        with optim.given_global_norm(norm):
            updates, new_sub = optimizer.update(jax.tree.map(only, grads, index), sub_state, sub_params)
        new_leaves.append(choose(jax.tree.leaves(optax.apply_updates(sub_params, updates))[0], leaves[i]))
        flat_new = jax.tree.leaves(new_sub, is_leaf=is_none)
        flat_new = [n if n is None else jax.device_put(choose(n, o), s.with_memory_kind(HOST))
                    for n, o, s in zip(flat_new, on_device, state_kinds)]
        new_states.append(flat_new)
        previous = [x for x in flat_new if x is not None]
    # Each position from the call that updated it (per-parameter leaves), else from the last call.
    merged = [next((s[k] for s in reversed(new_states) if s[k] is not None), None) for k in range(len(state_kinds))]
    return jax.tree.unflatten(treedef, new_leaves), jax.tree.unflatten(state_def, merged)


# ----------------------------------------------------------------------------- a frozen base in host memory


def to_device(tree: Any) -> Any:
    """Inside a jitted function: ``tree``'s arrays in device memory (a copy from host memory where they are there)."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device) if isinstance(x, jax.Array) else x,
                        tree)


def layer_matrices_to_host(shardings: Any, params: Any, what: str = "the frozen base",
                           setting: str = "offload_frozen") -> Any:
    """``shardings`` of ``params`` with the layers' matrices in host memory (``pinned_host``), the rest unchanged.

    A layer's matrix: a leaf under ``layers`` (stacked: three or more dimensions) or
    ``layers_{i}`` (two or more), the bulk of a model's weights (4-bit codes included).
    Embeddings, heads, norms and per-layer vectors (norm scales, 4-bit scales) stay in device
    memory: they are used whole or are small, and the TPU compiler cannot slice a single
    layer's row out of a stacked vector in host memory. Run the step under
    :func:`layers_from_host`.

    Raises:
        HostMemoryError: when a device has no host memory kind.
    """
    def place(keypath, leaf, sharding):
        path = tree.path_to_str(keypath)
        stacked = stack.in_stack(path)
        if not (stacked or stack.stacked_path(path)[1] is not None) or len(leaf.shape) < (3 if stacked else 2):
            return sharding
        return to_host(sharding, what, setting)

    return jax.tree_util.tree_map_with_path(place, params, shardings)


def layers_from_host():
    """Within the block, every layer's parameters come to device memory as the layer runs (forward and backward).

    The frozen base's layer matrices kept in host memory (:func:`layer_matrices_to_host`,
    ``train.offload_frozen``) then take one layer's weights of HBM at a time: each layer copies
    its own in (:func:`jpeft.stack.fetching_layers`, inside the layer's rematerialized region,
    so the backward pass copies them in again rather than keeping every layer's).

    Example:
        >>> import jax.numpy as jnp
        >>> with layers_from_host():
        ...     f = stack.remat_layer(lambda p, x: p["w"] * x, "layer_input")
        >>> float(jax.jit(f)({"w": jnp.float32(3.0)}, 2.0))
        6.0
    """
    return stack.fetching_layers(to_device)
