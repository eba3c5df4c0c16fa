"""The train step, the validation loss and the training loop.

The loss is a function of the adapter alone::

    loss(adapter) = xent(model.forward(method.apply(frozen, adapter, rng=rng), batch))
                    + method.training.penalty(adapter)         (methods that have one)

so ``jax.value_and_grad`` gives adapter-shaped gradients only. The frozen
parameters are an argument of the jitted step (not constants baked into the
program), and the adapter and optimizer state are donated. A method that updates its
own state during training gets it through :mod:`jpeft.lifecycle` (its optimizer
transformation, its penalty, its stages): the trainer knows no method by name.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jpeft import lifecycle, offload, optim, sharding
from train import placement
from train.sections import TrainConfig
from train.data import TrainBatch


class TrainingStopped(RuntimeError):
    """The loss (or gradients) stopped being finite; the run stops and keeps its good checkpoints."""

    def __init__(self, step: int, loss: float, bad_steps: list[int], last_checkpoint: int | None,
                 directory: str | None):
        self.step, self.loss, self.bad_steps, self.last_checkpoint = step, loss, bad_steps, last_checkpoint
        kept = (f"the last checkpoint, step {last_checkpoint} in {directory}, holds the state before it"
                if last_checkpoint is not None else "no checkpoint had been saved yet")
        super().__init__(
            f"the loss is {loss} at step {step} ({len(bad_steps)} step(s) with a non-finite loss or gradient: "
            f"{bad_steps[:10]}); training stopped and {kept}. Lower train.lr (or raise train.grad_clip), or allow "
            f"skipping a few such steps with train.max_bad_steps=N")


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate by optimizer count: linear warmup from 0 then cosine (or linear) decay to a tenth,
    or ULMFiT's slanted triangular rates (``warmup_steps`` is the rise, from ``lr / 32``)."""
    if cfg.schedule == "slanted_triangular":
        return optim.slanted_triangular(cfg.lr, cfg.steps, cut=cfg.warmup_steps)
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = cfg.steps - cfg.warmup_steps
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=0.1)
    else:
        decay = optax.linear_schedule(cfg.lr, 0.1 * cfg.lr, decay_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig, method=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on :func:`make_schedule`'s learning rates, after global-norm clipping.

    A method's ``training.optimizer`` wraps it (:func:`jpeft.lifecycle.optimizer`): per-weight
    rate scales after AdamW, or a method that updates its own state from the raw gradients,
    the parameters and the step. A method with stages keeps one optimizer for all of them.
    """
    schedule = make_schedule(cfg)
    optimizer = optax.chain(optim.clip_by_global_norm(cfg.grad_clip),  # optax's, computable in host memory too
                            optax.adamw(schedule, weight_decay=cfg.weight_decay))
    return (optimizer if method is None else lifecycle.optimizer(method, optimizer)), schedule


def schedule_settings(cfg: TrainConfig) -> dict:
    """The settings :func:`make_optimizer` builds from: a resumed run must keep them."""
    return {name: getattr(cfg, name) for name in ("steps", "lr", "schedule", "warmup_steps", "weight_decay",
                                                  "grad_clip")}


def make_params_loss(model, sums: Callable) -> Callable:
    """``loss(params, batch) -> mean loss`` of the model run with ``params``.

    ``sums``: the task's ``(params, model, batch) -> (loss sum, count)`` (:meth:`train.tasks.Task.loss_sums`).
    What a method's ``prepare`` (choosing what to train from data) differentiates.
    """

    def loss(params, batch: TrainBatch):
        total, count = sums(params, model, batch)
        return total / jnp.maximum(count, 1.0)

    return loss


def make_loss_fn(method, model, sums: Callable) -> Callable:
    """``loss(adapter, frozen, batch, rng) -> mean loss`` (plus the method's penalty)."""
    return lifecycle.loss(method, make_params_loss(model, sums))


def micro_batches_of(batch: Any, count: int) -> Any:
    """``batch`` (every leaf ``(B, ...)``) as ``count`` micro-batches ``(count, B // count, ...)``, rows interleaved.

    Micro-batch ``i`` holds rows ``i, i + count, i + 2 count, ...``: where the rows are split
    over devices in contiguous blocks, every device holds its share of every micro-batch.

    Example:
        >>> micro_batches_of(jnp.arange(6), 2).tolist()
        [[0, 2, 4], [1, 3, 5]]
    """
    def split(x):
        if x.shape[0] % count:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split into {count} micro-batches; make "
                             "train.batch_size a multiple of train.micro_batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_loss_and_grad(method, model, sums: Callable, micro_batches: int = 1, unroll: bool = False) -> Callable:
    """``(adapter, frozen, batch, rng) -> (loss, grads)``, the batch taken whole or in ``micro_batches`` parts.

    In parts, the activations of one micro-batch at a time are alive, and the result is the
    whole batch's: the loss sums and counts of every part are added before the division
    (the mean over all the batch's loss positions, as taken whole), the gradient likewise,
    and the method's penalty is added once. Each part gets its own dropout key
    (``fold_in(rng, i)``). ``unroll``: the parts as straight-line code instead of a loop
    (for XLA's cost analysis, which counts a loop's body once).
    """
    if micro_batches == 1:
        return jax.value_and_grad(make_loss_fn(method, model, sums))
    penalty = method.training.penalty

    def part_sums(adapter, frozen, part, rng):  # (loss sum, count): the count carries no gradient
        return sums(method.apply(frozen, adapter, rng=rng), model, part)

    part_grad = jax.value_and_grad(part_sums, has_aux=True)

    def loss_and_grad(adapter, frozen, batch, rng):
        def add_part(carry, inputs):
            grads, total, count = carry
            part, i = inputs
            (part_total, part_count), part_grads = part_grad(adapter, frozen, part, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, grads, part_grads), total + part_total, count + part_count), None

        start = (jax.tree.map(jnp.zeros_like, adapter), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        parts = (micro_batches_of(batch, micro_batches), jnp.arange(micro_batches))
        (grads, total, count), _ = jax.lax.scan(add_part, start, parts, unroll=micro_batches if unroll else 1)
        count = jnp.maximum(count, 1.0)
        loss, grads = total / count, jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
        if penalty is not None:
            value, penalty_grads = jax.value_and_grad(penalty)(adapter)
            loss, grads = loss + value, jax.tree.map(jnp.add, grads, penalty_grads)
        return loss, grads

    return loss_and_grad


def make_train_step(method, model, optimizer, shardings: dict | None = None, *, sums: Callable,
                    micro_batches: int = 1, unroll_micro_batches: bool = False) -> Callable:
    """Jitted ``step(adapter, opt_state, frozen, batch, rng) -> (adapter, opt_state, stats)``.

    A step whose loss, gradients or updated adapter are not finite changes nothing: it
    returns the adapter and optimizer state it was given, and ``stats["finite"]`` is False
    (the loop decides whether to go on). ``shardings``: ``{"adapter", "opt_state", "frozen",
    "batch", "rng"}`` sharding trees (see :class:`Placement`) fix where every input and
    output lives. ``micro_batches``: the gradient accumulated over that many parts of the
    batch, one optimizer update (:func:`make_loss_and_grad`).
    """
    loss_and_grad = make_loss_and_grad(method, model, sums, micro_batches, unroll_micro_batches)

    opt_on_host = shardings is not None and offload.on_host(shardings["opt_state"])
    frozen_on_host = shardings is not None and offload.on_host(shardings["frozen"])
    # Activations keep the batch's row split through every layer (jpeft.sharding.activation_rows).
    rows = None if shardings is None else getattr(shardings["batch"], "tokens_BxT", None)

    def step(adapter, opt_state, frozen, batch, rng):
        # With the base's layer matrices in host memory, each layer brings its own in (offload.layers_from_host).
        with sharding.activation_rows(rows), on_mesh_of(rows), frozen_in_use(frozen_on_host):
            loss, grads = loss_and_grad(adapter, frozen, batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if opt_on_host:  # the state lives in host memory and streams through HBM (Placement(offload_optimizer=True))
            # Kept or dropped leaf by leaf as it streams, so on the loss and gradients alone (holding the old and
            # new weights until every new one is checked would cost a second copy of them). With a finite gradient
            # norm every squared gradient is finite, and so is Adam's state; a weight the update makes overflow
            # marks the step not finite below but is not undone.
            # A method's own optimizer transformation may mix leaves: it gets the whole state at once.
            adapter, opt_state = offload.update_streamed(optimizer, grads, opt_state, adapter,
                                                         shardings["opt_state"], finite,
                                                         leafwise=method.training.optimizer is None)
            for leaf in jax.tree.leaves(adapter):
                finite = finite & jnp.all(jnp.isfinite(leaf))
        else:
            updates, new_opt_state = optimizer.update(grads, opt_state, adapter)
            new_adapter = optax.apply_updates(adapter, updates)
            for leaf in jax.tree.leaves(new_adapter):  # elementwise: a norm of huge finite values overflows
                finite = finite & jnp.all(jnp.isfinite(leaf))
            keep = lambda new, old: jnp.where(finite, new, old)
            adapter = jax.tree.map(keep, new_adapter, adapter)
            opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        return adapter, opt_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    if shardings is None:
        return jax.jit(step, donate_argnames=("adapter", "opt_state"))
    return placement.sharded_step(
        step, in_shardings=shardings,
        out_shardings=(shardings["adapter"], shardings["opt_state"], shardings["rng"]),
        donate_argnames=("adapter", "opt_state"))


def on_mesh_of(batch_sharding):
    """The context a step traces in: its mesh, over which kernels XLA cannot partition (Pallas splash) shard_map."""
    if batch_sharding is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(batch_sharding.mesh.abstract_mesh)


def frozen_in_use(on_host: bool):
    """The context a step traces in: with the frozen base in host memory, each layer brings its weights in."""
    return offload.layers_from_host() if on_host else contextlib.nullcontext()


class Placement:
    """Shardings of the frozen parameters, adapter, optimizer state and batches on a mesh.

    Built from shapes alone with :mod:`jpeft.sharding` (model logical axes + rules);
    ``batch`` feeds each process only its rows of a global batch. ``offload_optimizer`` and
    ``offload_frozen`` keep the optimizer state and the frozen base in host memory
    (``pinned_host``) between steps (:mod:`jpeft.offload`).
    """

    def __init__(self, mesh, rules, method, model, frozen, adapter, optimizer, offload_optimizer: bool = False,
                 offload_frozen: bool = False):
        self.mesh, self.rules = mesh, placement.rules_from_setting(rules)
        axes = model.param_axes()
        self.frozen = sharding.shardings_for(frozen, axes, mesh, self.rules)
        if offload_frozen:  # the layers' matrices; each layer brings its own in as it runs
            self.frozen = offload.layer_matrices_to_host(self.frozen, frozen)
        self.adapter = sharding.adapter_shardings(method, adapter, axes, mesh, self.rules)
        abstract_opt = jax.eval_shape(optimizer.init, adapter)
        self.opt_state = sharding.optimizer_shardings(optimizer, abstract_opt, self.adapter, mesh)
        if offload_optimizer:
            self.opt_state = offload.to_host(self.opt_state)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(self, tree, shardings):
        """Arrays of ``tree`` placed on ``shardings`` (each process places only its shards)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, shardings)
        return placement.from_host(jax.tree.map(np.asarray, tree), shardings)

    def batch_shardings(self, batch: TrainBatch):
        return placement.batch_shardings(batch, self.mesh, self.rules)

    def batch(self, batch: TrainBatch) -> TrainBatch:
        """The global batch as sharded arrays, from this process's rows of it."""
        shardings = self.batch_shardings(batch)
        rows = placement.local_batch_slice(shardings.tokens_BxT, batch.tokens_BxT.shape)
        return placement.shard_batch(jax.tree.map(lambda x: x[rows], batch), shardings)

    def step_shardings(self, batch: TrainBatch) -> dict:
        return {"adapter": self.adapter, "opt_state": self.opt_state, "frozen": self.frozen,
                "batch": self.batch_shardings(batch), "rng": self.replicated}


def make_eval_loss(method, model, sums: Callable, frozen_on_host: bool = False) -> Callable:
    """Jitted ``eval_loss(adapter, frozen, batch) -> (loss sum, token count)`` (no dropout).

    ``frozen_on_host``: the frozen base lives in host memory (``Placement(offload_frozen=True)``).
    """

    def eval_loss(adapter, frozen, batch: TrainBatch):
        with frozen_in_use(frozen_on_host):
            return sums(method.apply(frozen, adapter), model, batch)

    return jax.jit(eval_loss)


def validation_loss(eval_loss: Callable, adapter, frozen, batches: list[TrainBatch]) -> float:
    """Mean answer-token loss over fixed validation batches."""
    total, count = 0.0, 0.0
    for batch in batches:
        t, c = eval_loss(adapter, frozen, batch)
        total += float(t)
        count += float(c)
    return total / max(count, 1.0)


def train_loop(
    *,
    cfg: TrainConfig,
    method,
    model,
    adapter: Any,
    frozen: Any,
    batches: Callable[[int], Iterator[TrainBatch]] | Iterator[TrainBatch],
    val_batches: list[TrainBatch],
    log: Callable[[dict], None],
    progress: bool = True,
    mesh=None,
    rules: str = "default",
    checkpoints=None,
    resumed=None,
    sums: Callable,
) -> Any:
    """Run ``cfg.steps`` optimizer steps; ``log`` receives one dict per event. Returns the adapter.

    ``batches``: ``start -> iterator`` of the training batches from batch ``start`` on
    (a plain iterator cannot resume). ``mesh``/``rules``: where the arrays live (default:
    one device). ``checkpoints``: a :class:`train.checkpointing.Checkpoints` to save to;
    ``resumed``: the state to continue from (from :meth:`Checkpoints.resume_point`).
    ``sums``: the task's ``(params, model, batch) -> (loss sum, count)``; a batch needs ``tokens_BxT``
    and ``attention_mask_BxT``.

    Raises:
        TrainingStopped: when more than ``cfg.max_bad_steps`` steps had a non-finite loss
            (or gradients); the checkpoints saved before stay, and none holds a bad state.
    """
    main = jax.process_index() == 0
    optimizer, schedule = make_optimizer(cfg, method)
    if method.training.stages and jax.process_count() > 1:
        raise ValueError(f"{method.name} changes its trainable weights by stages, which runs in one process only")
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    # The stage that trained the resumed step (a method without stages is its own only stage).
    current = lifecycle.stage_at(method, 1 if resumed is None else resumed.step)
    if resumed is not None:
        adapter = resumed.adapter
        frozen = lifecycle.frozen_part(frozen, adapter)  # a later stage's adapter replaces more of the base
    place = Placement(mesh, rules, current, model, frozen, adapter, optimizer, cfg.offload_optimizer,
                      cfg.offload_frozen)
    frozen = place.put(frozen, place.frozen)
    first, key = 1, jax.random.key(cfg.seed)
    if resumed is None:
        adapter = place.put(adapter, place.adapter)
        opt_state = jax.jit(optimizer.init, out_shardings=place.opt_state)(adapter)
    else:
        adapter, opt_state = place.put(resumed.adapter, place.adapter), place.put(resumed.opt_state, place.opt_state)
        key, first = resumed.rng, resumed.step + 1
        log({"kind": "resume", "step": resumed.step})
        if main:
            tqdm.write(f"resumed from {checkpoints.directory if checkpoints else 'a checkpoint'} at step {resumed.step}")
    if callable(batches):
        batches = batches(first - 1)
    elif first > 1:
        raise ValueError("resuming needs batches as a function of the start batch, not an iterator")

    step_fn = None
    eval_loss = make_eval_loss(current, model, sums, cfg.offload_frozen)

    def validate(step: int) -> float:
        start = time.perf_counter()
        val = validation_loss(eval_loss, adapter, frozen, [place.batch(b) for b in val_batches])
        log({"kind": "val", "step": step, "loss": val, "seconds": time.perf_counter() - start})
        return val

    if first == 1:
        val = validate(0)
        if main:
            tqdm.write(f"step 0: val loss {val:.4f}")
    bad_steps = []
    bar = tqdm(range(first, cfg.steps + 1), desc="train", disable=not (progress and main), dynamic_ncols=True)
    for step in bar:
        stage = lifecycle.stage_at(method, step)
        if stage is not current:  # a new stage: more (or other) weights train; compiled once for it
            adapter, frozen = lifecycle.enter_stage(current, stage, frozen, adapter, jax.random.key(cfg.seed))
            opt_state = optim.carry_over(opt_state, optimizer.init(adapter))
            current, place = stage, Placement(mesh, rules, stage, model, frozen, adapter, optimizer,
                                              cfg.offload_optimizer, cfg.offload_frozen)
            frozen, adapter = place.put(frozen, place.frozen), place.put(adapter, place.adapter)
            opt_state = place.put(opt_state, place.opt_state)
            step_fn, eval_loss = None, make_eval_loss(current, model, sums, cfg.offload_frozen)
            trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapter))
            log({"kind": "stage", "step": step, "stage": lifecycle.stage_number(method, step),
                 "trainable": trainable})
            if main:
                bar.write(f"step {step}: stage {stage.describe()}, {trainable:,} trainable parameters")
        batch = next(batches)
        if step_fn is None:
            step_fn = make_train_step(current, model, optimizer, place.step_shardings(batch), sums=sums,
                                      micro_batches=cfg.micro_batches)
        start = time.perf_counter()
        adapter, opt_state, stats = step_fn(adapter, opt_state, frozen, place.batch(batch),
                                            jax.random.fold_in(key, step))
        loss = float(stats["loss"])  # waits for the step
        seconds = time.perf_counter() - start
        tokens = int(batch.attention_mask_BxT.sum())
        record = {
            "kind": "train",
            "step": step,
            "loss": loss,
            "grad_norm": float(stats["grad_norm"]),
            "lr": float(schedule(step - 1)),
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "seq_len": int(batch.tokens_BxT.shape[1]),
        }
        if not bool(stats["finite"]):
            record["skipped"] = True  # a non-finite loss or gradient: the step changed nothing
            bad_steps.append(step)
        log(record)  # (a run's non-main processes log to os.devnull)
        if len(bad_steps) > cfg.max_bad_steps:
            bar.close()
            if checkpoints is not None:
                checkpoints.close()
            raise TrainingStopped(step, loss, bad_steps, checkpoints.latest_step() if checkpoints else None,
                                  checkpoints.directory if checkpoints else None)
        if main:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:,.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = validate(step)  # every process takes part in the computation
            if main:
                bar.write(f"step {step}: train loss {loss:.4f}  val loss {val:.4f}")
        if checkpoints is not None and checkpoints.due(step, cfg.steps):  # after the step's records
            checkpoints.save(step, adapter, opt_state, key, seed=cfg.seed, batch_size=cfg.batch_size,
                             schedule=schedule_settings(cfg), method=method.name)
    bar.close()
    if checkpoints is not None:
        checkpoints.close()  # waits for the last asynchronous save
    return adapter


def on_device_of(tree, like):
    """``tree`` moved to the device of ``like``'s first leaf when it lives elsewhere (e.g. on a mesh).

    Evaluation runs on one device: the trained adapter comes back from the mesh to
    the device that holds the loaded base model.
    """
    device = next(iter(jax.tree.leaves(like)[0].devices()))
    if all(leaf.devices() == {device} for leaf in jax.tree.leaves(tree)):
        return tree
    return jax.device_put(tree, device)
