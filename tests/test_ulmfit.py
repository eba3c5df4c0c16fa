"""ULMFiT: discriminative rates, the slanted triangular schedule, gradual unfreezing in the trainer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import analysis, lifecycle, tree
from jpeft.methods.base import Training
from jpeft.methods import registry
from jpeft.models import llama
from train import trainer
from train.config import TrainConfig
from train.data import TrainBatch
from train.tasks.headlines import answer_xent

from reference import numpy_params

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                           num_kv_heads=2, tie_word_embeddings=True)
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)


def _nbytes(x) -> int:
    """Bytes of a tree of arrays or shapes."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(x))


def _group_of(path: str, num_layers: int = 3, per_group: int = 1) -> int:
    """The expected group, written out: top layers first, the final norm with them, the embedding last."""
    head = path.split("/")[0]
    if head.startswith("layers_"):
        return (num_layers - 1 - int(head.split("_")[1])) // per_group
    return -(-num_layers // per_group) if head == "embed_tokens" else 0


@pytest.mark.parametrize("per_group", [2])  # 3 layers: groups {2, 1}, {0}, the embedding
def test_discriminative_rates_scale_updates_group_by_group(per_group):
    model = llama.model(dataclasses.replace(CONFIG, scan_layers=True))
    params = numpy_params(model)
    method = jpeft.ulmfit(layers_per_group=per_group, model=model)  # every group, no unfreezing
    adapter = method.init(None, params)
    assert {p.split("/")[0] for p in tree.flatten(adapter)} == {"embed_tokens", "norm", *(f"layers_{i}" for i in
                                                                                         range(3))}
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapter)
    lr = 1e-2
    # AdamW (decoupled weight decay) chained with the rates: its own update, scaled group by group (optax reference).
    adamw = optax.adamw(lr, weight_decay=0.1)
    tx = lifecycle.optimizer(method, adamw)
    updates, _ = jax.jit(tx.update)(grads, tx.init(adapter), adapter)
    plain, _ = jax.jit(adamw.update)(grads, adamw.init(adapter), adapter)
    for path, u in tree.flatten(updates).items():
        want = np.asarray(tree.flatten(plain)[path], np.float64) * 2.6 ** -_group_of(path, per_group=per_group)
        np.testing.assert_allclose(u, want, rtol=1e-6, err_msg=path)
    # SGD against the definition: each leaf moves by -lr * 2.6^-group * g.
    tx = lifecycle.optimizer(method, optax.sgd(lr))
    updates, _ = jax.jit(tx.update)(grads, tx.init(adapter))
    for path, u in tree.flatten(updates).items():
        g = np.asarray(tree.flatten(grads)[path], np.float64)
        np.testing.assert_allclose(u, -lr * 2.6 ** -_group_of(path, per_group=per_group) * g, rtol=1e-6, err_msg=path)


def test_slanted_triangular_is_the_papers_formula():
    """Howard & Ruder (2018), eq. 3, with T = 100 iterations, cut_frac 0.1, ratio 32, written out in numpy."""
    T, cut_frac, ratio, peak = 100, 0.1, 32, 0.01
    cut = int(np.floor(T * cut_frac))
    t = np.arange(T + 1, dtype=np.float64)
    p = np.where(t < cut, t / cut, 1 - (t - cut) / (cut * (1 / cut_frac - 1)))
    want = peak * (1 + p * (ratio - 1)) / ratio
    schedule = jpeft.optim.slanted_triangular(peak, T)
    np.testing.assert_allclose([float(schedule(i)) for i in range(T + 1)], want, rtol=1e-6)
    # The trainer's train.schedule: slanted_triangular takes warmup_steps as the rise.
    cfg = TrainConfig(steps=T, lr=peak, schedule="slanted_triangular", warmup_steps=cut)
    np.testing.assert_allclose([float(trainer.make_schedule(cfg)(i)) for i in range(T + 1)], want, rtol=1e-6)


