"""Arrays kept in host memory between train steps (memory kinds): the JAX form of paged optimizers.

Adam's two moments are twice the trainable weights in float32: for full fine-tuning of an
8B model, 64 GB that the step touches once, in the update. With :func:`to_host` the
optimizer state's shardings name the ``pinned_host`` memory kind, and the jitted step runs
the update where the state is (:func:`update_in_host_memory`, ``compute_on("device_host")``):
the gradients and weights are copied to host memory, the state never enters device memory,
and only the new weights come back. Whether that lowers the step's peak device memory is
the compiler's to say (``python -m train.plan`` shows it): the copies are temporaries too.

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
from jax.sharding import Sharding

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


def to_host(shardings: Any) -> Any:
    """``shardings`` moved to the ``pinned_host`` memory kind (same devices and layout).

    Raises:
        HostMemoryError: when a device has no host memory kind (the message names the device).
    """
    for sharding in _shardings(shardings):
        device = next(iter(sharding.device_set))
        if not host_memory_available(device):
            raise HostMemoryError(
                f"{device.platform} device {device} has no {HOST!r} memory kind, so the optimizer state cannot "
                f"live in host memory here; run without offloading (offload_optimizer: false) or on TPU/GPU")
    return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings, is_leaf=lambda x: isinstance(x, Sharding))


def on_host(shardings: Any) -> bool:
    """Whether any of ``shardings`` names host memory."""
    return any(s.memory_kind == HOST for s in _shardings(shardings))


def _with_kind(shardings: Any, kind: str) -> Any:
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings, is_leaf=lambda x: isinstance(x, Sharding))


def update_in_host_memory(optimizer, grads: Any, opt_state: Any, params: Any, state_shardings: Any,
                          param_shardings: Any) -> tuple[Any, Any]:
    """Inside a jitted step: ``(new params on the device, new optimizer state in host memory)``.

    The update runs on the host (``compute_on("device_host")``) where the state lives: the
    gradients and parameters are copied to host memory, the state never enters device memory,
    and only the new parameters come back.
    """
    from jax.experimental.compute_on import compute_on

    host_params = _with_kind(param_shardings, HOST)
    grads, params = jax.device_put(grads, host_params), jax.device_put(params, host_params)
    opt_state = jax.device_put(opt_state, _with_kind(state_shardings, HOST))

    @compute_on("device_host")
    @jax.jit
    def update(grads, opt_state, params):
        import optax

        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new_params, new_state = update(grads, opt_state, params)
    return jax.device_put(new_params, _with_kind(param_shardings, DEVICE)), new_state


def keep_in_host_memory(keep: jax.Array, new: Any, old: Any, shardings: Any) -> Any:
    """Inside a jitted step: ``new`` where ``keep`` else ``old``, both in host memory, computed there."""
    from jax.experimental.compute_on import compute_on

    host = _with_kind(shardings, HOST)
    keep = jax.device_put(keep, jax.sharding.NamedSharding(next(iter(_shardings(shardings))).mesh,
                                                            jax.sharding.PartitionSpec(), memory_kind=HOST))
    new, old = jax.device_put(new, host), jax.device_put(old, host)
    choose = jax.jit(lambda k, n, o: jax.tree.map(lambda a, b: jax.numpy.where(k, a, b), n, o))
    return compute_on("device_host")(choose)(keep, new, old)
