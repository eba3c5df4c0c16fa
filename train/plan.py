"""Does a fine-tune fit a TPU slice, and how fast will it be? The trainer's step compiled by XLA's TPU compiler.

``python -m train.plan --shape llama-3.1-8b --topology v5e-4 --batch 8 --seq 2048 [--config run.yaml]
[--mesh fsdp=-1] [--set model.quantize=nf4 ...] [--sweep]``

No TPU is needed, and no weights are read: the model is built abstractly from a published
shape (``configs/shapes/published.yaml``), the method and step options come from a run
config (``--config`` and ``--set`` overrides, as ``python -m train`` reads them), and the
step :func:`train.trainer.make_train_step` builds (the one ``python -m train`` runs) is
lowered on a mesh of abstract TPU devices (``jax.experimental.topologies``) and compiled
with ``libtpu`` (``pip install 'jpeft[tpu]'``). The compiler's memory analysis gives the
per-chip figures; its cost analysis gives the FLOPs and its own time estimate
(``optimal_seconds``), from which an MFU estimate follows, and the bytes its ops access, from
which a roofline bound follows (:func:`step_cost` says how they are read). Every figure is the
compiler's, for one chip; speed is an estimate, never a measurement.

Example (needs libtpu):
    >>> plan = plan_step(shape="llama-3.2-1b", topology="v5e-4", batch=4, seq=256)  # doctest: +SKIP
    >>> plan.fits  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.experimental import topologies

from jpeft import attention, lifecycle, offload, quant, sharding
from jpeft.models import llama
from jpeft import stack
from jpeft.quant.quantize import layer_kernels
from train import config as config_lib
from train import run, trainer
from train.data import TrainBatch
from train.tasks.headlines import answer_xent

GIB = 2**30
SHAPES_FILE = Path(__file__).resolve().parent.parent / "configs" / "shapes" / "published.yaml"


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: how libtpu names its topologies, its HBM as the compiler counts it, peak bf16 FLOP/s,
    HBM bandwidth (bytes/s)."""
    prefix: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float


# HBM: what the TPU compiler reports as available (its "exceeds available HBM" message); peak and bandwidth:
# the vendor's dense bf16 figure and HBM bandwidth per chip.
CHIPS = {
    "v5e": Chip("v5e", int(15.75 * GIB), 197e12, 819e9),
    "v6e": Chip("v6e", int(31.25 * GIB), 918e12, 1640e9),
    "v4": Chip("v4", int(30.75 * GIB), 275e12, 1228e9),
    "v5p": Chip("v5p", int(95.74 * GIB), 459e12, 2765e9),
}
# The cost forms of the step are compiled without windowed einsums (an all-gather or reduce-scatter overlapped
# with its matmul in a loop): XLA's cost analysis counts such a loop's body once and prices it -1 s.
COST_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
# Custom calls XLA's TPU cost model prices at -1 s each (seen in its optimal_seconds): a concatenation done as a
# bitcast, no arithmetic and no traffic. The planner counts them in the compiled HLO and takes them out.
UNPRICED_CALLS = ("ConcatBitcast",)
# slice name -> (libtpu topology, chips per host)
TOPOLOGIES = {
    "v5e-1": ("v5e:1x1", (1, 1, 1)), "v5e-4": ("v5e:2x2", (2, 2, 1)), "v5e-8": ("v5e:2x4", (2, 2, 1)),
    "v5e-16": ("v5e:4x4", (2, 2, 1)), "v6e-4": ("v6e:2x2", (2, 2, 1)), "v6e-8": ("v6e:2x4", (2, 2, 1)),
    "v4-8": ("v4:2x2x1", (2, 2, 1)), "v4-16": ("v4:2x2x2", (2, 2, 1)),
    "v5p-8": ("v5p:2x2x1", (2, 2, 1)), "v5p-16": ("v5p:2x2x2", (2, 2, 1)),
}
REMAT_SWEEP = ("none", "dots", "layer_input", "offload")


class PlanError(ValueError):
    """The plan cannot be made (no libtpu, an unknown shape or topology); the message says what to do."""


