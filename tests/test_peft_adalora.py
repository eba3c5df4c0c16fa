"""AdaLoRA against Hugging Face PEFT itself: the budget schedule against its RankAllocator, the penalty, and
outputs both ways through PEFT files (with non-uniform rank patterns)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import tree
from jpeft.io.hf import load_hf
from jpeft.io.peft import load_peft, module_of, save_peft
from jpeft.methods import adalora as adalora_lib
from jpeft.models import llama
import reference

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOKENS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])
TARGETS = ["q_proj", "v_proj", "down_proj"]
JPEFT_TARGETS = r".*/(self_attn/(q|v)_proj|mlp/down_proj)/kernel"
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, beta1=0.8, beta2=0.7, total_step=10)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny random Llama (2 layers, width 64; MLP 96): q 64 -> 64, v 64 -> 32, down 96 -> 64."""
    return reference.save_torch_llama(tmp_path_factory.mktemp("base"), intermediate_size=96)


@pytest.fixture(scope="module")
def loaded(base_folder):
    return {scan: load_hf(base_folder, scan_layers=scan) for scan in (False, True)}


_FORWARDS = {}


def jpeft_logits(config, params):
    if config not in _FORWARDS:
        _FORWARDS[config] = jax.jit(lambda p: llama.forward(p, config, jnp.asarray(TOKENS))[0])
    return np.asarray(_FORWARDS[config](params))


