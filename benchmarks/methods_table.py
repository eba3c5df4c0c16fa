"""Every PEFT method on the same job, one table: SmolLM2-135M-Instruct, BBC News article -> headline.

Runs the base model once (ROUGE only), then each method through the trainer
(:func:`train.run.run`) with the shipped config ``configs/smollm2_bbc_<method>.yaml``
(its method section and learning rate) and the same data, steps, batch size and
test articles for all. The float model is loaded once and shared; QLoRA gets an
NF4 copy loaded once. Prints a markdown table:

method | trainable params (count, %) | adapter on disk | median step / LoRA's | ROUGE-1/2/L | ROUGE-1 gain

* trainable: what the optimizer updates (for P-tuning and projected prefix tuning
  that is the encoder; the saved adapter is the folded prompt/prefix);
* adapter on disk: bytes of the saved adapter folder (orbax files and its JSON record);
* step time: median train-step seconds (compile step excluded) relative to LoRA's in
  this same run, so machine load cancels out as far as it can.

The defaults are reduced to fit ~30-40 minutes on a busy 2-core CPU (30 steps,
32 test articles); the table header says which settings were used.

Run: ``python benchmarks/methods_table.py [--steps 30 --test-articles 32 --full]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import loading, run, tasks  # noqa: E402
from train.config import apply_overrides, load_config  # noqa: E402
from train.records import write_record  # noqa: E402

# Row name -> (shipped config, overrides). p_tuning_plain is P-tuning as Hugging Face PEFT
# builds it (random input embeddings, no residual), at the best of the learning rates tried.
METHODS = {
    "lora": ("lora", []),
    "qlora": ("qlora", []),
    "dora": ("dora", []),
    "pissa": ("pissa", []),
    "prompt_tuning": ("prompt_tuning", []),
    "prefix_tuning": ("prefix_tuning", []),
    "p_tuning": ("p_tuning", []),
    "p_tuning_plain": ("p_tuning", ["p_tuning.residual=false", "p_tuning.init=normal", "p_tuning.init_text=null",
                                   "train.lr=3e-3"]),
    "ia3": ("ia3", []),
    "bottleneck": ("bottleneck", []),
    "bitfit": ("bitfit", []),
    "selective": ("selective", []),
    "ulmfit": ("ulmfit", []),
    "pir": ("pir", []),
    "loha": ("loha", []),
    "lokr": ("lokr", []),
    "adalora": ("adalora", []),
    "vera": ("vera", []),
    "oft": ("oft", []),
    "full": ("full", []),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="train steps per method")
    p.add_argument("--test-articles", type=int, default=32, help="ROUGE test articles")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-article-tokens", type=int, default=96)
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "full"], choices=list(METHODS))
    p.add_argument("--full", action="store_true", help="also full fine-tuning (slow on CPU)")
    p.add_argument("--out-dir", default="runs/methods_table")
    return p.parse_args(argv)


def method_config(name: str, common: list[str], out_dir: str):
    """The shipped config of row ``name`` with the shared settings and the row's overrides."""
    config_name, overrides = METHODS[name]
    path = REPO / "configs" / f"smollm2_bbc_{config_name}.yaml"
    return load_config(str(path), [*common, *overrides, f"run_dir={os.path.join(out_dir, name)}"])


def folder_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def markdown_table(rows: list[dict], base: dict, header: str) -> str:
    """The results as a markdown table (``rows``: one dict per method)."""
    lora_step = next((r["median_step"] for r in rows if r["method"] == "lora"), None)
    lines = [header, "",
             "| method | trainable params | % of model | adapter on disk | step time vs LoRA "
             "| ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-1 gain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| base (no training) | 0 | 0 | - | - | {base['rouge1']:.2f} | {base['rouge2']:.2f} "
             f"| {base['rougeL']:.2f} | - |"]
    for r in rows:
        rel = f"{r['median_step'] / lora_step:.2f}x" if lora_step else f"{r['median_step']:.2f}s"
        lines.append(
            f"| {r['label']} | {r['trainable']:,} | {r['percent']:.3f}% | {r['adapter_bytes'] / 1024:,.1f} KiB "
            f"| {rel} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} "
            f"| {r['rouge1'] - base['rouge1']:+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.methods + (["full"] if args.full else [])))
    out_dir = os.path.join(args.out_dir, time.strftime("%Y%m%d-%H%M%S"))
    common = [
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.warmup_steps={max(1, args.steps // 10)}", f"train.eval_every={args.steps}", "train.val_batches=1",
        f"eval.test_articles={args.test_articles}", "eval.base_model=false",
        f"data.max_article_tokens={args.max_article_tokens}", "progress=false",
    ]
    start = time.perf_counter()
    configs = {name: method_config(name, common, out_dir) for name in names}  # all valid before any work

    float_cfg = next((c for n, c in configs.items() if c.model.quantize is None), None)
    float_cfg = float_cfg or apply_overrides(configs[names[0]], ["model.quantize=null"])
    loaded = {None: loading.load(float_cfg.model)}
    for cfg in configs.values():
        if cfg.model.quantize not in loaded:
            loaded[cfg.model.quantize] = loading.load(cfg.model)

    base_cfg = apply_overrides(float_cfg, [f"run_dir={os.path.join(out_dir, 'base')}"])
    os.makedirs(base_cfg.run_dir, exist_ok=True)
    task = tasks.build(base_cfg.task, dict(base_cfg.task_settings), run=base_cfg, loaded=loaded[None])
    base = task.evaluate("base", loaded[None].params, base_cfg.run_dir, trainable=0, percent=0.0)

    rows = []
    for name, cfg in configs.items():
        print(f"\n=== {name} (lr {cfg.train.lr:g}) ===", flush=True)
        summary = run.run(cfg, loaded=loaded[cfg.model.quantize])
        tuned = summary["rouge"][-1]
        rows.append({"method": name, "label": tuned["model"],
                     **tuned, "median_step": summary["timings_s"]["median_step"],
                     "adapter_bytes": folder_bytes(os.path.join(summary["run_dir"], "adapter"))})

    minutes = (time.perf_counter() - start) / 60
    header = (f"SmolLM2-135M-Instruct, BBC News headlines; reduced settings: {args.steps} steps x batch "
              f"{args.batch_size}, articles cut to {args.max_article_tokens} tokens, ROUGE on {args.test_articles} "
              f"test articles (greedy); lr: " + ", ".join(f"{n} {c.train.lr:g}" for n, c in configs.items()) + "; "
              f"whole run {minutes:.1f} min")
    table = markdown_table(rows, base, header)
    print("\n" + table)
    with open(os.path.join(out_dir, "methods_table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(f"\n(written to {os.path.join(out_dir, 'methods_table.md')}; runs under {out_dir})")
    print("median step seconds: " + ", ".join(f"{r['method']} {r['median_step']:.2f}" for r in rows))
    print("lr: " + ", ".join(f"{n} {c.train.lr:g}" for n, c in configs.items()))
    write_record("methods_table", {"settings": header, "base": base, "rows": rows})


if __name__ == "__main__":
    main()
