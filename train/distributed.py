"""Processes and devices of a run: JAX's multi-process runtime and the device mesh.

A multi-process run is started once per process with the same config plus the
process's id, either as config keys::

    python -m train --config c.yaml distributed.coordinator=10.0.0.1:1234 \\
        distributed.num_processes=2 distributed.process_id=0

or through the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``). On CPU the processes' collectives go through gloo. Every
process computes every global batch and feeds only its own rows; process 0
alone prints and writes metrics and plots (:func:`is_main`); all of them write
their shards of the checkpoints and of the final ``adapter/`` folder.
"""

from __future__ import annotations

import os

import jax

from jpeft import sharding
from train.sections import DistributedConfig, MeshConfig
from train.errors import ConfigError

_ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


def settings(cfg: DistributedConfig) -> dict | None:
    """``{coordinator, num_processes, process_id}`` from the config, then the environment; None: one process."""
    values = {}
    for key, env in _ENV.items():
        value = getattr(cfg, key)
        if value is None and os.environ.get(env):
            text = os.environ[env]
            try:
                value = text if key == "coordinator" else int(text)
            except ValueError:
                raise ConfigError(f"environment variable {env}={text!r} must be an integer") from None
        values[key] = value
    if values["coordinator"] is None and values["num_processes"] in (None, 1):
        return None
    missing = [f"distributed.{k} (or {_ENV[k]})" for k, v in values.items() if v is None]
    if missing:
        raise ConfigError(f"a multi-process run needs {', '.join(missing)} as well")
    if not values["process_id"] < values["num_processes"]:
        raise ConfigError(f"distributed.process_id={values['process_id']} must be < distributed.num_processes="
                          f"{values['num_processes']}")
    return values


_initialized = False


def initialize(cfg: DistributedConfig) -> bool:
    """Join the multi-process runtime if the config or environment asks for one; True if it did.

    Must run before anything touches a JAX device. Safe to call twice.
    """
    global _initialized
    values = settings(cfg)
    if values is None or _initialized:
        return _initialized
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by the CPU backend
    jax.distributed.initialize(coordinator_address=values["coordinator"], num_processes=values["num_processes"],
                               process_id=values["process_id"])
    _initialized = True
    return True


def check_run(cfg) -> None:
    """What a multi-process run needs from the rest of the config (call after :func:`initialize`)."""
    if jax.process_count() == 1:
        return
    if cfg.run_dir is None:
        raise ConfigError("a multi-process run needs the same run_dir=<shared folder> in every process")
    if cfg.eval.test_articles:
        raise ConfigError("ROUGE evaluation runs in single-process runs only; set eval.test_articles=0")


def is_main() -> bool:
    """Whether this process prints and writes run outputs (process 0)."""
    return jax.process_index() == 0


def build_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    """The mesh ``cfg`` describes over every process's devices, or a ConfigError that says why not."""
    shape = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    devices = jax.devices()
    if all(size == 1 for size in shape.values()) and jax.process_count() == 1:
        return sharding.make_mesh(shape, devices=devices[:1])  # the default: one device
    try:
        return sharding.make_mesh(shape, devices=devices)
    except sharding.ShardingError as e:
        raise ConfigError(f"bad 'mesh' {shape} for {len(devices)} devices: {e}") from None
