"""The docs' results pages, tables and plots, generated from the records under ``results/``.

    python scripts/results.py            # reads results/, writes docs/results.md, docs/results/tpu_plan.md,
                                         # docs/results/rows/<family>.md and docs/assets/results/*.png

Every benchmark (``python benchmarks/<name>.py``) and every training job (``python -m train``)
writes a record (:mod:`train.records`); this script takes the newest record of each name
(for ``methods_table``: the newest row of each method) and renders it with the command,
commit, machine and date it came from. Re-running a benchmark and then this script updates
the pages; the history stays in the records. ``--no-figures`` skips the plots (matplotlib).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.records import newest, read_records  # noqa: E402

# Which runs and benchmark rows each method family's page shows (config names, methods_table methods).
FAMILIES = {
    "lora": {"configs": ["smollm2_bbc_lora", "minilm_bbc_lora"], "table": ["lora"], "cost": ["lora"]},
    "reparameterizations": {"configs": ["smollm2_bbc_pissa", "smollm2_bbc_dora"], "table": ["dora", "pissa"],
                            "cost": ["dora"]},
    "qlora": {"configs": ["smollm2_bbc_qlora", "minilm_bbc_qlora"], "table": ["qlora"], "cost": []},
    "input": {"configs": ["smollm2_bbc_prompt_tuning", "smollm2_bbc_prefix_tuning", "smollm2_bbc_p_tuning",
                          "minilm_bbc_prompt_tuning", "minilm_bbc_prefix_tuning", "minilm_bbc_p_tuning"],
              "table": ["prompt_tuning", "prefix_tuning", "p_tuning", "p_tuning_plain"], "cost": []},
    "ia3-bottleneck": {"configs": ["smollm2_bbc_ia3", "smollm2_bbc_bottleneck", "minilm_bbc_ia3",
                                   "minilm_bbc_bottleneck"], "table": ["ia3", "bottleneck"], "cost": []},
    "weight-deltas": {"configs": ["smollm2_bbc_loha", "smollm2_bbc_lokr", "smollm2_bbc_adalora",
                                  "smollm2_bbc_vera", "smollm2_bbc_oft"], "table": ["loha", "lokr", "adalora",
                                                                                   "vera", "oft"],
                      "cost": ["loha", "lokr", "adalora", "vera", "oft"]},
    "selective": {"configs": ["smollm2_bbc_bitfit", "smollm2_bbc_selective", "smollm2_bbc_ulmfit",
                              "smollm2_bbc_pir"], "table": ["bitfit", "selective", "ulmfit", "pir"],
                  "cost": ["bitfit"]},
    "full": {"configs": ["smollm2_bbc_full", "minilm_bbc_full", "minilm_bbc_head"], "table": ["full"],
             "cost": ["full"]},
}
REFERENCE_CONFIG = "smollm2_bbc_lora"  # every family's headline table shows LoRA's row to compare with


# ----------------------------------------------------------------------------- provenance


def provenance(record: dict) -> str:
    """`command`, commit, date, machine (and where the figure was first published, if not run here)."""
    machine = record.get("machine", {})
    machine = machine.get("description", "") if isinstance(machine, dict) else str(machine)
    text = (f"`{record.get('command', '?')}` at commit `{record.get('commit', '?')}`, "
            f"{record.get('date', '?')[:10]}, on {machine}")
    if record.get("source"):
        text += f" (figures from the {record['source']})"
    return text


def _sources(items: list[tuple[str, dict]], verb: str = "Measured") -> list[str]:
    lines = ["", f"{verb} with:", ""]
    lines += [f"- {label}: {provenance(record)}" for label, record in items]
    return lines + [""]


# ----------------------------------------------------------------------------- tables


def _headline_rows(latest: dict, configs: list[str]) -> list[tuple[dict, dict, dict]]:
    """(tuned row, base row or None, record) of each headline-job config that has a record."""
    out = []
    for name in configs:
        record = latest.get(f"train/{name}")
        if record and record["figures"].get("rouge"):
            rows = record["figures"]["rouge"]
            base = rows[0] if len(rows) > 1 else None
            out.append((rows[-1], base, record))
    return out


def headline_table(latest: dict, configs: list[str], *, by_score: bool = False) -> list[str]:
    rows = _headline_rows(latest, configs)
    if by_score:
        rows = sorted(rows, key=lambda t: -t[0]["rouge1"])
    if not rows:
        return []
    lines = ["| method (config) | trainable | % params | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-1 gain |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base_shown = False
    for tuned, base, record in rows:
        if base and not base_shown:
            lines.append(f"| base model | 0 | 0 | {base['rouge1']:.2f} | {base['rouge2']:.2f} | {base['rougeL']:.2f} "
                         "| - |")
            base_shown = True
        gain = f"{tuned['rouge1'] - base['rouge1']:+.2f}" if base else "-"
        config = record["name"].split("/", 1)[1]
        lines.append(f"| {tuned['model']} (`{config}`) | {tuned['trainable']:,} | {tuned['percent']:.3f} "
                     f"| {tuned['rouge1']:.2f} | {tuned['rouge2']:.2f} | {tuned['rougeL']:.2f} | {gain} |")
    return lines + _sources([(r["name"].split("/", 1)[1], r) for _, _, r in rows])


def _table_rows(records: list[dict]) -> dict[str, tuple[dict, dict]]:
    """The newest methods_table row of each method: {method: (row, record)}."""
    out = {}
    for record in records:  # oldest first
        if record["name"] == "methods_table":
            for row in record["figures"]["rows"]:
                out[row["method"]] = (row, record)
    return out


def methods_table(records: list[dict], methods: list[str] | None = None) -> list[str]:
    rows = _table_rows(records)
    chosen = [m for m in (methods or list(rows)) if m in rows]
    if not chosen:
        return []
    base_record = rows[chosen[0]][1]
    lines = [base_record["figures"]["settings"] + ".", "",
             "| method | trainable | % params | adapter on disk | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-1 gain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = base_record["figures"]["base"]
    lines.append(f"| base model | 0 | 0 | - | {base['rouge1']:.2f} | {base['rouge2']:.2f} | {base['rougeL']:.2f} | - |")
    used = {}
    for m in chosen:
        row, record = rows[m]
        used[record.get("command", "") + record.get("commit", "")] = record
        lines.append(f"| {row['label']} | {row['trainable']:,} | {row['percent']:.3f} "
                     f"| {row['adapter_bytes'] / 1024:,.1f} KiB | {row['rouge1']:.2f} | {row['rouge2']:.2f} "
                     f"| {row['rougeL']:.2f} | {row['rouge1'] - record['figures']['base']['rouge1']:+.2f} |")
    return lines + _sources([("rows", r) for r in used.values()])


def classify_table(latest: dict, configs: list[str]) -> list[str]:
    found = [latest[f"train/{c}"] for c in configs if f"train/{c}" in latest
             and "classification" in latest[f"train/{c}"]["figures"]]
    if not found:
        return []
    lines = ["| method (config) | trainable | test accuracy | test macro-F1 |", "|---|---:|---:|---:|"]
    for record in found:
        row = record["figures"]["classification"]
        lines.append(f"| {row['model']} (`{record['name'].split('/', 1)[1]}`) | {row['trainable']:,} "
                     f"| {row['accuracy']:.4f} | {row['macro_f1']:.4f} |")
    return lines + _sources([(r["name"].split("/", 1)[1], r) for r in found])


def cost_table(latest: dict, prefixes: list[str] | None = None) -> list[str]:
    record = latest.get("lora_cost")
    if not record:
        return []
    rows = [r for r in record["figures"]["rows"]
            if prefixes is None or r["step"].startswith("full") or any(r["step"].startswith(p) for p in prefixes)]
    lines = [f"XLA's compiled cost of one train step ({record['figures'].get('shape', '')}):", "",
             "| step | trainable | GFLOPs/step | vs full |", "|---|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['trainable']:,} | {r['gflops']:.1f} | {r['vs_full']:.3f} |" for r in rows]
    return lines + _sources([("the table", record)])


def step_time_table(records: list[dict]) -> list[str]:
    found = [r for r in records if r["name"] == "step_time"]
    if not found:
        return []
    lines = ["| run | layers | method | jpeft step (s) | torch step (s) | jpeft / torch |", "|---|---|---|---|---|---:|"]
    for i, record in enumerate(found, 1):
        f = record["figures"]
        for method in ("lora", "full", "qlora"):
            if method in f and f[method].get("jpeft_over_torch") is not None:
                m = f[method]
                lines.append(f"| {i} | {f.get('layers', '?')} | {method} | {', '.join(f'{x:.2f}' for x in m['jpeft_s'])} "
                             f"| {', '.join(f'{x:.2f}' for x in m['torch_s'])} | {m['jpeft_over_torch']:.2f} |")
    return lines + _sources([(f"run {i}", r) for i, r in enumerate(found, 1)])


def job_step_table(records: list[dict]) -> list[str]:
    found = [r for r in records if r["name"] == "job_step"]
    if not found:
        return []
    lines = ["| run | jpeft step (s) | torch, usual (s) | torch, answer logits only (s) | jpeft / usual | "
             "jpeft / answer-only | first-batch losses (jpeft, usual, answer-only) |", "|---|---|---|---|---:|---:|---|"]
    for i, record in enumerate(found, 1):
        f = record["figures"]
        cell = lambda stack: ", ".join(f"{x:.2f}" for x in f["median_s"].get(stack, [])) or "-"
        ratio = lambda key: f"{f[key]:.2f}" if f.get(key) is not None else "-"
        losses = ", ".join(f"{f['first_loss'][s]:.6f}" for s in ("jpeft", "torch", "torch_best") if s in f["first_loss"])
        lines.append(f"| {i} | {cell('jpeft')} | {cell('torch')} | {cell('torch_best')} | "
                     f"{ratio('jpeft_over_torch_job_step')} | {ratio('jpeft_over_torch_best_job_step')} | {losses} |")
    return lines + _sources([(f"run {i}", r) for i, r in enumerate(found, 1)])


def figures_table(record: dict | None, keys: list[str]) -> list[str]:
    if not record:
        return []
    f = record["figures"]
    lines = ["| figure | value |", "|---|---:|"]
    lines += [f"| `{k}` | {f[k]:.4g} |" if isinstance(f[k], float) else f"| `{k}` | {f[k]} |" for k in keys if k in f]
    return lines + _sources([("figures", record)])


def rows_table(record: dict | None, columns: list[str]) -> list[str]:
    if not record:
        return []
    rows = record["figures"]["rows"]
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return lines + _sources([("the table", record)])


def tpu_plan_table(record: dict | None) -> list[str]:
    """The TPU planner's rows (``benchmarks/tpu_plan.py``): per-chip memory in GiB, FLOPs, XLA's estimate."""
    if not record:
        return []
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = ["| step | mesh | remat | args | temp | host | peak | fits | TFLOP | est s | est MFU | roofline MFU |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for row in record["figures"]["rows"].values():
        mesh = " x ".join(f"{k} {v}" for k, v in row["mesh"].items() if v > 1) or "1"
        cost = (["-"] * 4 if not row["flops"] else
                [f"{row['flops'] / 1e12:.1f}", f"{row['seconds']:.3f}" if row["seconds"] else "-",
                 f"{row['mfu']:.3f}" if row["mfu"] else "-", f"{row['roofline_mfu']:.3f}"])
        memory = ([gib(row["arguments"]), gib(row["temporaries"]), gib(row["host"])] if row["compiled"]
                  else ["-", "-", "-"])
        lines.append("| " + " | ".join([row["label"], mesh, row["remat"], *memory, gib(row["peak"]),
                                        "yes" if row["fits"] else "no", *cost]) + " |")
    return lines + _sources([("the table", record)], verb="Compiled")


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- figures


def figure_names(latest: dict, records: list[dict]) -> list[str]:
    """The plots the records allow (the pages link exactly these)."""
    names = []
    if any(k.startswith("train/smollm2_bbc_") and latest[k]["figures"].get("rouge") for k in latest):
        names += ["rouge_by_method.png", "params_vs_gain.png"]
    if any(r["name"] == "step_time" for r in records):
        names.append("step_time_ratio.png")
    return names


def plot_figures(latest: dict, records: list[dict], out_dir: Path) -> list[str]:
    """ROUGE-1 by method, trainable parameters against ROUGE-1 gain, jpeft/torch step-time ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    configs = sorted(k.split("/", 1)[1] for k in latest if k.startswith("train/smollm2_bbc_"))
    rows = _headline_rows(latest, configs)
    if rows:
        rows = sorted(rows, key=lambda t: t[0]["rouge1"])
        labels = [r["name"].split("smollm2_bbc_", 1)[1] for _, _, r in rows]
        fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.2))
        ax.barh(labels, [t["rouge1"] for t, _, _ in rows], color="#4c72b0")
        base = next((b for _, b, _ in rows if b), None)
        if base:
            ax.axvline(base["rouge1"], color="#c44e52", linestyle="--", label=f"base model {base['rouge1']:.2f}")
            ax.legend(loc="lower right")
        ax.set_xlabel("ROUGE-1 on 64 BBC test articles (SmolLM2-135M, 40 steps)")
        fig.tight_layout()
        fig.savefig(out_dir / "rouge_by_method.png", dpi=110)
        plt.close(fig)
        written.append("rouge_by_method.png")

        with_base = [(t, b, r) for t, b, r in rows if b and t["trainable"] > 0]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.scatter([t["trainable"] for t, _, _ in with_base], [t["rouge1"] - b["rouge1"] for t, b, _ in with_base],
                   color="#4c72b0")
        for t, b, r in with_base:
            ax.annotate(r["name"].split("smollm2_bbc_", 1)[1], (t["trainable"], t["rouge1"] - b["rouge1"]),
                        fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("ROUGE-1 gain over the base model")
        fig.tight_layout()
        fig.savefig(out_dir / "params_vs_gain.png", dpi=110)
        plt.close(fig)
        written.append("params_vs_gain.png")

    runs = [r for r in records if r["name"] == "step_time"]
    if runs:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.38
        for j, method in enumerate(("lora", "full")):
            xs = [i + (j - 0.5) * width for i in range(len(runs))]
            ys = [r["figures"].get(method, {}).get("jpeft_over_torch") or 0 for r in runs]
            ax.bar(xs, ys, width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(runs)), [f"run {i + 1}\n{r['figures'].get('layers', '')}" for i, r in enumerate(runs)])
        ax.set_ylabel("jpeft step / torch step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "step_time_ratio.png", dpi=110)
        plt.close(fig)
        written.append("step_time_ratio.png")
    return written


# ----------------------------------------------------------------------------- pages


def family_snippet(family: str, latest: dict, records: list[dict]) -> str:
    spec = FAMILIES[family]
    headline = [c for c in spec["configs"] if c.startswith("smollm2")]
    if REFERENCE_CONFIG not in headline:
        headline = [REFERENCE_CONFIG] + headline
    parts = []
    table = headline_table(latest, headline)
    if table:
        parts += ["**BBC headlines, full job** (SmolLM2-135M-Instruct, 40 steps of batch 8, ROUGE on 64 test "
                  "articles; LoRA's row for comparison):", "", *table]
    table = methods_table(records, (["lora"] if "lora" not in spec["table"] else []) + spec["table"])
    if table and any(m in _table_rows(records) for m in spec["table"]):
        parts += ["**BBC headlines, reduced job** (`benchmarks/methods_table.py`):", "", *table]
    table = classify_table(latest, [c for c in spec["configs"] if c.startswith("minilm")])
    if table:
        parts += ["**BBC categories** (all-MiniLM-L6-v2, 223 test articles):", "", *table]
    if spec["cost"]:
        table = cost_table(latest, spec["cost"] + ["lora"])
        parts += table
    if not parts:
        parts = ["No record of this family's runs yet: run its config with `python -m train` and then "
                 "`python scripts/results.py`."]
    return "\n".join(parts) + "\n"


def results_page(latest: dict, records: list[dict], figures: list[str]) -> str:
    configs = sorted(k.split("/", 1)[1] for k in latest if k.startswith("train/smollm2_bbc_"))
    out = [
        "# Results",
        "",
        "Every figure on this page is generated by `python scripts/results.py` from the JSON records under "
        "`results/` that the benchmarks and training jobs write; each table says which command, commit and "
        "machine produced it. Figures measured before records existed carry the provenance of the README "
        "that first stated them. Timings from a shared 2-core CPU machine are only comparable within one "
        "back-to-back run; XLA's compiled cost and memory analyses are deterministic.",
        "",
        "## BBC News headlines: every method on the full job",
        "",
        "SmolLM2-135M-Instruct, 1,890 training articles, 40 steps of batch 8, articles cut to 96 tokens, "
        "greedy decoding, ROUGE on 64 test articles. One run each; on 64 articles about a point of ROUGE-1 "
        "is within noise.",
        "",
    ]
    if "rouge_by_method.png" in figures:
        out += ["![ROUGE-1 by method](assets/results/rouge_by_method.png)", ""]
    if "params_vs_gain.png" in figures:
        out += ["![Trainable parameters against ROUGE-1 gain](assets/results/params_vs_gain.png)", ""]
    out += headline_table(latest, configs, by_score=True)
    out += ["## BBC News headlines: the reduced job", "", *methods_table(records)]
    minilm = sorted(k.split("/", 1)[1] for k in latest if k.startswith("train/minilm_bbc_"))
    out += ["## BBC News categories with an encoder", "",
            "all-MiniLM-L6-v2 with a fresh 5-class head trained whole next to the method, 60 steps of 16 "
            "articles, scored on the whole test split (223 articles).", "", *classify_table(latest, minilm)]
    out += ["## Cost of a train step", "", *cost_table(latest)]
    out += ["## 4-bit weights", "",
            *figures_table(latest.get("qlora_memory"), ["nf4_bits_per_param", "qlora_over_bf16_lora_peak_1b"])]
    out += ["## Step time against PyTorch PEFT", "",
            "The same train step (SmolLM2-135M shapes, random weights, batch 4 x 128, AdamW) in jpeft and in "
            "Hugging Face PEFT + torch, one process per stack, alternating; each cell holds the two rounds' "
            "median step times.", ""]
    if "step_time_ratio.png" in figures:
        out += ["![jpeft / torch step-time ratios](assets/results/step_time_ratio.png)", ""]
    out += step_time_table(records)
    profile = latest.get("step_profile")
    if profile:
        out += ["### What the step copies besides its matmuls", "",
                "Read from the compiled step of the table above (`python benchmarks/step_profile.py`, deterministic): "
                "MB written by the residual stacks a scanned step fills with zeros before its loop, by the slices "
                "its loop copies out of stacked weights and residuals (all layers), and by layout copies; the "
                "compiled temporary memory.", "",
                *rows_table(profile, ["method", "layers", "remat", "zero_filled_mb", "slice_copies_mb",
                                      "layout_copies_mb", "temp_mb"])]
    job = job_step_table(records)
    if job:
        out += ["## The default job's step against PyTorch PEFT", "",
                "The step of `configs/smollm2_bbc_lora.yaml` (the trainer's own loop, the job's own first batches) "
                "against Hugging Face PEFT + torch on the same batches and weights: the usual "
                "`model(input_ids, labels=...)` call, which forms logits at every position, and a tuned one that "
                "sends only the answer positions through `lm_head`. Each cell holds the rounds' median step "
                "times; the ratios are the medians of the per-round ratios.", "", *job]
    out += ["## Matmul rates", "", *figures_table(latest.get("matmul_rates"), ["jax_over_torch_matmul_rate"])]
    out += ["## Decoding with many adapters", "",
            *rows_table(latest.get("multi_adapter"), ["decoding", "tokens_per_s", "vs_base"]),
            *figures_table(latest.get("multi_adapter"), ["mixed_over_merged_throughput"])]
    if latest.get("load_memory"):
        out += ["## Loading memory", "", *rows_table(latest.get("load_memory"), ["mode", "peak_rss_mib", "peak_minus_before_mib"])]
    return "\n".join(out).rstrip() + "\n"


def generate(records_dir: str, docs_dir: str, *, figures: bool = True) -> dict[str, str]:
    """Render every results page from the records; returns ``{relative path: markdown}`` (also written)."""
    records = read_records(records_dir)
    latest = newest(records)
    docs = Path(docs_dir)
    if figures:
        plot_figures(latest, records, docs / "assets" / "results")
    pages = {"results.md": results_page(latest, records, figure_names(latest, records))}
    for family in FAMILIES:
        pages[f"results/rows/{family}.md"] = family_snippet(family, latest, records)
    pages["results/tpu_plan.md"] = "\n".join(tpu_plan_table(latest.get("tpu_plan"))) + "\n"
    for rel, text in pages.items():
        path = docs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return pages


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default=str(ROOT / "results"), help="the records folder")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="the docs folder to write into")
    parser.add_argument("--no-figures", action="store_true", help="tables only (no matplotlib)")
    args = parser.parse_args(argv)
    pages = generate(args.records, args.docs, figures=not args.no_figures)
    print("wrote " + ", ".join(os.path.join(args.docs, p) for p in pages))


if __name__ == "__main__":
    main()
