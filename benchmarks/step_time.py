"""One train step of jpeft against Hugging Face PEFT + torch, and against the machine's FLOP floor.

The step is the same in both stacks: SmolLM2-135M's shapes with random weights (no
download), a batch of random tokens, next-token cross-entropy over the full
vocabulary at every position, the gradient, and one AdamW update. LoRA (rank 8,
alpha 16, on q, k, v, o by default) or full fine-tuning. Each stack runs in its own
process, alternating jpeft, torch, jpeft, torch, ...; each process times ``--steps``
steps after ``--warmup`` and reports their median.

The floor: XLA's compiled cost analysis gives the FLOPs of jpeft's step; a float32
matmul at the step's own shapes, timed in the same process, gives the machine's rate.
``step_over_flop_floor`` is the step's median time over ``FLOPs / rate``.

    python benchmarks/step_time.py [--methods lora,full] [--rounds 2] [--batch 4] [--seq 128]
        [--rank 8] [--targets q,k,v,o] [--dtype float32] [--quantize nf4] [--layers scan|unrolled]
        [--remat none|dots|layer_input]

jpeft's step is the trainer's: scanned layers with the trainer's ``model.remat`` unless
``--layers`` / ``--remat`` say otherwise; its loss is :func:`jpeft.losses.token_xent`.

With ``--quantize nf4`` (or int4) jpeft's frozen projections are 4-bit (QLoRA); torch has
no CPU 4-bit path, so that row is jpeft's alone and its ratio is against jpeft's LoRA step.
Per method the figures are ``step_over_flop_floor_<method>=`` and
``jpeft_over_torch_<method>_step=`` (the median of the per-round ratios); the last two
lines are LoRA's: ``step_over_flop_floor=<ratio>`` and ``jpeft_over_torch_lora_step=<ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jpeft, not an installed one
sys.path.insert(0, str(ROOT / "benchmarks"))

from train.records import write_record  # noqa: E402
from workers import run_worker  # noqa: E402

MARK = "STEP_TIME_RESULT "


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of one process per stack")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q,k,v,o", help="projection names LoRA adapts")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--layers", default="scan", choices=("scan", "unrolled"),
                        help="jpeft's layers: one scanned body (the trainer's default) or unrolled")
    parser.add_argument("--remat", default=None, choices=(None, "none", "dots", "layer_input"),
                        help="what each jpeft layer keeps for the backward pass (default: the trainer's model.remat)")
    parser.add_argument("--quantize", default=None, choices=(None, "nf4", "int4", "int8"),
                        help="also time QLoRA: jpeft's frozen projections in this format")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--stacks", default="jpeft,torch", help="which stacks to run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _remat(args) -> str:
    """``--remat``, else the trainer's default ``model.remat`` (the step ``python -m train`` runs)."""
    from train.sections import ModelConfig

    return args.remat or ModelConfig().remat


def _tokens(args):
    import numpy as np

    from shapes import smollm2_135m
    vocab = smollm2_135m().vocab_size
    return np.random.default_rng(0).integers(0, vocab, size=(args.batch, args.seq), dtype=np.int32)


def _timed(step, n_warmup: int, n_steps: int) -> list[float]:
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- jpeft


def _matmul_rate(m: int, shapes: list[tuple[int, int]], dtype) -> float:
    """FLOP/s of the fastest of ``(m, k) @ (k, n)`` for ``(k, n)`` in ``shapes`` (best of 5 runs each:
    the machine's rate when nothing else disturbs it, so the floor is the lowest it can be)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for k, n in shapes:
        a = jax.random.normal(jax.random.key(1), (m, k), dtype)
        b = jax.random.normal(jax.random.key(2), (k, n), dtype)
        matmul = jax.jit(jnp.matmul)
        times = _timed(lambda: matmul(a, b).block_until_ready(), 2, 5)
        best = max(best, 2.0 * m * k * n / min(times))
    return best


def _jpeft_step(args, model, params):
    """``(step, adapter, opt_state, frozen)`` for ``params`` (arrays or ``ShapeDtypeStruct``)."""
    import jax
    import optax

    import jpeft
    from jpeft import losses, quant

    key = jax.random.key(0)
    abstract = isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
    run = (lambda f, *a: jax.eval_shape(f, *a)) if abstract else (lambda f, *a: f(*a))
    targets = rf".*/({'|'.join(args.targets.split(','))})_proj/kernel"
    if args.method == "qlora":
        params = run(lambda p: quant.quantize(p, r".*_proj/kernel", format=args.quantize, model=model), params)
    if args.method == "full":
        method = jpeft.full()
    else:
        method = jpeft.lora(rank=args.rank, alpha=2 * args.rank, targets=targets, model=model)
    adapter = run(method.init, key, params)
    frozen = jpeft.tree.without(params, adapter) if args.method == "full" else params
    optimizer = optax.adamw(1e-4)
    opt_state = run(optimizer.init, adapter)

    def loss_fn(adapter, frozen, tokens_BxT):
        # Only the positions that have a next token are projected onto the vocabulary
        # (slicing the logits instead would copy B x T x V floats).
        params = method.apply(frozen, adapter)
        hidden_BxTxD, _ = model.forward(params, tokens_BxT, return_hidden=True)
        logits_BxTxV = model.head(params, hidden_BxTxD[:, :-1])
        b, t, v = logits_BxTxV.shape
        return losses.token_xent(logits_BxTxV.reshape(b * t, v), tokens_BxT[:, 1:].reshape(-1)).mean()

    def step(adapter, opt_state, frozen, tokens_BxT):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, frozen, tokens_BxT)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), adapter, opt_state, frozen


def _step_flops(args, config) -> float:
    """XLA's FLOPs of the whole step. Cost analysis counts a loop body once, so they come from
    the step with 1 and 2 unrolled layers: ``f(L) = f(1) + (L - 1) * (f(2) - f(1))``."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jpeft.models import llama

    flops = []
    for layers in (1, 2):
        model = llama.model(dataclasses.replace(config, num_layers=layers, scan_layers=False))
        step, adapter, opt_state, frozen = _jpeft_step(args, model, model.abstract_params())
        tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
        cost = step.lower(adapter, opt_state, frozen, tokens).compile().cost_analysis()
        flops.append(float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]))
    return flops[0] + (config.num_layers - 1) * (flops[1] - flops[0])


