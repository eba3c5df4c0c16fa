"""float32 matmul rates of XLA (jax) and torch at the products of a SmolLM2-135M train step.

A train step's time is mostly its matmuls (``step_time.py``), so this asks how fast each
stack runs them, at the step's own shapes (tokens ``m = batch x seq``):

* ``fwd``: ``x (m, in) @ W (in, out)``;
* ``dx``: ``dy (m, out) @ W.T`` (the backward pass through a frozen weight);
* ``dW``: ``x.T @ dy`` (a trained weight's gradient);
* each in the layout the stack keeps: jpeft's Dense kernels are ``(in, out)``, torch's
  ``nn.Linear`` weights ``(out, in)``; the tied head is a ``(vocab, dim)`` table in both;
* ``fwd x30 scanned``: thirty different weights, one after another in a ``lax.scan`` (jax
  only): the weights are not already in cache, as in a real step;
* ``fwd x30 unrolled``: the same thirty products with no dependency between them: XLA's
  runtime may run them concurrently on the same cores.

Each stack runs in its own process, alternating jax, torch, jax, torch (``--rounds``); a
figure is the median of ``--repeats`` timed calls after one warm-up. torch uses as many
threads as there are cores.

    python benchmarks/matmul_rates.py [--rounds 2] [--tokens 512] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jpeft and train (train is not installed)

from step_time import _timed

from train.records import write_record

MARK = "RESULT "
# (in, out) of each projection of SmolLM2-135M: q and o, k and v, gate and up, down, the tied head.
SHAPES = {"q,o": (576, 576), "k,v": (576, 192), "gate,up": (576, 1536), "down": (1536, 576),
          "head": (576, 49152)}
LAYERS = 30


def _median_seconds(fn, repeats: int) -> float:
    return statistics.median(_timed(fn, 1, repeats))


def jax_worker(m: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    out = {}
    for name, (d_in, d_out) in SHAPES.items():
        x, dy = normal(m, d_in), normal(m, d_out)
        if name == "head":  # the tied head uses the (vocab, dim) embedding table, as nn.Linear holds W
            w = normal(d_out, d_in)
            products = {"fwd": (jax.jit(lambda x, w: x @ w.T), x, w),
                        "dx": (jax.jit(lambda dy, w: dy @ w), dy, w),
                        "dW": (jax.jit(lambda dy, x: dy.T @ x), dy, x)}
        else:  # a Dense kernel is (in, out)
            w = normal(d_in, d_out)
            products = {"fwd": (jax.jit(lambda x, w: x @ w), x, w),
                        "dx": (jax.jit(lambda dy, w: dy @ w.T), dy, w),
                        "dW": (jax.jit(lambda x, dy: x.T @ dy), x, dy)}
        if name != "head":
            w_stack = normal(LAYERS, d_in, d_out)
            products[f"fwd x{LAYERS} scanned"] = (
                jax.jit(lambda x, ws: jax.lax.scan(lambda c, w: (c, x @ w), 0.0, ws)[1]), x, w_stack)
            products[f"fwd x{LAYERS} unrolled"] = (
                jax.jit(lambda x, ws: jnp.stack([x @ ws[i] for i in range(LAYERS)])), x, w_stack)
        for kind, (fn, a, b) in products.items():
            count = LAYERS if "x30" in kind else 1
            seconds = _median_seconds(lambda: fn(a, b).block_until_ready(), repeats)
            out[f"{name} {kind}"] = count * 2 * m * d_in * d_out / seconds
    return out


def torch_worker(m: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    out = {}
    with torch.no_grad():
        for name, (d_in, d_out) in SHAPES.items():
            # nn.Linear keeps W as (out, in): forward is x @ W.T, dx is dy @ W, dW is dy.T @ x
            x, w, dy = torch.randn(m, d_in), torch.randn(d_out, d_in), torch.randn(m, d_out)
            products = {"fwd": lambda: x @ w.T, "dx": lambda: dy @ w, "dW": lambda: dy.T @ x}
            for kind, fn in products.items():
                out[f"{name} {kind}"] = 2 * m * d_in * d_out / _median_seconds(fn, repeats)
    return out


def _run(stack: str, argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv, "--worker", stack], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {stack} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of one process per stack")
    parser.add_argument("--tokens", type=int, default=512, help="rows of x: batch x sequence")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per product")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker = jax_worker if args.worker == "jax" else torch_worker
        print(MARK + json.dumps(worker(args.tokens, args.repeats)), flush=True)
        return
    runs: dict[str, list[dict]] = {"jax": [], "torch": []}
    for _ in range(args.rounds):
        for stack in runs:
            runs[stack].append(_run(stack, argv))
    print(f"float32 matmul GFLOP/s, {args.tokens} tokens, {os.cpu_count()} cores; each cell: one figure per "
          f"round (alternating processes)")
    print(f"{'product':<28}{'jax (XLA)':>22}{'torch':>22}")
    for key in runs["jax"][0]:
        cell = lambda stack: ", ".join(f"{r[key] / 1e9:.0f}" for r in runs[stack] if key in r) or "-"
        print(f"{key:<28}{cell('jax'):>22}{cell('torch'):>22}")
    rate = lambda stack, key: statistics.median(r[key] for r in runs[stack])
    ratio = statistics.median(rate("jax", key) / rate("torch", key) for key in runs["torch"][0])
    print(f"jax_over_torch_matmul_rate={ratio:.3f}")
    write_record("matmul_rates", {"jax_over_torch_matmul_rate": ratio, "runs": runs})


if __name__ == "__main__":
    main()