# ----------------------------------------------------------------------------- devices


def tpu_devices(topology: str) -> tuple[list, Chip]:
    """The abstract devices of a named TPU slice (``v5e-8``) and its chip, from libtpu; no TPU needed.

    Raises:
        PlanError: for an unknown slice name, or when libtpu is not installed.
    """
    if topology not in TOPOLOGIES:
        raise PlanError(f"unknown TPU slice {topology!r}; known: {', '.join(TOPOLOGIES)}")
    name, per_host = TOPOLOGIES[topology]
    # Several processes may load libtpu at once on a shared machine (none of them owns a TPU).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError("libtpu is not installed; install it with `pip install 'jpeft[tpu]'` (the libtpu that "
                        "matches this jax, about 700 MB)") from None
    chip = CHIPS[topology.split("-")[0]]
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                            chips_per_host_bounds=per_host, num_slices=1,
                                            wrap=(False, False, False))
    except Exception as err:  # libtpu's own message (e.g. a topology it does not know)
        raise PlanError(f"libtpu cannot describe {topology} ({name}): {err}") from None
    return list(desc.devices), chip


def has_libtpu() -> bool:
    """Whether libtpu is importable (the planner and its tests need it)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def parse_mesh(text: str, num_devices: int) -> dict[str, int]:
    """``"fsdp=-1"`` or ``"fsdp=2,tensor=2"`` -> mesh axis sizes over ``data``, ``fsdp``, ``tensor``.

    Example:
        >>> parse_mesh("fsdp=2,tensor=-1", 8)
        {'data': 1, 'fsdp': 2, 'tensor': 4}
    """
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in sizes:
            raise PlanError(f"bad mesh item {item!r}; write axis=size with axes data, fsdp, tensor (e.g. fsdp=-1)")
        sizes[name.strip()] = int(value)
    return sharding.mesh_sizes(sizes, num_devices)


# ----------------------------------------------------------------------------- the step


def published_shapes() -> dict[str, dict]:
    """The published model shapes by name (``configs/shapes/published.yaml``)."""
    return yaml.safe_load(SHAPES_FILE.read_text())


def model_of_shape(shape: str | dict, cfg, param_dtype: str | None = None) -> Any:
    """A scanned Llama-family model of a published shape (or a dict of config fields), with the run's options.

    ``param_dtype``: the stored weights' dtype (default: the compute dtype, ``model.dtype``).
    ``attention: auto`` becomes what ``auto`` means on TPU (the host compiling it is not one).
    """
    shapes = published_shapes()
    if isinstance(shape, str):
        if shape not in shapes:
            raise PlanError(f"unknown model shape {shape!r}; known: {', '.join(shapes)}")
        shape = shapes[shape]
    dtype = cfg.model.dtype
    implementation = attention.resolve(cfg.model.attention, num_keys=0, backend="tpu")
    return llama.model(llama.LlamaConfig(**shape, scan_layers=True, dtype=dtype, param_dtype=param_dtype or dtype,
                                         remat=cfg.model.remat, attention=implementation))


def abstract_batch(batch: int, seq: int, answer: int | None = None):
    """A :class:`train.data.TrainBatch` of ``jax.ShapeDtypeStruct``: ``answer`` loss positions per row (default all)."""
    a = seq if answer is None else answer
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    return TrainBatch(ints(batch, seq), ints(batch, seq), ints(batch, seq),
                      jax.ShapeDtypeStruct((batch, seq), jnp.float32), ints(batch, a))


def abstract_parts(cfg, model):
    """``(method, frozen, adapter, optimizer)``: the run's method and optimizer, parameters as shapes only."""
    params = model.abstract_params()
    if cfg.model.quantize:
        params = jax.eval_shape(lambda p: quant.quantize(p, layer_kernels(model.layouts()),
                                                         format=cfg.model.quantize,
                                                         block_size=cfg.model.quant_block_size, model=model), params)
    method = run.make_method(cfg, model)
    adapter = jax.eval_shape(lambda p: method.init(jax.random.key(0), p), params)
    optimizer, _ = trainer.make_optimizer(cfg.train, method)
    return method, lifecycle.frozen_part(params, adapter), adapter, optimizer


