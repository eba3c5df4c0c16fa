"""dora: jpeft against the PyTorch reference stack (torch, peft): skipped as a whole without it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import ops, quant, tree
from jpeft.analysis import grad_step_cost
from jpeft.errors import CheckpointError
from jpeft.layout import Layout
from jpeft.methods.dora import DoraWeight
from jpeft.models import llama
import reference

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return reference.save_torch_llama(tmp_path_factory.mktemp("dora_base"))


def torch_base(folder):
    return reference.torch_llama(folder)


def test_peft_dora_adapter_loads_into_jpeft_and_back(base_folder, tmp_path):
    from jpeft.io.hf import load_hf
    from jpeft.io.peft import load_peft, save_peft

    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
                             rank_pattern={"up_proj": 2})
    hf = peft.get_peft_model(torch_base(base_folder), config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)          # PEFT starts B at zero
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "theirs")
    expected = hf(torch.tensor(TOKENS)).logits.detach().numpy()

    model, params = load_hf(base_folder, scan_layers=True)  # stacked: PEFT's per-layer tensors are restacked
    method, adapter = load_peft(tmp_path / "theirs", model, params)
    assert method.name == "dora" and adapter["layers"]["mlp"]["up_proj"]["kernel"]["a"].shape == (2, 64, 2)
    logits = jax.jit(lambda a: model.forward(method.apply(params, a), jnp.asarray(TOKENS))[0])(adapter)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    # jpeft -> PEFT: PEFT reads the magnitude under its own key and computes the same logits.
    save_peft(tmp_path / "ours", model, method, params, adapter)
    ours = peft.PeftModel.from_pretrained(torch_base(base_folder), tmp_path / "ours").eval()
    np.testing.assert_allclose(ours(torch.tensor(TOKENS)).logits.detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_a_magnitude_without_use_dora_is_refused(base_folder, tmp_path):
    import json

    from jpeft.io.hf import load_hf
    from jpeft.io.peft import load_peft, save_peft

    model, params = load_hf(base_folder)
    method = jpeft.dora(rank=2, targets=r".*/q_proj/kernel", model=model)
    save_peft(tmp_path, model, method, params, method.init(jax.random.key(0), params))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(CheckpointError, match="a DoRA magnitude .* no use_dora: true"):
        load_peft(tmp_path, model, params)
