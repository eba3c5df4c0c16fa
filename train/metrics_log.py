"""Run outputs: metrics as JSON lines and a loss-curve PNG."""

from __future__ import annotations

import json
import os
from typing import Sequence


class MetricsLog:
    """Appends one JSON object per line to ``<run_dir>/metrics.jsonl`` and keeps them."""

    def __init__(self, path: str, *, resume_step: int | None = None):
        """``resume_step``: keep the file's train/val records up to that step (a resumed run)."""
        self.path = path
        self.records: list[dict] = []
        if resume_step is not None and os.path.isfile(path):
            self.records = [r for r in read_metrics(path, skip_partial=True)
                            if r.get("kind") in ("train", "val") and r["step"] <= resume_step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str, *, skip_partial: bool = False) -> list[dict]:
    """The records of a metrics file; ``skip_partial``: ignore a line cut short by a killed run."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if not skip_partial:
                        raise
    return records


def plot_loss(records: Sequence[dict], path: str, *, title: str = "") -> None:
    """Train loss per step and validation loss points, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["loss"]) for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train (answer tokens)", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
