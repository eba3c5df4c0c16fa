"""One process of the multi-process CPU run that ``tests/test_multihost.py`` starts.

Run as ``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: it joins JAX's multi-process
runtime (coordinator on 127.0.0.1:PORT, gloo CPU collectives), trains a tiny LoRA Llama
on a mesh spanning every process, feeding only its own rows of each global batch,
saves and restores the adapter with :mod:`jpeft.checkpoint` (orbax) half way, and writes its losses to
``WORKDIR/losses_<PROCESS_ID>.json``. The test imports :func:`train` to compute the
single-process reference with the same code.
"""

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import jpeft
from jpeft import sharding
from jpeft.checkpoint import restore_adapter, save_adapter
from jpeft.models import llama
from train import placement

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, scan_layers=True)
METHOD = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v|down)_proj/kernel")
MESH = {"data": 1, "fsdp": 2, "tensor": 2}  # fsdp across the two processes, tensor within each
BATCH, SEQ, STEPS, RESTORE_AT = 8, 16, 4, 2


def global_batch(step: int) -> np.ndarray:
    """The whole batch of a step; every process can compute it and keeps its own rows."""
    return np.random.default_rng(step).integers(0, CONFIG.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)


def host_values(abstract, seed: int) -> dict:
    """Random float32 host arrays of these shapes (what a checkpoint loader would hand over)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), abstract)


def train(mesh_shape: dict, checkpoint_dir: pathlib.Path, devices=None) -> list[float]:
    """Sharded LoRA steps with an orbax save/restore of the adapter before step RESTORE_AT.

    Weights come from host copies (each process places only its own shards), which also
    keeps this test clear of slow CPU compiles of random initializers.
    """
    mesh, rules = sharding.make_mesh(mesh_shape, devices=devices), sharding.load_rules("default")
    axes, key, optimizer = llama.model(CONFIG).param_axes(), jax.random.key(0), optax.adam(1e-2)

    abstract_params = jax.eval_shape(llama.model(CONFIG).init, key)
    params_sh = sharding.shardings_for(abstract_params, axes, mesh, rules)
    params = placement.from_host(host_values(abstract_params, seed=0), params_sh)
    abstract_adapter = jax.eval_shape(METHOD.init, key, abstract_params)
    adapter_sh = sharding.adapter_shardings(METHOD, abstract_adapter, axes, mesh, rules)
    adapter = placement.from_host(host_values(abstract_adapter, seed=1), adapter_sh)
    opt_sh = sharding.optimizer_shardings(optimizer, jax.eval_shape(optimizer.init, abstract_adapter), adapter_sh,
                                          mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(adapter)
    batch_sh = placement.batch_shardings({"tokens_BxT": jax.ShapeDtypeStruct((BATCH, SEQ + 1), jnp.int32)},
                                        mesh, rules)
    my_rows = placement.local_batch_slice(batch_sh["tokens_BxT"], (BATCH, SEQ + 1))

    def loss_fn(adapter, frozen, tokens_BxT):
        logits_BxTxV, _ = llama.forward(METHOD.apply(frozen, adapter), CONFIG, tokens_BxT[:, :-1])
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV)
        return -jnp.mean(jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1))

    def train_step(frozen, adapter, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, frozen, batch["tokens_BxT"])
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    step = placement.sharded_step(
        train_step, in_shardings=dict(frozen=params_sh, adapter=adapter_sh, opt_state=opt_sh, batch=batch_sh),
        out_shardings=(adapter_sh, opt_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnames=("adapter", "opt_state"))

    losses = []
    for i in range(STEPS):
        if i == RESTORE_AT:
            adapter = save_and_restore(adapter, adapter_sh, checkpoint_dir / "adapter")
        local_batch = {"tokens_BxT": global_batch(i)[my_rows]}
        adapter, opt_state, loss = step(params, adapter, opt_state, placement.shard_batch(local_batch, batch_sh))
        losses.append(float(loss))
    return losses


def save_and_restore(adapter, adapter_sh, path: pathlib.Path):
    """Every process writes its shards (jpeft's atomic adapter save); the restore puts each shard back."""
    save_adapter(path.absolute(), adapter, metadata={"method": "lora"})
    save_adapter(path.absolute(), adapter, metadata={"method": "lora"})  # replacing a saved adapter works too
    assert sorted(os.listdir(path.parent)) == [path.name]  # nothing beside the adapter folder
    assert sorted(os.listdir(path)) == ["2"]  # the second save replaced the first, no partial save left
    restored, meta = restore_adapter(path.absolute(), like=placement.with_shardings(adapter, adapter_sh),
                                     method="lora")
    for old, new in zip(jax.tree.leaves(adapter), jax.tree.leaves(restored)):
        assert new.sharding == old.sharding, (new.sharding, old.sharding)
        for a, b in zip(old.addressable_shards, new.addressable_shards):
            np.testing.assert_array_equal(a.data, b.data)
    return restored


def main(process_id: int, num_processes: int, port: int, workdir: pathlib.Path) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=600)
    assert jax.process_count() == num_processes and jax.local_device_count() * num_processes == jax.device_count()
    losses = train(MESH, workdir / "checkpoints")
    (workdir / f"losses_{process_id}.json").write_text(json.dumps(losses))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