def torch_adalora(base_folder, seed, **overrides):
    """PEFT's AdaLoRA model on the tiny Llama with every factor random (``E`` too: its default init is zero)."""
    torch.manual_seed(seed)
    config = peft.AdaLoraConfig(**{**SCHEDULE, "lora_alpha": 6, "target_modules": TARGETS, **overrides})
    model = peft.get_peft_model(reference.torch_llama(base_folder), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def peft_params(model):
    """``{(jpeft unstacked weight path, factor): (torch parameter, to jpeft, from jpeft)}``."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        module, factor, _ = name.removeprefix("base_model.model.").rsplit(".", 2)
        layer, kind, proj = module.split(".")[2:5]
        path = f"layers_{layer}/{kind}/{proj}/kernel"
        out[(path, factor[-1].lower())] = p
    return out


def to_jpeft(name, value):
    """A PEFT factor (torch orientation) as jpeft's: ``A (r, I) -> (I, r)``, ``E (r, 1) -> (r,)``, ``B (O, r) -> (r, O)``."""
    value = np.asarray(value, np.float64)
    return value[:, 0] if name == "e" else value.T


def test_budget_schedule_is_peft_s_rank_allocator(base_folder):
    """The same parameters and gradients for every step of a run through PEFT's optimizer.step() +
    update_and_allocate(t) and through jpeft's wrapped optimizer: E (masked in place), the smoothed scores, the
    budget's rank pattern. SGD, so both take the same step; random gradients, so every phase allocates."""
    model = torch_adalora(base_folder, seed=0)
    torch_params = peft_params(model)
    adapter = {f"{path}/{n}": jnp.asarray(to_jpeft(n, p.detach().numpy()), jnp.float32)
               for (path, n), p in torch_params.items()}
    adapter = tree.unflatten(adapter)
    lr = 0.05
    torch_sgd = torch.optim.SGD([p for p in torch_params.values()], lr=lr)
    optimizer = adalora_lib.budget_schedule(optax.sgd(lr), adalora_lib.Schedule(
        SCHEDULE["target_r"], SCHEDULE["tinit"], SCHEDULE["tfinal"], SCHEDULE["deltaT"], SCHEDULE["beta1"],
        SCHEDULE["beta2"], SCHEDULE["total_step"]))
    state = optimizer.init(adapter)
    update = jax.jit(optimizer.update)
    rng = np.random.default_rng(0)
    allocator = model.base_model.rankallocator
    patterns = 0
    for step in range(SCHEDULE["total_step"]):
        grads = {}
        for (path, n), p in torch_params.items():
            g = rng.standard_normal(p.shape).astype(np.float32)
            p.grad = torch.from_numpy(g)
            grads[f"{path}/{n}"] = jnp.asarray(to_jpeft(n, g), jnp.float32)
        torch_sgd.step()
        model.base_model.update_and_allocate(step)
        updates, state = update(tree.unflatten(grads), state, adapter)
        adapter = optax.apply_updates(adapter, updates)
        flat = tree.flatten(adapter)
        for (path, n), p in torch_params.items():
            np.testing.assert_allclose(np.asarray(flat[f"{path}/{n}"]), to_jpeft(n, p.detach().numpy()),
                                       rtol=1e-5, atol=1e-6, err_msg=f"step {step}: {path}/{n}")
        if allocator.exp_avg_ipt:  # the smoothed sensitivity and uncertainty (PEFT drops them at the final step)
            ipt, unc = tree.flatten(state.ipt), tree.flatten(state.unc)
            for name, value in allocator.exp_avg_ipt.items():
                (path, n), = [k for k, p in torch_params.items() if name.endswith(_suffix(k))]
                np.testing.assert_allclose(np.asarray(ipt[f"{path}/{n}"]), to_jpeft(n, value.numpy()), rtol=1e-4,
                                           atol=1e-7)
                np.testing.assert_allclose(np.asarray(unc[f"{path}/{n}"]), to_jpeft(n, allocator.exp_avg_unc[name]
                                                                                     .numpy()), rtol=1e-4, atol=1e-7)
        pattern = model.peft_config["default"].rank_pattern
        if pattern:
            ours = {module_of_path(p): np.asarray(f["e"]).tolist() for p, f in adalora_lib.modules(state.kept).items()}
            theirs = {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}
            assert ours == theirs, step
            patterns += 1
    kept = [np.asarray(f["e"]) for f in adalora_lib.modules(state.kept).values()]
    assert sum(k.sum() for k in kept) == SCHEDULE["target_r"] * 6   # the final budget: target_r per module
    assert 0 < patterns and len({int(k.sum()) for k in kept}) > 1    # non-uniform
    for f in adalora_lib.modules(state.kept).values():                # a and b carry their triplet's flag
        assert (np.asarray(f["a"]) == np.asarray(f["e"])[None]).all() and (np.asarray(f["b"]) == np.asarray(f["e"])[:, None]).all()


def _suffix(key):
    path, n = key
    layer, kind, proj = path.split("/")[0].removeprefix("layers_"), *path.split("/")[1:3]
    return f"layers.{layer}.{kind}.{proj}.lora_{n.upper()}.default"


def module_of_path(path):
    layer, kind, proj = path.split("/")[0].removeprefix("layers_"), *path.split("/")[1:3]
    return f"model.layers.{layer}.{kind}.{proj}"


def test_orthogonality_penalty_is_peft_s(base_folder):
    """PEFT adds orth_reg_weight * mean ||A A^T - I||, ||B^T B - I|| to the loss in AdaLoraModel.forward (called
    directly: in peft 0.21.2 the PeftModel wrapper's forward does not go through it)."""
    model = torch_adalora(base_folder, seed=1, orth_reg_weight=0.3)
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        with_penalty = float(model.base_model(input_ids=tokens, labels=tokens).loss)
        plain = float(model.base_model.model(input_ids=tokens, labels=tokens).loss)
    adapter = tree.unflatten({f"{path}/{n}": jnp.asarray(to_jpeft(n, p.detach().numpy()), jnp.float32)
                              for (path, n), p in peft_params(model).items()})
    ours = float(adalora_lib.orthogonality_penalty(adapter, 0.3))
    assert abs((with_penalty - plain) - ours) < 1e-5 * max(1.0, ours)
    assert ours > 0.1


def peft_with_pattern(base_folder, seed):
    """A PEFT AdaLoRA model after one allocation to a budget of 14 of 24 triplets: a non-uniform rank pattern."""
    model = torch_adalora(base_folder, seed)
    rng = np.random.default_rng(seed)
    for p in peft_params(model).values():
        p.grad = torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32))
    model.base_model.update_and_allocate(4)   # (tinit, total - tfinal) = (2, 7): budget int(12 * (3/5)^3 + 12) = 14
    model.eval()
    return model


