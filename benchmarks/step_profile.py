"""Where the train step's memory traffic goes besides the matmuls, read from the compiled program.

Deterministic (no timing): the step of ``benchmarks/step_time.py`` is compiled for each layer
form and remat policy, and its optimized HLO is read for the copies XLA adds around the
matmuls: the stacked residual buffers a scanned step fills with zeros before its loop, the
slices its loop bodies copy out of stacked weights and residuals each layer, and the layout
copies (transposes) elsewhere; ``temp`` is the compiled temporary memory. On CPU these copies
are most of the step's time beyond its matmuls, so a change to the step shows here first.

    python benchmarks/step_profile.py [--methods lora,full] [--variants scan:none,scan:dots,unrolled:none]

Per variant, one line: ``zero_filled_mb``, ``slice_copies_mb`` (all layers), ``layout_copies_mb``,
``temp_mb``, and the compile seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train.records import write_record  # noqa: E402

BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}
OP = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\{[^}]*\} ([\w\-]+)\((.*)$")


def _bytes(dtype: str, dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n * BYTES.get(dtype, 4)


def _computations(text: str) -> dict[str, list[str]]:
    """Each computation's name (``ENTRY`` for the entry) and its instruction lines."""
    found, name = {}, None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            name = "ENTRY" if header.group(1) else header.group(2)
            found[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            found[name].append(line)
    return found


def traffic(hlo_text: str, num_layers: int) -> dict[str, float]:
    """MB written by the copies XLA adds around the matmuls (see the module docstring)."""
    comps = _computations(hlo_text)
    loop_bodies = {m.group(1) for m in re.finditer(r"body=%?([\w.\-]+)", hlo_text)}
    top = [(line, False) for line in comps.get("ENTRY", [])]
    top += [(line, True) for body in loop_bodies for line in comps.get(body, [])]
    zero_filled = slices = layout = 0
    for line, in_loop in top:
        m = OP.match(line)
        if not m:
            continue
        name, dtype, dims, op, rest = m.groups()
        size = _bytes(dtype, dims)
        if op == "copy" and "wrapped_broadcast" in rest:
            zero_filled += size
        elif op == "dynamic-slice" or (op == "fusion" and name.startswith("dynamic-slice")):
            slices += size * (num_layers if in_loop else 1)
        elif op in ("copy", "transpose") or (op == "fusion" and name.startswith(("copy", "transpose"))):
            layout += size * (num_layers if in_loop else 1)
    return {"zero_filled_mb": zero_filled / 1e6, "slice_copies_mb": slices / 1e6, "layout_copies_mb": layout / 1e6}


def profile(method: str, layers: str, remat: str, argv: list[str]) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    import step_time
    from jpeft.models import llama
    from shapes import smollm2_135m

    args = step_time._parse(argv)
    args.method = method
    config = dataclasses.replace(smollm2_135m(scan_layers=layers == "scan", dtype=args.dtype,
                                              param_dtype=args.dtype), remat=remat)
    model = llama.model(config)
    step, adapter, opt_state, frozen = step_time._jpeft_step(args, model, model.abstract_params())
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    start = time.perf_counter()
    compiled = step.lower(adapter, opt_state, frozen, tokens).compile()
    seconds = time.perf_counter() - start
    figures = traffic(compiled.as_text(), config.num_layers)
    figures["temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 1e6
    figures["compile_s"] = seconds
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--variants", default="scan:none,scan:dots,scan:layer_input,unrolled:none,unrolled:dots",
                        help="layer form (scan, unrolled) : remat policy (none, dots, layer_input)")
    known, rest = parser.parse_known_args(argv)
    print(f"{'method':<7}{'layers':<10}{'remat':<13}{'zero-filled MB':>15}{'slice copies MB':>16}"
          f"{'layout copies MB':>17}{'temp MB':>9}{'compile s':>10}")
    rows = []
    for method in known.methods.split(","):
        for variant in known.variants.split(","):
            layers, remat = variant.split(":")
            f = profile(method, layers, remat, rest)
            rows.append({"method": method, "layers": layers, "remat": remat, **f})
            print(f"{method:<7}{layers:<10}{remat:<13}{f['zero_filled_mb']:>15.1f}{f['slice_copies_mb']:>16.1f}"
                  f"{f['layout_copies_mb']:>17.1f}{f['temp_mb']:>9.1f}{f['compile_s']:>10.1f}", flush=True)
    write_record("step_profile", {"rows": rows})


if __name__ == "__main__":
    main()
