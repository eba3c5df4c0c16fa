"""Peak host memory while loading SmolLM2-135M (GGUF, Q4_1) as float32 and as NF4.

Each load runs in a fresh subprocess (``python load_memory.py --child MODE``), which
reports from ``/proc/self/status``:

* ``before``: VmRSS once jax and jpeft are imported, before loading;
* ``peak``: VmHWM after loading (the kernel's exact high-water mark of the RSS);
* ``anon`` / ``file``: the highest RssAnon and RssFile seen by a thread that samples
  every millisecond during the load (approximate: a short spike can fall between samples).

The GGUF file is memory-mapped by ``gguf.GGUFReader``: every page the loader touches
counts in RSS as file-backed memory (RssFile), up to the file size, until the mapping is
dropped when ``load_gguf`` returns. So ``peak`` includes up to one file size of mapped
pages; ``file`` minus its value before loading shows how much; ``anon`` is the memory the
loader allocated (float buffers, jax arrays, XLA temporaries). ``params`` is
``on_device_size_in_bytes()`` summed over the loaded tree.

Modes: ``float32`` (plain load), ``nf4`` (``quantize="nf4"``: the 7 projections of every
layer; embedding and norms float32), ``nf4-unstacked`` (same, ``scan_layers=False``: one
leaf per layer), and ``float32+quantize`` (load float32, then ``jpeft.quant.quantize``,
then drop the floats: the peak that quantize-on-load avoids).

Run: ``python benchmarks/load_memory.py``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jpeft and train (train is not installed)

from train.records import write_record

MODES = ["float32", "nf4", "nf4-unstacked", "float32+quantize"]
MIB = 2**20


def status() -> dict[str, int]:
    """The ``kB`` fields of ``/proc/self/status``, in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class Sampler(threading.Thread):
    """Polls RssAnon and RssFile every millisecond; keeps their maxima."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.001):
            now = status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])


def child(mode: str) -> None:
    import jax

    from jpeft import assets, quant
    from jpeft.io import load_gguf

    path = assets.smollm2_gguf_path()
    before = status()
    sampler = Sampler()
    sampler.start()
    if mode == "float32+quantize":
        _, params = load_gguf(path, scan_layers=True)
        params = quant.quantize(params, r".*/(q|k|v|o|gate|up|down)_proj/kernel", format="nf4")
    else:
        quantize = None if mode == "float32" else "nf4"
        _, params = load_gguf(path, scan_layers=mode != "nf4-unstacked", quantize=quantize)
    jax.block_until_ready(params)
    sampler.done.set()
    sampler.join()
    after = status()
    print(json.dumps({
        "before": before["VmRSS"], "peak": after["VmHWM"],
        "anon": max(sampler.peak["RssAnon"], after["RssAnon"]) - before["RssAnon"],
        "file": max(sampler.peak["RssFile"], after["RssFile"]) - before["RssFile"],
        "params": sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(params)),
        "file_size": os.path.getsize(path),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    rows = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    size = next(iter(rows.values()))["file_size"]
    print(f"SmolLM2-135M-Instruct.Q4_1.gguf ({size / MIB:.1f} MiB, memory-mapped); MiB, one fresh process per row")
    print(f"{'mode':18s} {'RSS before':>10s} {'peak RSS':>9s} {'peak-before':>11s} "
          f"{'+anon':>7s} {'+file':>7s} {'params':>8s}")
    for mode, r in rows.items():
        print(f"{mode:18s} {r['before'] / MIB:10.1f} {r['peak'] / MIB:9.1f} {(r['peak'] - r['before']) / MIB:11.1f} "
              f"{r['anon'] / MIB:7.1f} {r['file'] / MIB:7.1f} {r['params'] / MIB:8.1f}")
    write_record("load_memory", {"file_size": size, "rows": [
        {"mode": mode, "peak_rss_mib": r["peak"] / MIB, "peak_minus_before_mib": (r["peak"] - r["before"]) / MIB,
         **r} for mode, r in rows.items()]})
    print("+anon / +file: sampled peak growth of RssAnon (allocations) and RssFile (touched pages of the "
          "mapped GGUF) during the load")


if __name__ == "__main__":
    main()
