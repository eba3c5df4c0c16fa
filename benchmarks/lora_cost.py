"""FLOPs of a LoRA and a DoRA train step against a full fine-tuning step, at SmolLM2-135M shapes.

Deterministic: the steps are compiled from abstract shapes (nothing is allocated)
and XLA's cost analysis gives their FLOPs. The ideal LoRA ratio is about 2/3: the
backward pass still computes dx through every layer but no dW for frozen weights.
DoRA (``use_dora=True``) adds, per adapted weight and step, the norm of ``W + s A @ B``
(``in x out x r`` for ``A @ B``) and a per-feature scale; Hugging Face PEFT measured
its DoRA step at +26% over LoRA's.

    python benchmarks/lora_cost.py [--batch 8] [--seq 256] [--rank 8]

Last two lines: ``dora_over_lora_flops=<ratio>`` (the LoRA targets of the default job)
and ``lora_over_full_flops=<ratio>``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jpeft
from jpeft.analysis import grad_step_cost
from jpeft.models import llama

SMOLLM2_135M = llama.LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    tie_word_embeddings=True)

TARGETS = {
    "attention": r".*/(q|k|v|o)_proj/kernel",
    "all-linear": r".*/(q|k|v|o|gate|up|down)_proj/kernel",
}


def loss_for(method, model):
    def loss(adapter, frozen, tokens_BxT):
        logits_BxTxV, _ = model.forward(method.apply(frozen, adapter), tokens_BxT)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits_BxTxV[:, :-1], tokens_BxT[:, 1:]).mean()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
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
    ratio, flops = None, {}
    for name, targets in TARGETS.items():
        for use_dora in (False, True):
            lora = jpeft.lora(rank=args.rank, targets=targets, model=model, use_dora=use_dora)
            adapter = jax.eval_shape(lora.init, key, params)
            cost = grad_step_cost(loss_for(lora, model), adapter, params, tokens)
            flops[name, use_dora] = cost.flops
            label = f"{'dora' if use_dora else 'lora'} r={args.rank} {name}"
            print(f"{label:<24}{jpeft.param_report(params, adapter).trainable:>14,}"
                  f"{cost.flops / 1e9:>14.1f}{cost.flops / full_cost.flops:>10.3f}")
            if not use_dora:
                ratio = cost.flops / full_cost.flops
    for name in TARGETS:
        print(f"dora over lora ({name}): {flops[name, True] / flops[name, False]:.4f}")
    print(f"dora_over_lora_flops={flops['attention', True] / flops['attention', False]:.4f}")
    print(f"lora_over_full_flops={ratio:.3f}")


if __name__ == "__main__":
    main()