def test_gradual_unfreezing_costs_grow_stage_by_stage():
    """Each stage: compiled FLOPs and optimizer-state bytes grow; gradients exist for the trained groups only.

    Unrolled layers, because XLA's cost analysis counts a scanned body once. Shapes only: nothing runs.
    """
    model = llama.model(dataclasses.replace(CONFIG, num_layers=2))
    params = model.abstract_params()
    method = jpeft.ulmfit(layers_per_group=1, groups=2, unfreeze_every=5, model=model)
    assert [start for start, _ in method.training.stages] == [6]
    stages = [method] + [s for _, s in method.training.stages]
    optimizer = lifecycle.optimizer(method, optax.adamw(1e-3))

    def loss(m):
        def fn(adapter, frozen):
            logits, _ = model.forward(m.apply(frozen, adapter), TOKENS)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], TOKENS[:, 1:]).mean()
        return fn

    flops, state_bytes = [], []
    for k, stage in enumerate(stages):
        adapter = jax.eval_shape(stage.init, None, params)
        layers = {p.split("/")[0] for p in tree.flatten(adapter)}
        assert layers == {"norm", *(f"layers_{1 - i}" for i in range(k + 1))}
        frozen = tree.without(params, adapter)
        grads = jax.eval_shape(jax.grad(loss(stage)), adapter, frozen)
        assert grads == adapter  # the trained groups' weights, shape for shape, and nothing else
        flops.append(analysis.grad_step_cost(loss(stage), adapter, frozen).flops)
        state = jax.eval_shape(optimizer.init, adapter)
        state_bytes.append(_nbytes(state))
        assert state_bytes[-1] == 2 * _nbytes(adapter) + 4  # Adam's mu, nu and count: the trained groups only
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert all(a < b for a, b in zip(state_bytes, state_bytes[1:])), state_bytes


def test_stages_begin_at_the_configured_steps():
    """One more group every ``unfreeze_every`` steps: the lifecycle's stage_at picks the method of each step."""
    model = llama.model(dataclasses.replace(CONFIG, num_layers=4))
    method = jpeft.ulmfit(layers_per_group=1, groups=3, unfreeze_every=3, model=model)
    params = model.abstract_params()

    def layers_trained(step):
        adapter = jax.eval_shape(lifecycle.stage_at(method, step).init, None, params)
        return sorted({p.split("/")[0] for p in tree.flatten(adapter) if p.startswith("layers_")})

    expected = {1: ["layers_3"], 3: ["layers_3"], 4: ["layers_2", "layers_3"], 6: ["layers_2", "layers_3"],
                7: ["layers_1", "layers_2", "layers_3"], 100: ["layers_1", "layers_2", "layers_3"]}
    assert {step: layers_trained(step) for step in expected} == expected
    whole = jpeft.ulmfit(layers_per_group=2, model=model)  # no unfreezing: every group from step 1
    assert whole.training.stages == ()
    assert set(jax.eval_shape(whole.init, None, params)) == {"embed_tokens", "norm", *(f"layers_{i}" for i in range(4))}


def _batches(start: int, vocab: int = 64):
    """Synthetic batches of one shape, the loss on every next token."""
    rng = np.random.default_rng(start)
    while True:
        tokens = rng.integers(1, vocab, size=(2, 9)).astype(np.int32)
        yield TrainBatch(tokens[:, :-1], tokens[:, 1:], np.ones((2, 8), np.int32), np.ones((2, 8), np.int32),
                         np.tile(np.arange(8, dtype=np.int32), (2, 1)))


