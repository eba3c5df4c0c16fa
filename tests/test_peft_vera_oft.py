"""VeRA and OFT against Hugging Face PEFT itself: outputs both ways through PEFT files, and what is refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.errors import CheckpointError
from jpeft.io.hf import load_hf
from jpeft.io.peft import load_peft, save_peft
from jpeft.models import llama
import reference

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOKENS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])
# q/k (64 -> 64 / 32), o (64 in as 4 heads x 16: a multi-axis kernel) and the MLP (64 <-> 96): shared VeRA
# projections sliced three ways, OFT blocks over 64 and 96 inputs.
MODULES = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return reference.save_torch_llama(tmp_path_factory.mktemp("base"), intermediate_size=96)


@pytest.fixture(scope="module")
def loaded(base_folder):
    return {scan: load_hf(base_folder, scan_layers=scan) for scan in (False, True)}


_FORWARDS = {}


def jpeft_logits(config, params):
    if config not in _FORWARDS:
        _FORWARDS[config] = jax.jit(lambda p: llama.forward(p, config, jnp.asarray(TOKENS))[0])
    return np.asarray(_FORWARDS[config](params))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def randomize(model, seed):
    """Every adapter parameter of a PEFT model random (a zero vector would hide a mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


PEFT_CONFIGS = {
    "vera": lambda: peft.VeraConfig(r=4, target_modules=MODULES, projection_prng_key=7, d_initial=0.2),
    "oft": lambda: peft.OFTConfig(oft_block_size=8, target_modules=MODULES),
    "oft-r-exact-shared": lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=MODULES, block_share=True,
                                                 use_cayley_neumann=False),
    "oft-neumann3": lambda: peft.OFTConfig(oft_block_size=16, target_modules=MODULES, num_cayley_neumann_terms=3),
}


SLOW = pytest.mark.slow  # more PEFT options and layouts, beyond the default lane's one case per direction and method


@pytest.mark.parametrize("name, scan_layers, merge", [
    ("vera", False, False), ("oft", True, False),
    pytest.param("vera", True, True, marks=SLOW), pytest.param("oft", False, True, marks=SLOW),
    pytest.param("oft-r-exact-shared", False, False, marks=SLOW),
    pytest.param("oft-neumann3", False, False, marks=SLOW)])
