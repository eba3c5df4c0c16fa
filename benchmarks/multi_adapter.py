"""Decode throughput with many LoRA adapters in one batch, at SmolLM2-135M shapes.

Random weights of SmolLM2-135M's shapes (hidden 576, intermediate 1536, 30 scanned
layers, 9 query / 3 key-value heads, vocab 49152, tied embeddings): no download. Four
ways to decode a batch of ``--batch`` rows (default 8):

* **base**: the plain model;
* **one merged adapter**: a rank-16 LoRA folded into the weights (``method.merge``);
* **one unmerged adapter**: the same LoRA through ``method.apply`` (``x @ W + s (x A) B``);
* **mixed**: every row its own adapter, ``--batch`` adapters of ranks 8 and 16 in turn,
  in :class:`jpeft.MixedAdapters` slots (rank padded to 16); the slots and the rows are
  arguments of the compiled decoder, as a server would pass them.

Each runs the prompt (``--prompt`` tokens) into the KV cache, then times ``--decode``
greedy steps in one jitted loop (compilation and the prefill are not timed). The four
are timed in turn (the order reversed every other round), ``--repeats`` rounds: on a
machine shared with other work, a slow minute then falls on every row of a round alike. Prints each one's median decode
tokens/s (rows x steps / seconds), every round's mixed/merged throughput ratio, and,
last, ``mixed_over_merged_throughput=<ratio>``: the median of the rounds' ratios (each
ratio compares two timings taken a few seconds apart). Timings only: nothing here can
fail on time.

``--strategy`` picks how the mixed rows compute their LoRA updates
(:class:`jpeft.methods.lora.LoraRows`: ``dense``, ``gather``, or ``auto``).

Run: ``python benchmarks/multi_adapter.py [--batch 8 --prompt 64 --decode 32 --repeats 7
--targets all|attention --quantize nf4 --strategy auto|dense|gather]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jpeft and train (train is not installed)

import jax
import jax.numpy as jnp

import jpeft
from jpeft import quant
from jpeft.models import llama
from train.records import write_record
from shapes import smollm2_135m

TARGETS = {"all": r".*/(q|k|v|o|gate|up|down)_proj/kernel", "attention": r".*/(q|k|v|o)_proj/kernel"}


def random_lora(model, params, rank: int, targets: str, seed: int):
    """A LoRA adapter with both factors random (a trained adapter's B is not zero)."""
    method = jpeft.lora(rank=rank, alpha=2 * rank, targets=targets, model=model)
    adapter = method.init(jax.random.key(seed), params)
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return method, treedef.unflatten([0.01 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def make_decoder(model, run_params, steps: int):
    """``prefill(params, extra, prompt)`` and ``decode(params, extra, token, cache)``, jitted once each."""

    @jax.jit
    def prefill(params, extra, prompt_BxT):
        p = run_params(params, extra)
        b, t = prompt_BxT.shape
        cache = model.init_cache(b, t + steps + 1)
        hidden, cache = model.forward(p, prompt_BxT, cache=cache, return_hidden=True, prepend_virtual=True)
        return jnp.argmax(model.head(p, hidden[:, -1]), -1).astype(jnp.int32), cache

    @jax.jit
    def decode(params, extra, token_B, cache):
        p = run_params(params, extra)

        def step(_, carry):
            token_B, cache = carry
            hidden, cache = model.forward(p, token_B[:, None], cache=cache, return_hidden=True,
                                          prepend_virtual=False)
            return jnp.argmax(model.head(p, hidden[:, 0]), -1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, step, (token_B, cache))[0]

    return prefill, decode


def timed_runs(model, runs, prompt_BxT, steps: int, repeats: int) -> dict[str, list[float]]:
    """Each run's decode seconds per round: compiled first, then timed in turn for ``repeats`` rounds."""
    compiled = {}
    for label, params, extra, run_params in runs:
        prefill, decode = make_decoder(model, run_params, steps)
        token, cache = prefill(params, extra, prompt_BxT)
        decode(params, extra, token, cache).block_until_ready()  # compiles: not counted
        compiled[label] = (prefill, decode, params, extra)
    times = {label: [] for label in compiled}
    for round_ in range(repeats):
        order = list(compiled.items())
        for label, (prefill, decode, params, extra) in order if round_ % 2 == 0 else order[::-1]:  # drift cancels
            token, cache = prefill(params, extra, prompt_BxT)
            jax.block_until_ready(cache)
            start = time.perf_counter()
            decode(params, extra, token, cache).block_until_ready()
            times[label].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="all")
    parser.add_argument("--quantize", choices=["nf4"], default=None, help="a 4-bit base (QLoRA serving)")
    parser.add_argument("--strategy", choices=["auto", "dense", "gather"], default="auto",
                        help="how the mixed rows compute their LoRA updates")
    args = parser.parse_args()

    model = llama.model(smollm2_135m(max_position_embeddings=2048, scan_layers=True))
    params = model.init(jax.random.key(0))
    if args.quantize:
        params = quant.quantize(params, TARGETS["all"], args.quantize, model=model)
    targets = TARGETS[args.targets]
    prompt = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 0, model.config.vocab_size)
    ranks = [8 if i % 2 == 0 else 16 for i in range(args.batch)]
    adapters = {f"task{i}": random_lora(model, params, r, targets, seed=10 + 2 * i) for i, r in enumerate(ranks)}
    one_method, one_adapter = random_lora(model, params, 16, targets, seed=3)
    mix = jpeft.MixedAdapters(params, adapters, model=model, strategy=args.strategy)
    rows = jnp.asarray(mix.rows(list(adapters)))

    runs = [("base model", params, None, lambda p, _: p)]
    if not args.quantize:  # merging would dequantize a 4-bit base
        runs.append(("one merged adapter (r=16)", one_method.merge(params, one_adapter), None, lambda p, _: p))
    runs.append(("one unmerged adapter (r=16)", params, one_adapter, one_method.apply))
    runs.append((f"{args.batch} rows, {args.batch} adapters (r={'/'.join(map(str, sorted(set(ranks))))}, slots "
                 f"r={max(ranks)}, {args.strategy})", params,
                 (mix.slots, rows),
                 lambda p, extra: extra[0].apply(p, extra[1])))

    base = "nf4" if args.quantize else "float32"
    print(f"SmolLM2-135M shapes, random weights ({base} base), LoRA on {args.targets} linear layers; "
          f"batch {args.batch}, prompt {args.prompt} tokens, {args.decode} decode steps timed, "
          f"{args.repeats} interleaved rounds; {jax.devices()[0].platform} ({jax.device_count()} device)")
    print("| decoding | tokens/s | vs first row |\n|---|---:|---:|")
    times = timed_runs(model, runs, prompt, args.decode, args.repeats)
    tokens = prompt.shape[0] * args.decode
    first = statistics.median(times[runs[0][0]])
    rows = []
    for label, _, _, _ in runs:
        median = statistics.median(times[label])
        print(f"| {label} | {tokens / median:.1f} | {first / median:.2f} |")
        rows.append({"decoding": label, "tokens_per_s": tokens / median, "vs_base": first / median})
    mixed = times[runs[-1][0]]
    reference = times.get("one merged adapter (r=16)", times["base model"])  # the base when merging is off
    ratios = [ref / mix for ref, mix in zip(reference, mixed)]
    print("per-round mixed/merged: " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"mixed_over_merged_throughput={statistics.median(ratios):.3f}")
    write_record("multi_adapter", {"rows": rows, "rounds": ratios,
                                   "mixed_over_merged_throughput": statistics.median(ratios)})


if __name__ == "__main__":
    main()
