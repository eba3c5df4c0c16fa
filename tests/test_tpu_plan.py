"""The trainer's step compiled for a TPU slice (v5e:2x2) by libtpu, with no TPU: the planner's figures.

The compiled step's per-chip arguments must be what the shardings say: the frozen
parameters, adapter and optimizer state split over the mesh (computed here from shapes and
shardings alone), plus the batch's and key's shards. TPU pads a scalar (Adam's step count) to a
512-byte tile and lays tiny arrays out in tiles, so the figures are compared to within two
tiles (1 KiB of megabytes). Skipped where libtpu is absent
(``pip install 'jpeft[tpu]'``).
"""

from __future__ import annotations

import jax
import pytest

from train import config, plan

pytestmark = pytest.mark.skipif(not plan.has_libtpu(), reason="libtpu is not installed (pip install 'jpeft[tpu]')")

TINY = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=128)  # every dimension a multiple of TPU's 128-lane tiles: no padding but the scalars'
LAYOUT_SLACK = 2 * 512


@pytest.fixture(scope="module")
def cfg():
    return config.apply_overrides(config.from_dict({"model": {"dtype": "bfloat16"}}), ["lora.rank=128"])


@pytest.mark.parametrize("mesh", ["fsdp=-1", "fsdp=2,tensor=2"])
def test_arguments_are_the_sharded_sizes(cfg, mesh):
    p = plan.plan_step(cfg=cfg, shape=TINY, topology="v5e-4", mesh=mesh, batch=4, seq=128, cost_layers=False)
    assert p.compiled and p.fits and p.chips == 4
    expected = sum(p.expected_arguments.values())
    # frozen / n: the frozen tree's shard is a quarter of it (fsdp 4) or between a quarter and a half (2 x 2)
    frozen_whole = 2 * (2 * 1024 * 512 + 2 * (4 * 512 * 128 + 2 * 2 * 512 * 128 // 2 + 3 * 512 * 1024) + 3 * 512)
    assert p.expected_arguments["frozen"] <= frozen_whole // 2
    assert p.expected_arguments["opt_state"] == 2 * p.expected_arguments["adapter"] + 8  # Adam's mu, nu + counts
    assert abs(p.arguments - expected) <= LAYOUT_SLACK, (p.arguments, p.expected_arguments)
    assert p.host == 0
    assert p.peak == p.arguments + p.outputs - p.aliased + p.temporaries


def test_optimizer_state_offloaded_to_host(cfg):
    off = config.apply_overrides(cfg, ["train.offload_optimizer=true"])
    p = plan.plan_step(cfg=off, shape=TINY, topology="v5e-4", batch=4, seq=128, cost_layers=False)
    on_device = sum(v for k, v in p.expected_arguments.items() if k != "opt_state")
    assert abs(p.host - p.expected_arguments["opt_state"]) <= LAYOUT_SLACK
    assert abs(p.arguments - on_device) <= LAYOUT_SLACK


def test_frozen_base_layers_offloaded_to_host(cfg):
    """The layers' matrices live in host memory (each layer brings its own in); the rest stays in HBM."""
    off = config.apply_overrides(cfg, ["train.offload_frozen=true"])
    p = plan.plan_step(cfg=off, shape=TINY, topology="v5e-4", batch=4, seq=128, cost_layers=False)
    layer_matrices = 2 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1024) * 2 // 4  # bf16, a quarter per chip
    assert p.expected_host == layer_matrices
    assert abs(p.host - p.expected_host) <= LAYOUT_SLACK
    assert abs(p.arguments - (sum(p.expected_arguments.values()) - p.expected_host)) <= LAYOUT_SLACK
    assert p.fits


@pytest.mark.slow
def test_cost_from_one_and_two_layers(cfg):
    """FLOPs per chip grow with the layers as a LoRA step's matmuls do (forward, and dx in the backward pass)."""
    p2 = plan.plan_step(cfg=cfg, shape=TINY, topology="v5e-4", batch=4, seq=128)
    p3 = plan.plan_step(cfg=cfg, shape={**TINY, "num_layers": 3}, topology="v5e-4", batch=4, seq=128)
    per_layer = p3.flops - p2.flops
    tokens = 4 * 128 // 4  # per chip
    layer_weights = 4 * 512 * 128 * 2 + 2 * 512 * 128 + 3 * 512 * 1024  # q, o: 512x512; k, v: 512x256; mlp
    assert 4 * layer_weights * tokens <= per_layer <= 8 * layer_weights * tokens  # ~4 x N x tokens for LoRA
    assert p3.seconds > p2.seconds > 0 and 0 < p2.mfu <= 1


def test_refused_step_reports_what_it_needs(cfg):
    big = {**TINY, "hidden_size": 4096, "intermediate_size": 16384, "num_heads": 32, "num_kv_heads": 8,
           "num_layers": 64, "vocab_size": 32768}
    p = plan.plan_step(cfg=cfg, shape=big, topology="v5e-4", batch=64, seq=2048, cost_layers=False)
    assert not p.fits and not p.compiled and p.needed > p.hbm


def test_unknown_names_are_clear():
    with pytest.raises(plan.PlanError, match="known"):
        plan.tpu_devices("v5e-3")
    with pytest.raises(plan.PlanError, match="llama-3.1-8b"):
        plan.model_of_shape("llama-9", config.from_dict({}))
    assert jax.default_backend() == "cpu"  # the plan needs no TPU


def test_splash_attention_compiles_for_tpu_on_a_sharded_mesh(cfg):
    """The Pallas kernel, not partitioned by XLA, runs per shard (shard_map over rows and key/value heads).

    The planner compiles the trainer's step as ``python -m train`` runs it, with no mesh set
    around it: the step traces under its own mesh."""
    splash = config.apply_overrides(cfg, ["model.attention=splash"])
    p = plan.plan_step(cfg=splash, shape=TINY, topology="v5e-4", mesh="fsdp=2,tensor=2", batch=4, seq=256,
                       cost_layers=False)
    assert p.compiled and p.fits


def test_cost_takes_out_the_unpriced_calls_and_refuses_loops():
    """XLA's TPU cost model prices each ConcatBitcast custom call at -1 s: counted in the HLO and taken out."""

    class Compiled:
        def __init__(self, seconds, text):
            self.seconds, self.text = seconds, text

        def cost_analysis(self):
            return {"flops": 4e12, "optimal_seconds": self.seconds, "bytes accessed": 1e9}

        def as_text(self):
            return self.text

    call = 'custom-call(x), custom_call_target="ConcatBitcast"\n'
    assert plan._cost(Compiled(-2.75, 3 * call)) == (4e12, 0.25, 1e9, "")
    assert "loop" in plan._cost(Compiled(0.5, "%w = while(%t)"))[3]
    assert "came out -3.000" in plan._cost(Compiled(-3.0, call))[3]
    p = plan.Plan("x", 4, {}, "none", 1, peak_flops=200e12, hbm_bandwidth=800e9, flops=4e12, bytes_accessed=8e9)
    assert p.roofline_seconds == 0.02 and p.roofline_mfu == 1.0  # compute-bound: 20 ms of FLOPs, 10 ms of bytes


def test_micro_batches_keep_the_arguments_and_hold_fewer_activations(cfg):
    """Gradient accumulation: the same arguments, one micro-batch's activations alive at a time."""
    whole = plan.plan_step(cfg=cfg, shape=TINY, topology="v5e-4", batch=8, seq=256, cost_layers=False)
    in_parts = config.apply_overrides(cfg, ["train.batch_size=8", "train.micro_batches=2"])
    parts = plan.plan_step(cfg=in_parts, shape=TINY, topology="v5e-4", batch=8, seq=256, cost_layers=False)
    assert parts.compiled and parts.micro_batches == 2
    assert abs(parts.arguments - whole.arguments) <= LAYOUT_SLACK
    assert parts.temporaries < whole.temporaries, (parts.temporaries, whole.temporaries)
    with pytest.raises(plan.PlanError, match="micro-batches"):
        plan.plan_step(cfg=in_parts, shape=TINY, topology="v5e-4", batch=5, seq=128, cost_layers=False)