def _itemsize(dtype) -> int:
    return dtype.itemsize  # a typed PRNG key's dtype counts its key data (8 bytes for threefry)


def shard_bytes(tree: Any, shardings: Any, memory_kind: str | None = None) -> int:
    """Bytes of one device's shard of every array of ``tree`` under ``shardings`` (shapes only).

    ``memory_kind``: only the arrays whose sharding names that memory kind (e.g. ``"pinned_host"``).
    """
    sizes = jax.tree.map(lambda x, s: int(np.prod(s.shard_shape(x.shape))) * _itemsize(x.dtype)
                         if memory_kind is None or s.memory_kind == memory_kind else 0, tree, shardings)
    return sum(jax.tree.leaves(sizes))


@dataclasses.dataclass
class Plan:
    """One compiled step's per-chip figures (bytes, FLOPs, seconds) and what it was compiled for."""
    label: str
    chips: int
    mesh: dict
    remat: str
    hbm: int
    peak_flops: float
    hbm_bandwidth: float = 0.0
    micro_batches: int = 1
    compiled: bool = False
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    host: int = 0
    flops: float = 0.0
    seconds: float = 0.0  # XLA's estimate (> 0), or 0 when there is none
    bytes_accessed: float = 0.0
    cost_note: str = ""  # why there is no XLA estimate
    needed: int = 0  # from the compiler's refusal
    error: str = ""
    expected_arguments: dict = dataclasses.field(default_factory=dict)
    expected_host: int = 0  # of those, the bytes whose shardings name host memory

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to them + temporaries: the step's device memory."""
        return self.needed if not self.compiled else self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def fits(self) -> bool:
        return self.compiled and self.peak <= self.hbm

    @property
    def mfu(self) -> float:
        """Compiled FLOPs per chip over (XLA's estimated seconds x the chip's peak FLOP/s): an estimate."""
        return self.flops / (self.seconds * self.peak_flops) if self.seconds > 0 else float("nan")

    @property
    def roofline_seconds(self) -> float:
        """The roofline bound: the longer of FLOPs at peak and accessed bytes at HBM bandwidth (not XLA's)."""
        if not self.flops or not self.hbm_bandwidth:
            return float("nan")
        return max(self.flops / self.peak_flops, self.bytes_accessed / self.hbm_bandwidth)

    @property
    def roofline_mfu(self) -> float:
        """FLOPs at peak over :attr:`roofline_seconds`: an upper bound on MFU from the roofline, not XLA's."""
        return self.flops / (self.roofline_seconds * self.peak_flops) if self.flops else float("nan")

    def row(self) -> str:
        mesh = "x".join(f"{k}{v}" for k, v in self.mesh.items() if v > 1) or "1"
        est = f"{self.seconds:7.3f} {self.mfu:6.2f}" if self.seconds > 0 else f"{'-':>7s} {'-':>6s}"
        cost = (f"{self.flops / 1e12:8.1f} {est} {self.roofline_mfu:7.2f}" if self.flops
                else f"{'-':>8s} {'-':>7s} {'-':>6s} {'-':>7s}")
        if not self.compiled:
            need = f"needs {self.needed / GIB:.2f} GiB" if self.needed else self.error[:80]
            return f"{self.label:34s} {mesh:14s} {self.remat:11s} {self.micro_batches:2d} {'-':>7s} {'-':>7s} " \
                   f"{'-':>7s} {'-':>6s} " \
                   f"{self.peak / GIB:7.2f} {'no':>4s}  {need}"
        return (f"{self.label:34s} {mesh:14s} {self.remat:11s} {self.micro_batches:2d} {self.arguments / GIB:7.2f} "
                f"{self.temporaries / GIB:7.2f} "
                f"{(self.outputs - self.aliased) / GIB:7.2f} {self.host / GIB:6.2f} {self.peak / GIB:7.2f} "
                f"{'yes' if self.fits else 'no':>4s}  {cost}")


