"""FLOPs of a train step of LoRA and its relatives against full fine-tuning's, at SmolLM2-135M shapes.

Deterministic: every step is compiled from abstract shapes (nothing is allocated)
and XLA's cost analysis gives its FLOPs. LoRA's ideal ratio to full fine-tuning is
about 2/3: the backward pass still computes dx through every layer but no dW for
frozen weights. The other methods are compared with LoRA on the default job's targets
(attention, same rank):

* DoRA (``use_dora=True``) adds, per adapted weight, the norm of ``W + s A @ B`` (no
  gradient) and a per-feature scale; Hugging Face PEFT measured its DoRA step at +26%.
* LoHa's update is full-rank: each adapted weight runs ``x @ (W + dW)`` and forms a
  full-size gradient of ``dW``.
* LoKr applies its Kronecker product without forming it.
* BitFit (the norm scales of a model without biases) trains no matmul weight at all.
* AdaLoRA (the shipped config: ``init_r=12`` on attention, against LoRA r=8) runs
  ``x @ W + s ((x @ a) * e) @ b`` and adds its orthogonality penalty to the loss; its budget
  schedule runs in the optimizer update, so for it (and LoRA) the whole step, gradient plus
  AdamW update (wrapped by the schedule), is compiled too: ``adalora_step_over_lora_step_flops``.
* VeRA (PEFT's default r=256) runs ``((x @ A^T) * lambda_d) @ B^T * lambda_b`` through shared
  frozen projections, never forming ``dW``.
* OFT (PEFT's default blocks of 32) rotates each layer's input blockwise before the frozen matmul.

    python benchmarks/lora_cost.py [--batch 8] [--seq 256] [--rank 8] [--methods adalora ...]

The last lines are ``lora_over_full_flops=<ratio>`` (all-linear targets), then
``<method>_over_lora_flops=<ratio>`` for dora, loha, lokr, bitfit, adalora, vera and oft, and
``adalora_step_over_lora_step_flops=<ratio>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jpeft, not an installed one

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jpeft  # noqa: E402
from jpeft import lifecycle  # noqa: E402
from jpeft.analysis import grad_step_cost  # noqa: E402
from jpeft.models import llama  # noqa: E402
from train.records import write_record  # noqa: E402

SMOLLM2_135M = llama.LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    tie_word_embeddings=True)

COMPARED = ("dora", "loha", "lokr", "bitfit", "adalora", "vera", "oft")
"""The methods compared with LoRA's step (the last lines, in this order)."""

TARGETS = {
    "attention": r".*/(q|k|v|o)_proj/kernel",
    "all-linear": r".*/(q|k|v|o|gate|up|down)_proj/kernel",
}


def loss_for(method, model):
    """The trainer's loss shape: the model's next-token loss of the adapted parameters, plus the method's penalty."""
    def xent(params, tokens_BxT):
        logits_BxTxV, _ = model.forward(params, tokens_BxT)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV[:, :-1], tokens_BxT[:, 1:]).mean()
    return lifecycle.loss(method, xent)


