"""The train step planned for TPU slices: 8B and 70B QLoRA, 8B full fine-tuning with Adam's state on host, 8B LoRA.

Every figure is XLA's TPU compiler's (libtpu from PyPI, no TPU present), per chip, for the
step ``python -m train`` runs (:func:`train.trainer.make_train_step`), built by
:mod:`train.plan` from published shapes (``configs/shapes/published.yaml``) with no weights
read. Global batch 8 x 2048 tokens, every token a loss position; LoRA r=16 on all seven
projections, AdamW, bfloat16 compute; each layer keeps only its input for the backward pass
(``model.remat=layer_input``), blockwise attention (what ``attention: auto`` is on TPU), the
loss projected 1024 rows at a time (``train.loss_chunk=1024``). Peak = arguments + outputs not
aliased to donated arguments + temporaries. The MFU is an estimate: compiled FLOPs over XLA's
estimated step time (``optimal_seconds``, read as :func:`train.plan.step_cost` says) times the chip's
peak bf16 FLOP/s; beside it a roofline estimate (not XLA's): FLOPs over the longer of FLOPs at peak
and the cost analysis's bytes accessed at HBM bandwidth. Both are computed for the 8B LoRA step only
(two more compiles each), once with the blockwise attention (priced as the dense form) and once with
the Pallas splash kernel (``model.attention=splash``), and for LoRA on ``q_proj`` alone with the splash
kernel (what the low-rank products of the other six projections cost); the other rows show memory,
among them 70B QLoRA with the base's layer matrices in host memory (``train.offload_frozen``).

Run: ``python benchmarks/tpu_plan.py`` (needs ``pip install 'jpeft[tpu]'``; several minutes of compiling).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import config, plan  # noqa: E402
from train.records import write_record  # noqa: E402

LORA = ["lora.rank=16", "lora.alpha=32", "lora.targets=.*/(q|k|v|o|gate|up|down)_proj/kernel"]
STEP = ["model.dtype=bfloat16", "model.remat=layer_input", "train.loss_chunk=1024"]


def cfg(*overrides: str):
    return config.apply_overrides(config.from_dict({}), [*STEP, *overrides])


def main() -> None:
    print(plan.UNITS)
    print(plan.HEADER)
    runs = {
        "8b_qlora_v5e_4": dict(cfg=cfg(*LORA, "model.quantize=nf4"), shape="llama-3.1-8b", topology="v5e-4",
                               label="8B QLoRA (nf4+dq)"),
        "70b_qlora_v5e_8": dict(cfg=cfg(*LORA, "model.quantize=nf4"), shape="llama-3.1-70b", topology="v5e-8",
                                label="70B QLoRA (nf4+dq)"),
        "8b_full_v5e_8_offload": dict(cfg=cfg("method=full", "train.offload_optimizer=true"), shape="llama-3.1-8b",
                                      topology="v5e-8", param_dtype="float32", label="8B full, Adam on host"),
        "8b_full_v5e_8": dict(cfg=cfg("method=full"), shape="llama-3.1-8b", topology="v5e-8", param_dtype="float32",
                              label="8B full, Adam in HBM"),
        "8b_lora_v5e_8": dict(cfg=cfg(*LORA), shape="llama-3.1-8b", topology="v5e-8", label="8B LoRA (bf16 base)",
                              cost_layers=True),
        "8b_lora_splash_v5e_8": dict(cfg=cfg(*LORA, "model.attention=splash"), shape="llama-3.1-8b",
                                     topology="v5e-8", label="8B LoRA (bf16 base), splash", cost_layers=True),
        # The same step with LoRA on q_proj alone: what the low-rank products of the other six cost.
        "8b_lora_q_splash_v5e_8": dict(cfg=cfg(*LORA, "lora.targets=.*/q_proj/kernel", "model.attention=splash"),
                                       shape="llama-3.1-8b", topology="v5e-8",
                                       label="8B LoRA q_proj only, splash", cost_layers=True),
        "70b_qlora_v5e_8_base_on_host": dict(cfg=cfg(*LORA, "model.quantize=nf4", "train.offload_frozen=true"),
                                             shape="llama-3.1-70b", topology="v5e-8",
                                             label="70B QLoRA, base on host"),
    }
    plans = {}
    for name, kwargs in runs.items():
        plans[name] = plan.plan_step(batch=8, seq=2048, **{"cost_layers": False, **kwargs})
        print(plans[name].row(), flush=True)
    gib = lambda p: f"{p.peak / plan.GIB:.2f}"
    lora = plans["8b_lora_v5e_8"]
    # Figures beside the four lines the step is held to (which come last).
    print(f"plan_8b_lora_v5e_8_roofline_mfu={lora.roofline_mfu:.3f} (roofline estimate, not XLA's: "
          f"{lora.flops / 1e12:.1f} TFLOP and {lora.bytes_accessed / 1e9:.0f} GB accessed per chip at "
          f"{lora.peak_flops / 1e12:.0f} TFLOP/s and {lora.hbm_bandwidth / 1e9:.0f} GB/s: "
          f"{lora.roofline_seconds:.3f} s)")
    for name, what in (("8b_lora_splash_v5e_8", "seven projections"), ("8b_lora_q_splash_v5e_8", "q_proj only")):
        p = plans[name]
        if p.seconds > 0:
            print(f"plan_{name}_est_mfu={p.mfu:.3f} (XLA's estimate, LoRA on {what}, with the splash kernel, whose "
                  f"products it does not count: {p.flops / 1e12:.1f} TFLOP per chip in {p.seconds:.3f} s)")
    on_host = plans["70b_qlora_v5e_8_base_on_host"]
    print(f"plan_70b_qlora_v5e_8_base_on_host_peak_gib={gib(on_host)} (host: {on_host.host / plan.GIB:.2f} GiB of "
          f"layer matrices)")
    print(f"plan_8b_qlora_v5e_4_peak_gib={gib(plans['8b_qlora_v5e_4'])}")
    print(f"plan_70b_qlora_v5e_8_peak_gib={gib(plans['70b_qlora_v5e_8'])}")
    print(f"plan_8b_full_v5e_8_offload_peak_gib={gib(plans['8b_full_v5e_8_offload'])} "
          f"(without offload: {gib(plans['8b_full_v5e_8'])}, fits: {plans['8b_full_v5e_8'].fits})")
    if lora.seconds > 0:
        print(f"plan_8b_lora_v5e_8_est_mfu={lora.mfu:.3f} (XLA's estimate: {lora.flops / 1e12:.1f} TFLOP per chip in "
              f"{lora.seconds:.3f} s)")
    else:
        print(f"plan_8b_lora_v5e_8_est_mfu=none ({lora.cost_note})")
    write_record("tpu_plan", {
        "batch": [8, 2048], "settings": [*STEP, *LORA],
        "rows": {name: {**{k: v for k, v in dataclasses.asdict(p).items()
                           if k not in ("expected_arguments", "expected_host")},
                        "peak": p.peak, "fits": p.fits, "mfu": p.mfu if p.seconds > 0 else None,
                        "roofline_mfu": p.roofline_mfu if p.flops else None}
                 for name, p in plans.items()}})


if __name__ == "__main__":
    main()