def test_trainer_enters_each_stage_at_its_step_and_compiles_once_per_stage():
    """Two layers, unrolled: the top one with the final norm, from step 3 the lower one too (the scanned model's
    stages run through the trainer in tests/test_train_selective.py, a slow check)."""
    model = llama.model(dataclasses.replace(CONFIG, num_layers=2))
    params = numpy_params(model, stddev=0.2)
    method = jpeft.ulmfit(layers_per_group=1, groups=2, unfreeze_every=2, model=model)
    traces = {}

    def counted(stage, k):  # counts traces of the train step (the only caller passing rng)
        def apply(p, a, rng=None):
            if rng is not None:
                traces[k] = traces.get(k, 0) + 1
            return stage.apply(p, a, rng=rng)
        return stage._replace(apply=apply)

    stages = tuple((s, counted(st, k + 1)) for k, (s, st) in enumerate(method.training.stages))
    method = counted(method, 0)._replace(training=method.training._replace(stages=stages))
    adapter = method.init(None, params)
    records = []
    cfg = TrainConfig(steps=4, lr=1e-2, warmup_steps=1, eval_every=100, max_bad_steps=0)
    final = trainer.train_loop(cfg=cfg, method=method, model=model, adapter=adapter,
                               frozen=lifecycle.frozen_part(params, adapter), batches=_batches, val_batches=[],
                               log=records.append, progress=False, sums=answer_xent)
    per_layer = sum(x.size for x in jax.tree.leaves(params["layers_0"]))
    assert [(r["step"], r["stage"], r["trainable"]) for r in records if r["kind"] == "stage"] == [
        (3, 1, 2 * per_layer + 32)]
    assert traces == {0: 1, 1: 1}  # one compile of the train step per stage
    assert {p.split("/")[0] for p in tree.flatten(final)} == {"norm", "layers_0", "layers_1"}
    # Layer 0 joined at step 3 from the base values and trained from then on.
    assert not np.allclose(final["layers_0"]["mlp"]["up_proj"]["kernel"], params["layers_0"]["mlp"]["up_proj"]["kernel"])
    assert len([r for r in records if r["kind"] == "train"]) == 4


def test_ulmfit_settings_are_checked():
    model = llama.model(CONFIG)
    for settings, setting, message in (
            ({"layers_per_group": 0}, "layers_per_group", "must be a positive integer"),
            ({"unfreeze_every": 0}, "unfreeze_every", "must be a positive integer or null"),
            ({"factor": 0}, "factor", "must be > 0")):
        with pytest.raises(registry.SettingsMappingError, match=message) as info:
            registry.validate("ulmfit", settings)
        assert info.value.setting == setting
    with pytest.raises(jpeft.errors.SettingError, match=r"groups is more than the 3 groups this model has \(2 groups "
                                                        r"of 2 of its 3 layers \+ the embedding\)"):
        jpeft.ulmfit(layers_per_group=2, groups=4, model=model)
    with pytest.raises(ValueError, match="ulmfit needs model="):
        jpeft.ulmfit()
    with pytest.raises(ValueError, match="stage starts .* must be increasing"):
        lifecycle.stage_at(jpeft.full()._replace(training=Training(stages=((1, jpeft.full()),))), 3)


def test_unfreezing_past_the_last_step_is_refused():
    """Groups that would join after the run's last step would never train: the builder refuses, naming the fix."""
    model = llama.model(CONFIG)  # 3 layers + the embedding: 4 groups, the last joins at 1 + 3 * unfreeze_every
    assert len(jpeft.ulmfit(unfreeze_every=3, model=model, total_step=10).training.stages) == 3  # joins at 4, 7, 10: fits
    with pytest.raises(registry.SettingsMappingError, match=r"leaves 1 of the 4 groups untrained: the last one would join "
                                                     r"at step 13, after the run's last step 10; lower it to at most 3"
                       ) as info:
        registry.build("ulmfit", {"unfreeze_every": 4}, model=model, total_step=10)
    assert info.value.setting == "unfreeze_every"
    with pytest.raises(jpeft.errors.SettingError, match=r"set it to null"):
        jpeft.ulmfit(unfreeze_every=1, model=model, total_step=2)
    jpeft.ulmfit(unfreeze_every=100, groups=1, model=model, total_step=2)  # one group: nothing joins later