def whole_step_flops(method, model, adapter, params, tokens) -> float:
    """FLOPs of gradient + AdamW update (with the method's own optimizer hook, as the trainer builds it)."""
    optimizer = lifecycle.optimizer(method, optax.adamw(1e-3))
    loss = loss_for(method, model)

    def step(adapter, opt_state, frozen, tokens_BxT):
        grads = jax.grad(loss)(adapter, frozen, tokens_BxT)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state

    opt_state = jax.eval_shape(optimizer.init, adapter)
    cost = jax.jit(step).lower(adapter, opt_state, params, tokens).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(COMPARED), choices=list(COMPARED),
                        help="which methods to compare with LoRA")
    args = parser.parse_args()

    model = llama.model(SMOLLM2_135M)
    params = model.abstract_params()
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    key = jax.random.key(0)

    full = jpeft.full()
    full_adapter = jax.eval_shape(full.init, key, params)
    full_cost = grad_step_cost(loss_for(full, model), full_adapter,
                               jpeft.tree.without(params, full_adapter), tokens)
    print(f"SmolLM2-135M shapes, batch {args.batch} x seq {args.seq}")
    print(f"{'method':<24}{'trainable':>14}{'GFLOPs/step':>14}{'vs full':>10}")
    print(f"{'full fine-tuning':<24}{jpeft.param_report(params, full_adapter).trainable:>14,}"
          f"{full_cost.flops / 1e9:>14.1f}{1.0:>10.3f}")
    rows = [{"step": "full fine-tuning", "trainable": jpeft.param_report(params, full_adapter).trainable,
             "gflops": full_cost.flops / 1e9, "vs_full": 1.0}]
    ratio, lora_flops = None, {}
    for name, targets in TARGETS.items():
        lora = jpeft.lora(rank=args.rank, targets=targets, model=model)
        adapter = jax.eval_shape(lora.init, key, params)
        cost = grad_step_cost(loss_for(lora, model), adapter, params, tokens)
        ratio, lora_flops[name] = cost.flops / full_cost.flops, cost.flops
        label = f"lora r={args.rank} {name}"
        print(f"{label:<24}{jpeft.param_report(params, adapter).trainable:>14,}"
              f"{cost.flops / 1e9:>14.1f}{ratio:>10.3f}")
        rows.append({"step": label, "trainable": jpeft.param_report(params, adapter).trainable,
                     "gflops": cost.flops / 1e9, "vs_full": ratio})
    others = {
        "dora": jpeft.dora(rank=args.rank, targets=TARGETS["attention"], model=model),
        "loha": jpeft.loha(rank=args.rank, targets=TARGETS["attention"], model=model),
        "lokr": jpeft.lokr(rank=args.rank, targets=TARGETS["attention"], model=model),
        "bitfit": jpeft.bitfit(model=model),
        "adalora": jpeft.adalora(init_r=12, target_r=8, alpha=32, targets=TARGETS["attention"], tinit=8, tfinal=8,
                                 total_step=40, model=model),
        "vera": jpeft.vera(rank=256, targets=TARGETS["attention"], model=model),
        "oft": jpeft.oft(block_size=32, targets=TARGETS["attention"], model=model),
    }
    over_lora = {}
    for name, method in others.items():
        if name not in args.methods:
            continue
        adapter = jax.eval_shape(method.init, key, params)
        cost = grad_step_cost(loss_for(method, model), adapter, params, tokens)
        over_lora[name] = cost.flops / lora_flops["attention"]
        label = {"bitfit": name, "adalora": "adalora r=12->8 attention", "vera": "vera r=256 attention",
                 "oft": "oft b=32 attention"}.get(name, f"{name} r={args.rank} attention")
        print(f"{label:<24}{jpeft.param_report(params, adapter).trainable:>14,}"
              f"{cost.flops / 1e9:>14.1f}{cost.flops / full_cost.flops:>10.3f}")
        rows.append({"step": label, "trainable": jpeft.param_report(params, adapter).trainable,
                     "gflops": cost.flops / 1e9, "vs_full": cost.flops / full_cost.flops})
    print(f"lora_over_full_flops={ratio:.3f}")
    for name, value in over_lora.items():
        print(f"{name}_over_lora_flops={value:.4f}")
    figures = {"shape": f"SmolLM2-135M, batch {args.batch} x seq {args.seq}", "rows": rows,
               "lora_over_full_flops": ratio, **{f"{n}_over_lora_flops": v for n, v in over_lora.items()}}
    if "adalora" in args.methods:
        lora = jpeft.lora(rank=args.rank, targets=TARGETS["attention"], model=model)
        steps = {name: whole_step_flops(m, model, jax.eval_shape(m.init, key, params), params, tokens)
                 for name, m in (("lora", lora), ("adalora", others["adalora"]))}
        print(f"adalora_step_over_lora_step_flops={steps['adalora'] / steps['lora']:.4f}")
        figures["adalora_step_over_lora_step_flops"] = steps["adalora"] / steps["lora"]
    write_record("lora_cost", figures)


if __name__ == "__main__":
    main()
