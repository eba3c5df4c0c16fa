"""LoHa and LoKr against Hugging Face PEFT itself: factorization, and outputs both ways through PEFT files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.errors import CheckpointError
from jpeft.io.hf import load_hf
from jpeft.io.peft import load_peft, save_peft
from jpeft.methods.lokr import factorization
from jpeft.models import llama
import reference

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    dims = [1, 2, 7, 12, 32, 64, 96, 127, 128, 192, 256, 576, 1536, 2048, 4096, 11008, 49152]
    for dim in dims:
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny random Llama (2 layers, width 64): projections 64 -> 64, 64 -> 32 (k/v) and 64 <-> 96 (MLP)."""
    return reference.save_torch_llama(tmp_path_factory.mktemp("base"), intermediate_size=96)


@pytest.fixture(scope="module")
def loaded(base_folder):
    return {scan: load_hf(base_folder, scan_layers=scan) for scan in (False, True)}


def torch_base(folder):
    return reference.torch_llama(folder)


_FORWARDS = {}


def jpeft_logits(config, params):
    """Logits of jpeft's Llama, compiled once per config and parameter structure (not op by op)."""
    if config not in _FORWARDS:
        _FORWARDS[config] = jax.jit(lambda p: llama.forward(p, config, jnp.asarray(TOKENS))[0])
    return np.asarray(_FORWARDS[config](params))


# r=2 by default; up_proj at r=6 makes LoKr's W2 one full factor (6 >= max(8, 12) / 2); v_proj has its own alpha.
PEFT_CONFIGS = {
    "loha": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                    rank_pattern={"up_proj": 6}, alpha_pattern={"v_proj": 5}, init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                    rank_pattern={"up_proj": 6}, alpha_pattern={"v_proj": 5}, init_weights=False),
    "lokr-both": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "k_proj", "up_proj"],
                                         decompose_both=True, decompose_factor=16, init_weights=False),
}


@pytest.mark.parametrize("name, scan_layers", [("loha", False), ("lokr", True), ("lokr-both", False)])
def test_peft_saved_adapter_loads_into_jpeft(base_folder, loaded, tmp_path, name, scan_layers):
    torch.manual_seed(1)  # init_weights=False: every factor random, so no zero factor hides a mistake
    model = peft.get_peft_model(torch_base(base_folder), PEFT_CONFIGS[name]()).eval()
    model.save_pretrained(tmp_path)
    expected = model(torch.tensor(TOKENS)).logits.detach().numpy()
    jmodel, params = loaded[scan_layers]
    method, adapter = load_peft(tmp_path, jmodel, params)
    assert method.name == name.split("-")[0]
    ours = jpeft_logits(jmodel.config, method.apply(params, adapter))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    if scan_layers:  # merge (one compile more) on the stacked layout; tests/test_loha_lokr.py checks it otherwise
        np.testing.assert_allclose(jpeft_logits(jmodel.config, jax.jit(method.merge)(params, adapter)), expected,
                                   rtol=1e-4, atol=1e-4)
    base = torch_base(base_folder)(torch.tensor(TOKENS)).logits.detach().numpy()
    assert np.abs(expected - base).max() > 1e-2  # the adapter really changes the outputs