HEADER = (f"{'step':34s} {'mesh':14s} {'remat':11s} {'mb':>2s} {'args':>7s} {'temp':>7s} {'out':>7s} {'host':>6s} "
          f"{'peak':>7s} {'fits':>4s}  {'TFLOP':>8s} {'est s':>7s} {'estMFU':>6s} {'roofMFU':>7s}")
UNITS = ("per chip; mb: micro-batches (gradient accumulation); memory in GiB (args: arguments, temp: "
         "temporaries, out: outputs not aliased to donated arguments, host: pinned_host arguments; peak = args + out "
         "+ temp); TFLOP: compiled FLOPs; est s: XLA's "
         "estimated step time (optimal_seconds); estMFU: TFLOP / (est s x peak bf16 FLOP/s): an estimate; roofMFU: "
         "roofline estimate, not XLA's: TFLOP / (max(TFLOP / peak, bytes accessed / HBM bandwidth) x peak)")


def _needed_bytes(message: str) -> int:
    """The memory a refused compile needed, from the TPU compiler's message (``... (154.26G) exceeds ...``)."""
    found = re.findall(r"\(([\d.]+)([KMGT])\) exceeds", message) or re.findall(r"([\d.]+)([KMGT]) of", message)
    if not found:
        return 0
    value, unit = found[0]
    return int(float(value) * 1024 ** "KMGT".index(unit) * 1024)


def plan_step(*, cfg=None, shape: str | dict = "llama-3.2-1b", topology: str = "v5e-4", mesh: str = "fsdp=-1",
              batch: int = 8, seq: int = 2048, answer: int | None = None, label: str | None = None,
              cost_layers: bool = True, param_dtype: str | None = None) -> Plan:
    """Compile the trainer's step for a TPU slice and read the compiler's analyses (see the module docstring).

    ``cfg``: a :class:`train.config.RunConfig` (method, model options, optimizer; default: the
    default run config, LoRA). ``answer``: loss positions per row (default: every token).
    ``param_dtype``: the weights' dtype when it differs from the compute dtype (float32 weights,
    bfloat16 compute). ``cost_layers``: also compile the 1- and 2-layer steps for FLOPs and time (:func:`step_cost`).
    """
    cfg = config_lib.from_dict({}) if cfg is None else cfg
    if batch % cfg.train.micro_batches:
        raise PlanError(f"a batch of {batch} rows does not split into train.micro_batches={cfg.train.micro_batches} "
                        "micro-batches; pick a count that divides --batch")
    devices, chip = tpu_devices(topology)
    sizes = parse_mesh(mesh, len(devices))

    mesh_ = sharding.make_mesh(sizes, devices=devices)
    model = model_of_shape(shape, cfg, param_dtype)
    method, frozen, adapter, optimizer = abstract_parts(cfg, model)
    place = trainer.Placement(mesh_, cfg.sharding.rules, method, model, frozen, adapter, optimizer,
                              cfg.train.offload_optimizer, cfg.train.offload_frozen)
    batch_ = abstract_batch(batch, seq, answer)
    shardings = place.step_shardings(batch_)
    step = trainer.make_train_step(method, model, optimizer, shardings,
                                   sums=functools.partial(answer_xent, chunk=cfg.train.loss_chunk),
                                   micro_batches=cfg.train.micro_batches)
    opt_state = jax.eval_shape(optimizer.init, adapter)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    plan = Plan(label or f"{shape if isinstance(shape, str) else 'model'} {cfg.method}", len(devices), sizes,
                stack_name(cfg.model.remat), chip.hbm_bytes, chip.peak_flops, chip.hbm_bandwidth,
                micro_batches=cfg.train.micro_batches)
    plan.expected_arguments = {"frozen": shard_bytes(frozen, place.frozen),
                               "adapter": shard_bytes(adapter, place.adapter),
                               "opt_state": shard_bytes(opt_state, place.opt_state),
                               "batch": shard_bytes(batch_, shardings["batch"]),
                               "rng": shard_bytes(rng, shardings["rng"])}
    plan.expected_host = (shard_bytes(frozen, place.frozen, offload.HOST)
                          + shard_bytes(opt_state, place.opt_state, offload.HOST))
    try:
        compiled = step.lower(adapter, opt_state, frozen, batch_, rng).compile()
    except Exception as err:  # the TPU compiler refuses a step that does not fit (RESOURCE_EXHAUSTED)
        message = str(err)
        if "exceeds" not in message and "RESOURCE_EXHAUSTED" not in message:
            raise
        plan.needed, plan.error = _needed_bytes(message), message.splitlines()[0][:300]
        return plan
    memory = compiled.memory_analysis()
    plan.compiled = True
    plan.arguments, plan.outputs = memory.argument_size_in_bytes, memory.output_size_in_bytes
    plan.aliased, plan.temporaries = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    plan.host = memory.host_argument_size_in_bytes
    if cost_layers:
        plan.flops, seconds, plan.bytes_accessed, plan.cost_note = step_cost(cfg, model, mesh_, batch_)
        plan.seconds = seconds if not plan.cost_note else 0.0
    return plan


