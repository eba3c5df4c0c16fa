"""Arrays kept in host memory between train steps (memory kinds): the JAX form of paged optimizers.

Adam's two moments are twice the trainable weights in float32: for full fine-tuning of an
8B model, 64 GB that the step touches once, in the update. With :func:`to_host` the
optimizer state's shardings name the ``pinned_host`` memory kind; the jitted step brings
the state to the device (:func:`to_device`), updates it, and its output shardings send it
back, so device memory holds it only while the update runs, one fusion at a time.

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


def to_device(tree: Any, shardings: Any) -> Any:
    """Inside a jitted function: ``tree``'s arrays copied from host memory to the device (same layout)."""
    device = jax.tree.map(lambda s: s.with_memory_kind(DEVICE), shardings, is_leaf=lambda x: isinstance(x, Sharding))
    return jax.device_put(tree, device)