def jpeft_worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jpeft.models import llama
    from shapes import smollm2_135m

    config = smollm2_135m(scan_layers=args.layers == "scan", dtype=args.dtype, param_dtype=args.dtype,
                          remat=_remat(args))
    model = llama.model(config)
    params = jax.jit(model.init)(jax.random.key(0))
    step, adapter, opt_state, frozen = _jpeft_step(args, model, params)
    tokens_BxT = jnp.asarray(_tokens(args))
    compiled = step.lower(adapter, opt_state, frozen, tokens_BxT).compile()
    state = {"adapter": adapter, "opt_state": opt_state}

    def run():
        state["adapter"], state["opt_state"], loss = compiled(state["adapter"], state["opt_state"], frozen,
                                                             tokens_BxT)
        loss.block_until_ready()

    times = _timed(run, args.warmup, args.steps)
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    rate = _matmul_rate(args.batch * args.seq, [(d, f), (d, v)], jnp.dtype(args.dtype))
    return {"times": times, "flops": _step_flops(args, config), "matmul_rate": rate}


# ----------------------------------------------------------------------------- torch


def torch_worker(args) -> dict:
    import torch
    import transformers

    from shapes import smollm2_135m

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    c = smollm2_135m()
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    if args.method == "lora":
        import peft
        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                               target_modules=[f"{name}_proj" for name in args.targets.split(",")])
        model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.from_numpy(_tokens(args)).long()

    def run():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"times": _timed(run, args.warmup, args.steps), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def _run_worker(stack: str, method: str, argv: list[str]) -> dict:
    return run_worker(__file__, [*argv, "--worker", stack, "--method", method], MARK, f"{stack} {method}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.worker:
        result = (jpeft_worker if args.worker == "jpeft" else torch_worker)(args)
        print(MARK + json.dumps(result), flush=True)
        return
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in ("lora", "full")]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from lora, full")
    if args.quantize:
        methods.append("qlora")
    stacks = [s for s in args.stacks.split(",") if s]
    print(f"SmolLM2-135M shapes ({args.layers} layers in jpeft, remat {_remat(args)}), batch {args.batch} x seq {args.seq}, {args.dtype}, "
          f"LoRA r={args.rank} on "
          f"{args.targets}; median of {args.steps} steps after {args.warmup}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for method in methods:
            for stack in stacks:
                if stack == "torch" and method == "qlora":
                    continue
                result = _run_worker(stack, method, argv)
                results.setdefault((stack, method), []).append(result)
                print(f"round {round_index + 1}: {stack:<6}{method:<6}median step {result['median']:.3f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    summary, figures = {}, {"layers": args.layers, "remat": _remat(args), "batch": args.batch, "seq": args.seq}
    print(f"\n{'method':<8}{'jpeft s':>18}{'torch s':>18}{'ratio':>8}{'floor s':>9}{'over floor':>11}")
    for method in methods:
        ours, theirs = results.get(("jpeft", method), []), results.get(("torch", method), [])
        ratios = [a["median"] / b["median"] for a, b in zip(ours, theirs)]
        floors = [r["flops"] / r["matmul_rate"] for r in ours]
        over_floor = [r["median"] / f for r, f in zip(ours, floors)]
        fmt = lambda rs: ", ".join(f"{r['median']:.2f}" for r in rs) or "-"
        ratio = statistics.median(ratios) if ratios else None
        floor = statistics.median(floors) if floors else None
        print(f"{method:<8}{fmt(ours):>18}{fmt(theirs):>18}{(f'{ratio:.3f}' if ratio else '-'):>8}"
              f"{(f'{floor:.2f}' if floor else '-'):>9}"
              f"{(f'{statistics.median(over_floor):.3f}' if over_floor else '-'):>11}")
        if ours:
            print(f"    jpeft step {ours[0]['flops'] / 1e9:.1f} GFLOPs (XLA), matmul rate "
                  f"{statistics.median(r['matmul_rate'] for r in ours) / 1e9:.1f} GFLOP/s")
        summary[method] = (ratio, statistics.median(over_floor) if over_floor else None)
        figures[method] = {"jpeft_s": [r["median"] for r in ours], "torch_s": [r["median"] for r in theirs],
                           "jpeft_over_torch": ratio, "over_floor": summary[method][1],
                           "gflops": ours[0]["flops"] / 1e9 if ours else None}
    if "qlora" in summary and ("jpeft", "lora") in results:
        q = statistics.median(r["median"] for r in results[("jpeft", "qlora")])
        l = statistics.median(r["median"] for r in results[("jpeft", "lora")])
        print(f"qlora_over_lora_step={q / l:.3f}")
    for method in [m for m in methods if m != "lora"] + (["lora"] if "lora" in methods else []):
        ratio, over_floor = summary[method]
        suffix = "" if method == "lora" else f"_{method}"
        if over_floor is not None:
            print(f"step_over_flop_floor{suffix}={over_floor:.3f}")
        if ratio is not None:
            print(f"jpeft_over_torch_{method}_step={ratio:.3f}")
    write_record("step_time", figures)


if __name__ == "__main__":
    main()
