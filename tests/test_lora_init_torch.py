"""lora_init: jpeft against the PyTorch reference stack (torch, peft): skipped as a whole without it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jpeft
from jpeft import quant, tree
from jpeft.errors import CheckpointError
from jpeft.layout import Layout
from jpeft.methods import lora_init
import reference

from test_lora_init import aligned

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return reference.save_torch_llama(tmp_path_factory.mktemp("pissa_base"))


def torch_base(folder):
    return reference.torch_llama(folder)


def peft_factors(tensors, model, params_like):
    """A jpeft adapter (unstacked paths) from PEFT's ``lora_A`` / ``lora_B`` tensors."""
    from jpeft.io.peft import common

    out = {}
    for key, value in tensors.items():
        module, _, name = key[len(PREFIX):].rpartition(".lora_")
        path = common.hf_names(model).to_path(module + ".weight")[0]
        out[f"{path}/{'a' if name.startswith('A') else 'b'}"] = jnp.asarray(value.T)
    return tree.unflatten(out)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_matches_peft_init_and_its_conversion_to_a_rank_2r_lora(base_folder, tmp_path, init):
    from jpeft.io.hf import load_hf
    from jpeft.io.peft import load_peft, save_peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    hf = peft.get_peft_model(torch_base(base_folder), config).eval()
    hf.save_pretrained(tmp_path / "initial")         # PEFT's recipe: the fresh adapter, saved before training
    model, params = load_hf(base_folder)
    method = jpeft.lora(rank=4, alpha=8, targets=r".*/(q|v)_proj/kernel", init=init, model=model)
    ours = method.init(jax.random.key(0), params)
    rebased = method.training.rebase.base(params, ours)
    core = hf.base_model.model.model
    for i, layer in enumerate(core.layers):            # the same factors (up to sign) and the same residual base
        for proj in ("q_proj", "v_proj"):
            module = getattr(layer.self_attn, proj)
            a, b = (ours[f"layers_{i}"]["self_attn"][proj]["kernel"][k] for k in "ab")
            their_a = module.lora_A["default"].weight.detach().numpy().T
            a, signs = aligned(a, their_a, axis=0)
            np.testing.assert_allclose(a, their_a, atol=2e-5)
            np.testing.assert_allclose(np.asarray(b) * signs.T, module.lora_B["default"].weight.detach().numpy().T,
                                       atol=2e-5)
            np.testing.assert_allclose(rebased[f"layers_{i}"]["self_attn"][proj]["kernel"],
                                       module.base_layer.weight.detach().numpy().T, atol=2e-5)

    with torch.no_grad():                              # "training": move every factor
        for name, p in hf.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    tuned = hf(torch.tensor(TOKENS)).logits.detach().numpy()
    hf.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))

    # jpeft, from PEFT's own initial and trained factors: the same tuned model, the same conversion.
    initial = peft_factors(load_file(str(tmp_path / "initial" / "adapter_model.safetensors")), model, params)
    trained = peft_factors({k: v.detach().numpy() for k, v in hf.named_parameters() if ".lora_" in k}, model, params)
    frozen = method.training.rebase.base(params, initial)
    np.testing.assert_allclose(np.asarray(model.forward(method.apply(frozen, trained), jnp.asarray(TOKENS))[0]),
                               tuned, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="convert it first"):
        save_peft(tmp_path / "raw", model, method, params, trained)
    plain, converted = jpeft.methods.lora.as_plain_lora(method, params, trained, initial, model=model)
    save_peft(tmp_path / "ours", model, plain, params, converted)
    theirs = load_file(str(tmp_path / "converted" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-6, atol=1e-7)
    their_config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    my_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (my_config["r"], my_config["lora_alpha"]) == (their_config["r"], their_config["lora_alpha"]) == (8, 16)
    # The plain adapter runs on the original base, in jpeft and in PEFT.
    np.testing.assert_allclose(np.asarray(model.forward(plain.merge(params, converted), jnp.asarray(TOKENS))[0]),
                               tuned, rtol=1e-4, atol=1e-4)
    back = peft.PeftModel.from_pretrained(torch_base(base_folder), tmp_path / "ours").eval()
    np.testing.assert_allclose(back(torch.tensor(TOKENS)).logits.detach().numpy(), tuned, rtol=1e-4, atol=1e-4)
    method2, adapter2 = load_peft(tmp_path / "converted", model, params)
    np.testing.assert_allclose(np.asarray(model.forward(method2.apply(params, adapter2), jnp.asarray(TOKENS))[0]),
                               tuned, rtol=1e-4, atol=1e-4)

    hf.save_pretrained(tmp_path / "unconverted")      # PEFT's own unconverted file needs its residual base
    with pytest.raises(CheckpointError, match=f"init_lora_weights='{init}'"):
        load_peft(tmp_path / "unconverted", model, params)