@pytest.mark.parametrize("scan_layers", [False, True])
def test_peft_saved_adapter_loads_into_jpeft(base_folder, loaded, tmp_path, scan_layers):
    model = peft_with_pattern(base_folder, seed=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    kept = [sum(v) for v in config["rank_pattern"].values()]
    assert len(set(kept)) > 1 and sum(kept) < 24, kept  # non-uniform, cut
    with torch.no_grad():
        expected = model(torch.tensor(TOKENS)).logits.numpy()
    jmodel, params = loaded[scan_layers]
    method, adapter = load_peft(tmp_path, jmodel, params)
    assert method.name == "adalora"
    np.testing.assert_allclose(jpeft_logits(jmodel.config, method.apply(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jpeft_logits(jmodel.config, jax.jit(method.merge)(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)
    base = reference.torch_llama(base_folder)(torch.tensor(TOKENS)).logits.detach().numpy()
    assert np.abs(expected - base).max() > 1e-2
    # saved again by jpeft: the same pattern and tensors
    save_peft(tmp_path / "again", jmodel, method, params, adapter)
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == config["rank_pattern"]
    assert {k: again[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "lora_alpha")} == \
        {k: config[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "lora_alpha")}


def test_jpeft_saved_adapter_loads_into_peft(base_folder, loaded, tmp_path):
    jmodel, params = loaded[True]   # stacked layers: each layer's own pattern
    method = jpeft.adalora(init_r=4, target_r=2, alpha=6, targets=JPEFT_TARGETS, tinit=2, tfinal=3, total_step=10,
                           model=jmodel)
    rng = np.random.default_rng(3)
    adapter = jax.tree.map(lambda x: np.asarray(0.3 * rng.standard_normal(x.shape), np.float32),
                           jax.eval_shape(method.init, jax.random.key(0), params))
    flat = tree.flatten(adapter)
    flat["layers/self_attn/q_proj/kernel/e"][0, [1, 3]] = 0.0     # layer 0 keeps 2, layer 1 all 4
    flat["layers/mlp/down_proj/kernel/e"][1, :] = 0.0             # layer 1 keeps none
    flat["layers/self_attn/v_proj/kernel/e"][:, 0] = 0.0          # both keep 3
    adapter = tree.unflatten(flat)
    save_peft(tmp_path, jmodel, method, params, adapter)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] == [True, False, True, False]
    assert config["rank_pattern"]["model.layers.1.mlp.down_proj.lora_E"] == [False] * 4
    theirs = peft.PeftModel.from_pretrained(reference.torch_llama(base_folder), tmp_path).eval()
    assert tuple(theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].shape) == (2, 64)
    with torch.no_grad():
        expected = theirs(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(jpeft_logits(jmodel.config, method.apply(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)
    # and back: the kept factors at their positions, zeros elsewhere; the same outputs
    method2, adapter2 = load_peft(tmp_path, jmodel, params)
    np.testing.assert_allclose(jpeft_logits(jmodel.config, method2.apply(params, adapter2)), expected,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(adapter2["layers"]["self_attn"]["v_proj"]["kernel"]["e"]),
                                  np.asarray(adapter["layers"]["self_attn"]["v_proj"]["kernel"]["e"]))


def test_a_fresh_adapter_is_saved_whole_and_is_the_identity_in_peft(base_folder, loaded, tmp_path):
    jmodel, params = loaded[False]
    method = jpeft.adalora(init_r=4, target_r=2, targets=JPEFT_TARGETS, total_step=10, model=jmodel)
    adapter = jax.jit(method.init)(jax.random.key(0, impl="rbg"), params)
    save_peft(tmp_path, jmodel, method, params, adapter)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] is None
    theirs = peft.PeftModel.from_pretrained(reference.torch_llama(base_folder), tmp_path).eval()
    base = reference.torch_llama(base_folder)
    with torch.no_grad():
        np.testing.assert_array_equal(theirs(torch.tensor(TOKENS)).logits.numpy(),
                                      base(torch.tensor(TOKENS)).logits.numpy())