def test_peft_saved_adapter_loads_into_jpeft(base_folder, loaded, tmp_path, name, scan_layers, merge):
    model = randomize(peft.get_peft_model(reference.torch_llama(base_folder), PEFT_CONFIGS[name]()).eval(), 1)
    model.save_pretrained(tmp_path)
    expected = torch_logits(model)
    jmodel, params = loaded[scan_layers]
    method, adapter = load_peft(tmp_path, jmodel, params)
    assert method.name == name.split("-")[0]
    np.testing.assert_allclose(jpeft_logits(jmodel.config, method.apply(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)
    if merge:  # one compile more; tests/test_vera_oft.py checks merge == apply on every layout
        np.testing.assert_allclose(jpeft_logits(jmodel.config, jax.jit(method.merge)(params, adapter)), expected,
                                   rtol=1e-4, atol=1e-4)
    base = torch_logits(reference.torch_llama(base_folder))
    assert np.abs(expected - base).max() > 1e-2  # the adapter really changes the outputs


JPEFT_METHODS = {
    "vera": lambda m: jpeft.vera(rank=4, targets=r".*/(q|k|o|up|down)_proj/kernel", d_initial=0.3,
                                 projection_prng_key=5, model=m),
    "oft": lambda m: jpeft.oft(block_size=8, targets=r".*/(q|k|o|up|down)_proj/kernel", model=m),
    "oft-r-exact-shared": lambda m: jpeft.oft(block_size=0, r=4, targets=r".*/(q|k|o|up|down)_proj/kernel",
                                              block_share=True, use_cayley_neumann=False, model=m),
}


@pytest.mark.parametrize("name, scan_layers", [("vera", False), ("oft", False),
                                               pytest.param("vera", True, marks=SLOW),
                                               pytest.param("oft-r-exact-shared", True, marks=SLOW)])
def test_jpeft_saved_adapter_loads_into_peft(base_folder, loaded, tmp_path, name, scan_layers):
    jmodel, params = loaded[scan_layers]
    method = JPEFT_METHODS[name](jmodel)
    rng = np.random.default_rng(2)  # every entry random; numpy, so no random-number kernel is compiled
    adapter = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
                           jax.eval_shape(method.init, jax.random.key(0), params))
    save_peft(tmp_path, jmodel, method, params, adapter)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == name.split("-")[0].upper()
    theirs = peft.PeftModel.from_pretrained(reference.torch_llama(base_folder), tmp_path).eval()
    expected = torch_logits(theirs)
    np.testing.assert_allclose(jpeft_logits(jmodel.config, method.apply(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)
    assert np.abs(expected - torch_logits(reference.torch_llama(base_folder))).max() > 1e-2
    if name == "vera":  # PEFT runs jpeft's projections (from the file), with the settings jpeft wrote
        assert (config["r"], config["d_initial"], config["projection_prng_key"], config["save_projection"]) == \
            (4, 0.3, 5, True)
        pair = jax.tree.leaves(method.apply(params, adapter), is_leaf=jpeft.ops.is_wrapper)
        pair = next(w for w in pair if isinstance(w, jpeft.VeraWeight)).projections
        np.testing.assert_array_equal(theirs.base_model.vera_A["default"].numpy(), pair.a)
        np.testing.assert_array_equal(theirs.base_model.vera_B["default"].numpy(), pair.b)
    # and back: the same method and tensors
    method2, adapter2 = load_peft(tmp_path, jmodel, params)
    assert method2.label == method.label
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(adapter2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["vera", "oft"])
def test_a_fresh_adapter_matches_peft_s_fresh_one(base_folder, loaded, tmp_path, name):
    """PEFT's default init and jpeft's make the same shapes and values (VeRA: lambda_b 0, lambda_d d_initial;
    OFT: zero vectors, the identity rotation)."""
    config = {"vera": lambda: peft.VeraConfig(r=4, target_modules=MODULES),
              "oft": lambda: peft.OFTConfig(target_modules=MODULES, oft_block_size=16)}[name]()
    peft.get_peft_model(reference.torch_llama(base_folder), config).save_pretrained(tmp_path)
    jmodel, params = loaded[False]
    method, adapter = load_peft(tmp_path, jmodel, params)
    ours = {"vera": lambda: jpeft.vera(rank=4, targets=r".*/(q|k|o|up|down)_proj/kernel", model=jmodel),
            "oft": lambda: jpeft.oft(block_size=16, targets=r".*/(q|k|o|up|down)_proj/kernel", model=jmodel)}[name]()
    fresh = ours.init(jax.random.key(0), params)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, adapter)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(adapter)):
        np.testing.assert_array_equal(np.asarray(a), b)
    if name == "vera":  # the same kaiming-uniform bounds for the projections (other generator, other draws)
        w = next(w for w in jax.tree.leaves(ours.apply(params, fresh), is_leaf=jpeft.ops.is_wrapper)
                 if isinstance(w, jpeft.VeraWeight))
        from safetensors.numpy import load_file

        theirs = load_file(str(tmp_path / "adapter_model.safetensors"))
        for mine, key in ((w.projections.a, "base_model.vera_A"), (w.projections.b, "base_model.vera_B")):
            assert mine.shape == theirs[key].shape
            assert 0.8 * np.abs(theirs[key]).max() < np.abs(mine).max() <= np.abs(theirs[key]).max() * 1.01


def test_options_jpeft_does_not_have_are_refused(base_folder, loaded, tmp_path):
    jmodel, params = loaded[False]
    for name, method in (("vera", JPEFT_METHODS["vera"](jmodel)), ("oft", JPEFT_METHODS["oft"](jmodel))):
        folder = tmp_path / name
        save_peft(folder, jmodel, method, params, method.init(jax.random.key(0), params))
        config = json.loads((folder / "adapter_config.json").read_text())
        changes = {"vera": [({"save_projection": False}, "save_projection=false"), ({"bias": "all"}, "bias")],
                   "oft": [({"coft": True}, "coft"), ({"oft_block_size": 16}, r"oft_R.weight \(8, 28\)")]}[name]
        for change, message in changes:
            (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
            with pytest.raises(CheckpointError, match=message):
                load_peft(folder, jmodel, params)
    with pytest.raises(jpeft.registry.SettingsMappingError, match="coft"):
        jpeft.registry.build("oft", {"coft": True})


def test_vera_trains_as_peft_s_does(base_folder, loaded, tmp_path):
    """Five Adam steps from PEFT's fresh VeRA adapter (lambda_b = 0): the same losses and vectors in both.

    The BBC run's early training loss rose above the base model's (README); this pins the training
    dynamics themselves to PEFT's, so such behaviour is VeRA's and not jpeft's.
    """
    model = peft.get_peft_model(reference.torch_llama(base_folder),
                                peft.VeraConfig(r=4, target_modules=MODULES, d_initial=0.1))
    model.save_pretrained(tmp_path)
    jmodel, params = loaded[False]
    method, adapter = load_peft(tmp_path, jmodel, params)
    tokens = np.array([[1, 5, 9, 2, 7, 3, 8, 2], [4, 4, 8, 1, 0, 6, 5, 3]])
    lr = 1e-2

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr)
    theirs = []
    for _ in range(5):
        loss = model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.append(float(loss.detach()))

    def loss_fn(adapter):
        logits, _ = llama.forward(method.apply(params, adapter), jmodel.config, jnp.asarray(tokens))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(tokens[:, 1:])))

    tx = optax.adam(lr)
    state, ours = tx.init(adapter), []
    step = jax.jit(lambda a, s: (jax.value_and_grad(loss_fn)(a), s))
    for _ in range(5):
        (loss, grads), _ = step(adapter, state)
        updates, state = tx.update(grads, state, adapter)
        adapter = optax.apply_updates(adapter, updates)
        ours.append(float(loss))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    lambda_b = [p.detach().numpy() for n, p in model.named_parameters() if "vera_lambda_b" in n]
    assert sum(float(np.abs(b).sum()) for b in lambda_b) == pytest.approx(
        sum(float(jnp.abs(leaf).sum()) for path, leaf in jpeft.tree.flatten(adapter).items() if "lambda_b" in path),
        rel=1e-3)