def _cost(compiled) -> tuple[float, float, float, str]:
    """``(FLOPs, XLA's estimated seconds, bytes accessed, why the estimate is unusable or "")`` of a loop-free program.

    XLA's TPU cost model prices each :data:`UNPRICED_CALLS` custom call at -1 s; they are
    counted in the compiled HLO and their -1 s taken out (priced 0).
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    unpriced = sum(text.count(f'custom_call_target="{name}"') for name in UNPRICED_CALLS)
    seconds = float(cost.get("optimal_seconds", 0.0)) + unpriced
    note = ""
    if " while(" in text:
        note = "the cost form has a loop, whose body XLA's cost analysis counts once"
    elif not seconds > 0:
        note = (f"XLA's optimal_seconds came out {seconds - unpriced:.3f} ({unpriced} {'/'.join(UNPRICED_CALLS)} "
                f"custom calls at -1 s each taken out: {seconds:.3f})")
    return float(cost.get("flops", 0.0)), seconds, float(cost.get("bytes accessed", 0.0)), note


def step_cost(cfg, model, mesh, batch) -> tuple[float, float, float, str]:
    """``(FLOPs, XLA's estimated seconds, bytes accessed, note)`` per chip of the whole step, from 1 and 2 layers.

    XLA's cost analysis counts the body of a loop once and prices a loop it cannot see
    through at -1 s, so the cost is read from loop-free forms of the step: one and two
    unrolled layers, extended linearly (``cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1))``:
    every layer of a stack is the same computation), with the loss unchunked and the
    attention dense (the blockwise attention and the chunked loss are loops over the same
    products; their recomputation in the backward pass is not counted), or, for a run with
    ``model.attention=splash``, the splash kernel itself: XLA's cost model counts the
    kernel's bytes but not its arithmetic (a Pallas kernel is opaque to it), so the FLOPs
    and the time leave the attention's products out. Compiled without
    windowed einsums (:data:`COST_OPTIONS`: XLA overlaps a weight's all-gather with its
    matmul in a loop). XLA's TPU cost model prices some custom calls at -1 s each
    (:data:`UNPRICED_CALLS`); they are taken out. ``note`` says why there is no usable
    estimate, else it is empty; the FLOPs and bytes stand either way.
    """
    # The splash kernel is one custom call (no loop): kept. Blockwise attention is a loop: the dense form stands in.
    cost_attention = "splash" if model.config.attention == "splash" else "xla"
    costs = []
    for layers in (1, 2):
        small = model.replace(num_layers=layers, scan_layers=False, attention=cost_attention)
        method, frozen, adapter, optimizer = abstract_parts(cfg, small)
        place = trainer.Placement(mesh, cfg.sharding.rules, method, small, frozen, adapter, optimizer,
                                  cfg.train.offload_optimizer, cfg.train.offload_frozen)
        step = trainer.make_train_step(method, small, optimizer, place.step_shardings(batch), sums=answer_xent,
                                       micro_batches=cfg.train.micro_batches, unroll_micro_batches=True)
        opt_state = jax.eval_shape(optimizer.init, adapter)
        rng = jax.eval_shape(lambda: jax.random.key(0))
        costs.append(_cost(step.lower(adapter, opt_state, frozen, batch, rng).compile(compiler_options=COST_OPTIONS)))
    (f1, s1, b1, n1), (f2, s2, b2, n2) = costs
    n = model.num_layers
    return f1 + (n - 1) * (f2 - f1), s1 + (n - 1) * (s2 - s1), b1 + (n - 1) * (b2 - b1), n1 or n2


def stack_name(remat) -> str:

    return stack.check_remat(remat)


def sweep(cfg, *, shape, topology, batch, seq, answer=None, micro_batches=(1, 2, 4)) -> list[Plan]:
    """Every mesh shape (fsdp x tensor over the slice) x remat policy x micro-batch count; the caller picks the best.

    A micro-batch count is tried where each micro-batch still gives every row shard
    (``data x fsdp``) whole rows: ``batch % (count x rows shards) == 0``.
    """
    devices, _ = tpu_devices(topology)
    n = len(devices)
    meshes = [f"fsdp={n // t},tensor={t}" for t in (1, 2, 4) if n % t == 0 and n // t >= 1]
    plans = []
    for mesh in meshes:
        row_shards = n // parse_mesh(mesh, n)["tensor"]
        for count in (c for c in micro_batches if batch % (c * row_shards) == 0):
            for remat in REMAT_SWEEP:
                run_cfg = config_lib.apply_overrides(cfg, [f"model.remat={remat}", f"train.batch_size={batch}",
                                                           f"train.micro_batches={count}"])
                plans.append(plan_step(cfg=run_cfg, shape=shape, topology=topology, mesh=mesh, batch=batch,
                                       seq=seq, answer=answer))
                print(plans[-1].row(), flush=True)
    return plans


def best(plans: list[Plan]) -> Plan | None:
    """The fitting plan with the shortest estimated step (XLA's; plans without one last), or None."""
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: p.seconds if p.seconds > 0 else float("inf")) if fitting else None


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b", help=f"a published shape ({SHAPES_FILE.name})")
    parser.add_argument("--config", help="a run config (method, model options, optimizer); default: LoRA defaults")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--topology", default="v5e-4", help=f"a TPU slice: {', '.join(TOPOLOGIES)}")
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh axis sizes, e.g. fsdp=-1 or fsdp=4,tensor=2")
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row")
    parser.add_argument("--answer", type=int, default=None, help="loss positions per row (default: every token)")
    parser.add_argument("--sweep", action="store_true",
                        help="try mesh shapes x remat policies x micro-batches; report the best")
    parser.add_argument("--micro", default="1,2,4",
                        help="micro-batch counts the sweep tries (gradient accumulation, train.micro_batches)")
    args = parser.parse_args(argv)
    try:
        cfg = (config_lib.load_config(args.config, args.set) if args.config
               else config_lib.apply_overrides(config_lib.from_dict({}), args.set))
        print(f"{args.shape}, {cfg.method}, {args.topology}, batch {args.batch} x {args.seq}; {UNITS}")
        print(HEADER)
        if args.sweep:
            counts = tuple(int(c) for c in args.micro.split(","))
            found = best(sweep(cfg, shape=args.shape, topology=args.topology, batch=args.batch, seq=args.seq,
                               answer=args.answer, micro_batches=counts))
            print("best estimate that fits:", found.row() if found else "none fits")
            return 0 if found else 1
        plan = plan_step(cfg=cfg, shape=args.shape, topology=args.topology, mesh=args.mesh, batch=args.batch,
                         seq=args.seq, answer=args.answer)
        print(plan.row())
        if plan.cost_note:
            print(f"no XLA time estimate: {plan.cost_note}")
        if not plan.fits:
            print(f"does not fit: needs {plan.peak / GIB:.2f} GiB per chip, the chip has {plan.hbm / GIB:.2f} GiB")
        return 0 if plan.fits else 1
    except (PlanError, config_lib.ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
