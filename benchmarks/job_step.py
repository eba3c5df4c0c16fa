"""The default job's train step: jpeft's trainer against PyTorch + PEFT on the job's own batches.

The job is ``configs/smollm2_bbc_lora.yaml``: SmolLM2-135M-Instruct in float32, LoRA r=8 on
q, k, v, o, AdamW after global-norm clipping, batches of 8 BBC articles whose loss is the
headline's tokens only. Both stacks start from the same weights (the GGUF jpeft loads, written
out with :func:`jpeft.io.hf.save_hf` for ``transformers``) and run the same first
``--warmup + --batches`` training batches of the job, in order; the last ``--batches`` are timed.

- ``jpeft``: :func:`train.trainer.train_loop`, the loop ``python -m train`` runs, with the job's
  method, task and loss; the step seconds are the ones it logs.
- ``torch``: the usual path, ``model(input_ids, attention_mask, labels=...)``: logits at every
  position over the whole vocabulary, the loss on the answer tokens (``-100`` elsewhere).
- ``torch_best``: the tuned path: the decoder's hidden states, only the answer positions
  through ``lm_head``, then the cross-entropy.

Each stack runs in its own process, alternating jpeft, torch, torch_best, ... for ``--rounds``
rounds; a process reports the median of its timed steps. The first batch's loss of every
stack is printed: with the same weights, tokens and masking they agree (LoRA starts as the
identity in both). The last lines are ``jpeft_over_torch_job_step=<x>`` (against the usual
path) and ``jpeft_over_torch_best_job_step=<x>`` (against the tuned one), each the median of
the per-round ratios.

    python benchmarks/job_step.py [--batches 8] [--warmup 1] [--rounds 2]

Needs the test extra (torch, transformers, peft) and the offline model and data wheels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jpeft and train, not installed ones
sys.path.insert(0, str(ROOT / "benchmarks"))

from train.records import write_record  # noqa: E402
from workers import run_worker  # noqa: E402

MARK = "JOB_STEP_RESULT "
CONFIG = ROOT / "configs" / "smollm2_bbc_lora.yaml"
STACKS = ("jpeft", "torch", "torch_best")


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="timed steps, on the job's batches after the warmup")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (jpeft's first compiles)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of one process per stack")
    parser.add_argument("--stacks", default=",".join(STACKS), help="which of jpeft, torch, torch_best to run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _job_config(steps: int):
    from train import config

    job = config.load_config(str(CONFIG))
    return config.load_config(str(CONFIG), [f"train.steps={steps}", f"train.eval_every={steps}", "progress=false",
                                            f"train.warmup_steps={min(job.train.warmup_steps, steps - 1)}"])


def _task(cfg):
    from train import loading, tasks

    loaded = loading.load(cfg.model)
    return tasks.build(cfg.task, dict(cfg.task_settings), run=cfg, loaded=loaded)


def prepare(args, folder: Path) -> None:
    """The job's batches (``batches.npz``) and its weights in Hugging Face layout (``hf/``) for the torch workers."""
    import numpy as np

    from jpeft.io.hf import save_hf

    steps = args.warmup + args.batches
    task = _task(_job_config(steps))
    batches = task.batches_from(0)
    chosen = [next(batches) for _ in range(steps)]
    np.savez(folder / "batches.npz", **{f"{field}_{i}": np.asarray(getattr(b, field))
                                         for i, b in enumerate(chosen) for field in b._fields})
    save_hf(folder / "hf", task.loaded.model, task.loaded.params)
    shapes = sorted({tuple(b.tokens_BxT.shape) for b in chosen})
    answers = [int(np.asarray(b.loss_mask_BxT).sum()) for b in chosen]
    print(f"{steps} batches of the job (shapes {shapes}; answer tokens per batch {answers})", flush=True)


def _batches(folder: Path, steps: int) -> list[dict]:
    import numpy as np

    saved = np.load(folder / "batches.npz")
    fields = ("tokens_BxT", "targets_BxT", "attention_mask_BxT", "loss_mask_BxT", "answer_positions_BxA")
    return [{field: saved[f"{field}_{i}"] for field in fields} for i in range(steps)]


# ----------------------------------------------------------------------------- jpeft


def jpeft_worker(args, folder: Path) -> dict:
    import jax
    import numpy as np

    from jpeft import lifecycle
    from train import distributed, run, trainer

    steps = args.warmup + args.batches
    cfg = _job_config(steps)
    task = _task(cfg)
    first = next(task.batches_from(0))
    expected = _batches(folder, 1)[0]
    if not np.array_equal(np.asarray(first.tokens_BxT), expected["tokens_BxT"]):
        raise RuntimeError("the trainer's first batch differs from the one the torch workers read")
    model, tokenizer = task.loaded.model, task.loaded.tokenizer
    method = task.with_method(run.make_method(cfg, model, tokenizer))
    begun = lifecycle.start(method, task.loaded.params, jax.random.key(cfg.train.seed),
                            loss_fn=trainer.make_params_loss(model, task.loss_sums), batches=task.batches_from(0))
    records = []
    trainer.train_loop(cfg=cfg.train, method=begun.method, model=model, adapter=begun.adapter, frozen=begun.frozen,
                       batches=task.batches_from, val_batches=task.val_batches, log=records.append, progress=False,
                       mesh=distributed.build_mesh(cfg.mesh), rules=cfg.sharding.rules, sums=task.loss_sums)
    train = [r for r in records if r["kind"] == "train"]
    return {"times": [r["seconds"] for r in train[args.warmup:]], "first_loss": train[0]["loss"]}