@pytest.mark.parametrize("name", ["loha", "lokr", "lokr-both"])
def test_jpeft_saved_adapter_loads_into_peft(base_folder, loaded, tmp_path, name):
    jmodel, params = loaded[name == "lokr"]
    targets = [jpeft.Rule(r".*/mlp/up_proj/kernel", rank=6, alpha=2.5), r".*/(q|v)_proj/kernel",
               r".*/mlp/down_proj/kernel"]
    method = {"loha": lambda: jpeft.loha(rank=2, alpha=3, targets=targets, model=jmodel),
              "lokr": lambda: jpeft.lokr(rank=2, alpha=3, targets=targets, model=jmodel),
              "lokr-both": lambda: jpeft.lokr(rank=2, alpha=3, targets=targets, model=jmodel, decompose_both=True,
                                              decompose_factor=16)}[name]()
    rng = np.random.default_rng(1)  # every factor random; numpy, so no random-number kernel is compiled
    adapter = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32),
                           jax.eval_shape(method.init, jax.random.key(0), params))
    save_peft(tmp_path, jmodel, method, params, adapter)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == name.split("-")[0].upper() and config["r"] == 2
    assert config["rank_pattern"] == {r"model\.layers\.0\.mlp\.up_proj": 6, r"model\.layers\.1\.mlp\.up_proj": 6}

    theirs = peft.PeftModel.from_pretrained(torch_base(base_folder), tmp_path).eval()
    expected = theirs(torch.tensor(TOKENS)).logits.detach().numpy()
    np.testing.assert_allclose(jpeft_logits(jmodel.config, method.apply(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)
    # and back: the same method and factors
    method2, adapter2 = load_peft(tmp_path, jmodel, params)
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(adapter2)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_a_fresh_peft_adapter_is_the_identity_in_both(base_folder, loaded, tmp_path, name):
    """PEFT's default init and jpeft's make the same factor shapes, the same zero factor and the same bounds."""
    torch.manual_seed(3)
    config = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[name](r=2, target_modules=["q_proj", "up_proj"])
    model = peft.get_peft_model(torch_base(base_folder), config).eval()
    model.save_pretrained(tmp_path)
    jmodel, params = loaded[False]
    method, adapter = load_peft(tmp_path, jmodel, params)
    fresh = jax.jit(method.init)(jax.random.key(0, impl="rbg"), params)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, adapter)
    zero_in_peft = {n for n, f in tree_factors(adapter).items() if not np.any(f)}
    zero_in_ours = {n for n, f in tree_factors(fresh).items() if not np.any(np.asarray(f))}
    assert zero_in_peft == zero_in_ours == {"loha": {"a2"}, "lokr": {"w1"}}[name]
    # the same uniform bounds as PEFT's kaiming_uniform(a=sqrt(5)) (tests/test_loha_lokr.py: outputs unchanged)
    for n, f in tree_factors(fresh).items():
        if n not in zero_in_ours:
            bound = np.abs(tree_factors(adapter)[n]).max()
            assert 0.7 * bound < np.abs(np.asarray(f)).max() <= bound * 1.3, (n, bound)


def tree_factors(adapter):
    return adapter["layers_0"]["self_attn"]["q_proj"]["kernel"]


def test_settings_jpeft_does_not_have_are_refused_or_named(base_folder, loaded, tmp_path):
    jmodel, params = loaded[False]
    method = jpeft.lokr(rank=2, targets=r".*/q_proj/kernel", model=jmodel)
    shapes = jax.eval_shape(method.init, jax.random.key(0), params)
    adapter = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), shapes)
    save_peft(tmp_path, jmodel, method, params, adapter)
    config = json.loads((tmp_path / "adapter_config.json").read_text())

    def write(**changes):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **changes}))

    write(modules_to_save=["lm_head"])
    with pytest.raises(CheckpointError, match="modules_to_save"):
        load_peft(tmp_path, jmodel, params)
    write(decompose_both=True)  # PEFT would make lokr_w1_a/b for these modules, not lokr_w1
    with pytest.raises(CheckpointError, match=r"q_proj: has lokr_w1, lokr_w2_a, lokr_w2_b, but r=2, "
                                              r"decompose_both=True, decompose_factor=-1 .* makes lokr_w1_a"):
        load_peft(tmp_path, jmodel, params)
    write(rank_dropout=0.1)
    with pytest.warns(UserWarning, match="rank_dropout=0.1; its outputs load exactly"):
        load_peft(tmp_path, jmodel, params)
    write(peft_type="LOHA")
    with pytest.raises(CheckpointError, match="not LoHa factors"):
        load_peft(tmp_path, jmodel, params)
