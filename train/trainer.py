"""The train step, the validation loss and the training loop.

The loss is a function of the adapter alone::

    loss(adapter) = xent(forward(method.apply(frozen, adapter, rng=rng), batch))

so ``jax.value_and_grad`` gives adapter-shaped gradients only. The frozen
parameters are an argument of the jitted step (not constants baked into the
program), and the adapter and optimizer state are donated.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from train.config import TrainConfig
from train.data import TrainBatch


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine (or linear) decay, after global-norm clipping."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = cfg.steps - cfg.warmup_steps
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=0.1)
    else:
        decay = optax.linear_schedule(cfg.lr, 0.1 * cfg.lr, decay_steps)
    schedule = optax.join_schedules([warmup, decay], [cfg.warmup_steps])
    optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )
    return optimizer, schedule


def answer_xent(params, model_config, batch: TrainBatch) -> tuple[jax.Array, jax.Array]:
    """``(sum of answer-token cross-entropies, number of answer tokens)``.

    Only the hidden states at answer positions are projected onto the
    vocabulary: ``B x A`` rows instead of ``B x T``.
    """
    from jpeft.models import llama

    hidden_BxTxD, _ = llama.forward(
        params, model_config, batch.tokens_BxT, attention_mask_BxT=batch.attention_mask_BxT, return_hidden=True
    )
    valid_BxA = batch.answer_positions_BxA >= 0
    positions_BxA = jnp.maximum(batch.answer_positions_BxA, 0)
    hidden_BxAxD = jnp.take_along_axis(hidden_BxTxD, positions_BxA[:, :, None], axis=1)
    targets_BxA = jnp.take_along_axis(batch.targets_BxT, positions_BxA, axis=1)
    logits_BxAxV = llama.lm_head(params, model_config, hidden_BxAxD)
    losses_BxA = optax.softmax_cross_entropy_with_integer_labels(logits_BxAxV, targets_BxA)
    return jnp.sum(jnp.where(valid_BxA, losses_BxA, 0.0)), jnp.sum(valid_BxA).astype(jnp.float32)


def make_loss_fn(method, model_config) -> Callable:
    """``loss(adapter, frozen, batch, rng) -> mean answer-token cross-entropy``."""

    def loss_fn(adapter, frozen, batch: TrainBatch, rng):
        total, count = answer_xent(method.apply(frozen, adapter, rng=rng), model_config, batch)
        return total / jnp.maximum(count, 1.0)

    return loss_fn


def make_train_step(method, model_config, optimizer) -> Callable:
    """Jitted ``step(adapter, opt_state, frozen, batch, rng) -> (adapter, opt_state, stats)``."""
    loss_fn = make_loss_fn(method, model_config)

    def step(adapter, opt_state, frozen, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        adapter = optax.apply_updates(adapter, updates)
        return adapter, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnames=("adapter", "opt_state"))


def make_eval_loss(method, model_config) -> Callable:
    """Jitted ``eval_loss(adapter, frozen, batch) -> (loss sum, token count)`` (no dropout)."""

    def eval_loss(adapter, frozen, batch: TrainBatch):
        return answer_xent(method.apply(frozen, adapter), model_config, batch)

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
    model_config,
    adapter: Any,
    frozen: Any,
    batches: Iterator[TrainBatch],
    val_batches: list[TrainBatch],
    log: Callable[[dict], None],
    progress: bool = True,
) -> Any:
    """Run ``cfg.steps`` optimizer steps; ``log`` receives one dict per event. Returns the adapter."""
    optimizer, schedule = make_optimizer(cfg)
    step_fn = make_train_step(method, model_config, optimizer)
    eval_loss = make_eval_loss(method, model_config)
    opt_state = optimizer.init(adapter)
    key = jax.random.key(cfg.seed)

    def validate(step: int) -> float:
        start = time.perf_counter()
        val = validation_loss(eval_loss, adapter, frozen, val_batches)
        log({"kind": "val", "step": step, "loss": val, "seconds": time.perf_counter() - start})
        return val

    tqdm.write(f"step 0: val loss {validate(0):.4f}")
    bar = tqdm(range(1, cfg.steps + 1), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        start = time.perf_counter()
        adapter, opt_state, stats = step_fn(adapter, opt_state, frozen, batch, jax.random.fold_in(key, step))
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
        log(record)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:,.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            bar.write(f"step {step}: train loss {loss:.4f}  val loss {validate(step):.4f}")
    bar.close()
    return adapter
