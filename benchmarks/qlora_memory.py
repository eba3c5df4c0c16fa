"""Memory of the frozen weights of SmolLM2-135M per storage format, and QLoRA vs LoRA train steps.

Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, 30 layers, 9 query / 3
key-value heads of dim 64, vocab 49152, tied embeddings) with random weights: no
download. Every matrix (the 7 projections of each layer and the embedding table)
is quantized; the RMSNorm scales stay float32.

Prints, per format, the bytes of the frozen weights measured with
``on_device_size_in_bytes()`` on the real arrays, bits per quantized parameter and
the round-trip error ``||deq(W) - W|| / ||W||`` over all matrices. Then, from XLA's
compiled memory analysis, the memory of one QLoRA train step (NF4 + double quant
base) against one LoRA step with a bfloat16 base (both: LoRA rank 8 on all linear
layers, bfloat16 compute, Adam), and their step-time ratio measured in this run.
Last, at a shape where the weights dominate (a random 1B-parameter Llama, batch 1 x 128,
abstract arrays: nothing is allocated), the peak memory of the two steps from the compiled
memory analysis: ``qlora_over_bf16_lora_peak_1b=<ratio>``. The last line is
``nf4_bits_per_param=<x>``.

On CPU, XLA computes bfloat16 dots in float32, so temp sizes and times there are
indicative only; the frozen-weight bytes are backend independent.

Run: ``python benchmarks/qlora_memory.py [--batch 4 --seq 128 --steps 3]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jpeft and train (train is not installed)

import jax
import jax.numpy as jnp
import optax

import jpeft
from jpeft import quant, tree
from jpeft.models import llama
from train.records import write_record
from shapes import llama_1b, smollm2_135m

MATRICES = r".*/(kernel|embedding)"
LORA_TARGETS = r".*/(q|k|v|o|gate|up|down)_proj/kernel"
FORMATS = [("int8", {"format": "int8"}), ("int4", {"format": "int4"}),
           ("nf4", {"format": "nf4", "double_quant": False}), ("nf4+dq", {"format": "nf4"})]


def device_bytes(t) -> int:
    return sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(t))


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def weight_table(params) -> float:
    """Prints bytes and round-trip errors per format; returns NF4+double-quant bits/param."""
    matrices, rest = tree.split(params, MATRICES)
    n_matrix = sum(tree.leaf_size(x) for x in tree.flatten(matrices).values())
    n_total = n_matrix + sum(tree.leaf_size(x) for x in tree.flatten(rest).values())
    rest_bytes = device_bytes(rest)
    print(f"frozen parameters: {n_total:,} ({n_matrix:,} in quantizable matrices); "
          f"norm scales kept float32: {rest_bytes:,} B")
    print(f"{'format':8s} {'matrices':>13s} {'all frozen':>13s} {'bits/param':>10s} {'rel. RMSE':>10s}")
    for dtype in (jnp.float32, jnp.bfloat16):
        cast = jax.tree.map(lambda x: x.astype(dtype), matrices)
        err = _relative_error(matrices, cast)
        b = device_bytes(cast)
        print(f"{jnp.dtype(dtype).name:8s} {mib(b):>13s} {mib(b + rest_bytes):>13s} "
              f"{8 * b / n_matrix:10.3f} {err:10.5f}")
        del cast
    nf4_bits = float("nan")
    for name, kwargs in FORMATS:
        q = quant.quantize(matrices, MATRICES, **kwargs)
        b = device_bytes(q)
        bits = 8 * b / n_matrix
        err = _relative_error(matrices, q)
        print(f"{name:8s} {mib(b):>13s} {mib(b + rest_bytes):>13s} {bits:10.3f} {err:10.5f}")
        if name == "nf4+dq":
            nf4_bits = bits
        del q
    return nf4_bits


def _relative_error(reference, approx) -> float:
    ref, got = tree.flatten(reference), tree.flatten(approx)
    num = sum(float(jnp.sum((jpeft.ops.as_array(got[p], jnp.float32) - ref[p]) ** 2)) for p in ref)
    den = sum(float(jnp.sum(ref[p].astype(jnp.float32) ** 2)) for p in ref)
    return (num / den) ** 0.5


def make_step(config, method, optimizer):
    def loss_fn(adapter, frozen, tokens_BxT):
        logits_BxTxV, _ = llama.forward(method.apply(frozen, adapter), config, tokens_BxT[:, :-1])
        logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1))

    def step(adapter, opt_state, frozen, tokens_BxT):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, frozen, tokens_BxT)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def step_table(params, config, batch: int, seq: int, steps: int) -> None:
    method = jpeft.lora(rank=8, alpha=16, targets=LORA_TARGETS)
    optimizer = optax.adam(1e-4)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    bases = {
        "LoRA, bf16 base": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
        # model= blocks the embedding table along its width: lookups and the tied head then
        # dequantize only the rows they need (see jpeft.quant.array)
        "QLoRA, nf4+dq base": quant.quantize(params, MATRICES, format="nf4", model=llama.model(config)),
    }
    step = make_step(config, method, optimizer)
    print(f"\none train step, batch {batch} x seq {seq}, LoRA r=8 on all linear layers, bf16 compute, "
          f"Adam; XLA compiled memory analysis ({jax.default_backend()}):")
    print(f"{'':20s} {'frozen args':>13s} {'all args':>13s} {'temp':>13s} {'peak':>13s} {'step time':>10s}")
    times = {}
    for name, frozen in bases.items():
        adapter = method.init(jax.random.key(2), frozen)
        opt_state = optimizer.init(adapter)
        compiled = step.lower(adapter, opt_state, frozen, tokens).compile()
        mem = compiled.memory_analysis()
        peak = _peak(mem)
        adapter, opt_state, loss = compiled(adapter, opt_state, frozen, tokens)  # warm-up
        loss.block_until_ready()
        start = time.perf_counter()
        for _ in range(steps):
            adapter, opt_state, loss = compiled(adapter, opt_state, frozen, tokens)
        loss.block_until_ready()
        times[name] = (time.perf_counter() - start) / steps
        print(f"{name:20s} {mib(device_bytes(frozen)):>13s} {mib(mem.argument_size_in_bytes):>13s} "
              f"{mib(mem.temp_size_in_bytes):>13s} {mib(peak):>13s} {times[name]:9.2f}s")
    lora, qlora = times.values()
    print(f"step-time ratio QLoRA/LoRA: {qlora / lora:.2f} (measured in this run, {steps} steps each)")


def _peak(mem) -> int:
    """XLA's peak bytes of a compiled step: arguments + outputs - donated + temporaries."""
    return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes


def peak_at_1b(batch: int, seq: int) -> float:
    """Peak memory of a QLoRA (NF4 + double quant) step over that of a bf16-base LoRA step, 1B Llama."""
    config = llama_1b(dtype="bfloat16", scan_layers=True)
    method = jpeft.lora(rank=8, alpha=16, targets=LORA_TARGETS)
    optimizer = optax.adam(1e-4)
    step = make_step(config, method, optimizer)
    float_params = jax.eval_shape(lambda k: llama.model(config).init(k), jax.random.key(0))
    bases = {"LoRA, bf16 base": jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p),
                                               float_params),
             "QLoRA, nf4+dq base": jax.eval_shape(lambda p: quant.quantize(p, MATRICES, format="nf4",
                                                                           model=llama.model(config)), float_params)}
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    n = sum(x.size for x in jax.tree.leaves(float_params))
    print(f"\n1B Llama ({n / 1e9:.2f}B parameters), batch {batch} x seq {seq}, LoRA r=8 on all linear layers: "
          f"XLA compiled memory analysis ({jax.default_backend()}, abstract arrays)")
    print(f"{'':20s} {'all args':>13s} {'temp':>13s} {'peak':>13s}")
    peaks = {}
    for name, frozen in bases.items():
        adapter = jax.eval_shape(method.init, jax.random.key(2), frozen)
        opt_state = jax.eval_shape(optimizer.init, adapter)
        mem = step.lower(adapter, opt_state, frozen, tokens).compile().memory_analysis()
        peaks[name] = _peak(mem)
        print(f"{name:20s} {mib(mem.argument_size_in_bytes):>13s} {mib(mem.temp_size_in_bytes):>13s} "
              f"{mib(peaks[name]):>13s}")
    lora, qlora = peaks.values()
    print("(on CPU, XLA computes bfloat16 dots in float32 and converts the scanned bf16 weights to float32 "
          "before the loop, which inflates the bf16 LoRA's temporaries; on GPU/TPU the dots are bf16)")
    return qlora / lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    config = smollm2_135m(dtype="bfloat16", scan_layers=True)
    params = llama.model(config).init(jax.random.key(0))
    nf4_bits = weight_table(params)
    step_table(params, config, args.batch, args.seq, args.steps)
    ratio = peak_at_1b(batch=1, seq=128)
    print(f"qlora_over_bf16_lora_peak_1b={ratio:.3f}")
    print(f"nf4_bits_per_param={nf4_bits:.4f}")
    write_record("qlora_memory", {"nf4_bits_per_param": nf4_bits, "qlora_over_bf16_lora_peak_1b": ratio})


if __name__ == "__main__":
    main()