# ----------------------------------------------------------------------------- torch


def torch_worker(args, folder: Path, best: bool) -> dict:
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    cfg = _job_config(args.warmup + args.batches)
    lora = dict(cfg.method_settings)
    # The projections the job's target rule matches (its paths look like ``layers/q_proj/kernel``).
    targets = [name for name in ("q", "k", "v", "o", "gate", "up", "down")
               if re.fullmatch(lora["targets"], f"layers/{name}_proj/kernel")]
    if targets != ["q", "k", "v", "o"]:
        raise RuntimeError(f"job_step mirrors LoRA on q, k, v, o; the job's targets are {lora['targets']!r}")
    model = transformers.LlamaForCausalLM.from_pretrained(folder / "hf", torch_dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0, target_modules=[f"{t}_proj" for t in targets]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    base = model.get_base_model()

    def loss_of(batch) -> torch.Tensor:
        tokens = torch.from_numpy(batch["tokens_BxT"]).long()
        mask = torch.from_numpy(batch["attention_mask_BxT"]).long()
        answer = torch.from_numpy(batch["loss_mask_BxT"]) > 0
        targets = torch.from_numpy(batch["targets_BxT"]).long()
        if best:  # only the answer positions reach the vocabulary
            hidden_BxTxD = base.model(input_ids=tokens, attention_mask=mask).last_hidden_state
            logits_NxV = base.lm_head(hidden_BxTxD[answer])
            return torch.nn.functional.cross_entropy(logits_NxV, targets[answer])
        # The usual call. The batch's targets are already the next tokens, so they go in as
        # ``shift_labels`` (transformers would otherwise shift ``labels`` itself).
        labels = torch.where(answer, targets, torch.full_like(targets, -100))
        return model(input_ids=tokens, attention_mask=mask, labels=labels, shift_labels=labels).loss

    times, losses = [], []
    for i, batch in enumerate(_batches(folder, args.warmup + args.batches)):
        start = time.perf_counter()
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"times": times, "first_loss": losses[0], "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def _run_worker(stack: str, folder: Path, argv: list[str]) -> dict:
    return run_worker(__file__, [*argv, "--worker", stack, "--folder", str(folder)], MARK, stack)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.worker:
        folder = Path(args.folder)
        if args.worker == "jpeft":
            result = jpeft_worker(args, folder)
        else:
            result = torch_worker(args, folder, best=args.worker == "torch_best")
        print(MARK + json.dumps(result), flush=True)
        return
    stacks = [s for s in args.stacks.split(",") if s]
    bad = [s for s in stacks if s not in STACKS]
    if bad:
        raise SystemExit(f"--stacks: unknown {bad}; choose from {', '.join(STACKS)}")
    print(f"the default job's step ({CONFIG.name}), {args.batches} timed steps after {args.warmup}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(args, folder)
        for round_index in range(args.rounds):
            for stack in stacks:
                result = _run_worker(stack, folder, argv)
                results.setdefault(stack, []).append(result)
                print(f"round {round_index + 1}: {stack:<11}median step {result['median']:.3f} s, first-batch loss "
                      f"{result['first_loss']:.6f} (load {os.getloadavg()[0]:.1f})", flush=True)
    medians = {stack: [r["median"] for r in rs] for stack, rs in results.items()}
    first_losses = {stack: rs[0]["first_loss"] for stack, rs in results.items()}
    print("\nstack        median step per round (s)")
    for stack, values in medians.items():
        print(f"{stack:<13}{', '.join(f'{v:.3f}' for v in values)}")
    print("first-batch losses: " + ", ".join(f"{s} {v:.6f}" for s, v in first_losses.items()))
    figures = {"batches": args.batches, "warmup": args.warmup, "median_s": medians, "first_loss": first_losses}
    ratios = {}
    for name, peer in (("jpeft_over_torch_job_step", "torch"), ("jpeft_over_torch_best_job_step", "torch_best")):
        if "jpeft" in medians and peer in medians:
            ratios[name] = statistics.median(a / b for a, b in zip(medians["jpeft"], medians[peer]))
    figures.update(ratios)
    write_record("job_step", figures)
    for name, value in ratios.items():
        print(f"{name}={value:.3f}")


if __name__ == "__main__":
    main()
