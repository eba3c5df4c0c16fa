"""lora: jpeft against the PyTorch reference stack (torch, peft): skipped as a whole without it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import ops, tree

V, D, H = 11, 6, 5

from test_lora import IDS, randomize, tiny_forward, tiny_params

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

class TorchTiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.q_proj = torch.nn.Linear(D, D)
        self.up_proj = torch.nn.Linear(D, H, bias=False)

    def forward(self, ids):
        return self.up_proj(torch.tanh(self.q_proj(self.embed(ids))))


def _to_jax(t):
    return jnp.asarray(t.detach().numpy())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_forward_merge_and_counts(use_rslora):
    torch.manual_seed(0)
    base = TorchTiny()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "q_proj", "up_proj"],
                             rank_pattern={"up_proj": 2}, use_rslora=use_rslora)
    model = peft.get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:
            torch.nn.init.normal_(p, std=0.5)   # PEFT starts these at zero
    core = model.base_model.model
    params = {
        "embed": {"embedding": _to_jax(core.embed.base_layer.weight)},
        "q_proj": {"kernel": _to_jax(core.q_proj.base_layer.weight).T,
                   "bias": _to_jax(core.q_proj.base_layer.bias)},
        "up_proj": {"kernel": _to_jax(core.up_proj.base_layer.weight).T},
    }
    adapter = {
        "embed": {"embedding": {"a": _to_jax(core.embed.lora_embedding_A["default"]).T,
                                "b": _to_jax(core.embed.lora_embedding_B["default"]).T}},
        "q_proj": {"kernel": {"a": _to_jax(core.q_proj.lora_A["default"].weight).T,
                              "b": _to_jax(core.q_proj.lora_B["default"].weight).T}},
        "up_proj": {"kernel": {"a": _to_jax(core.up_proj.lora_A["default"].weight).T,
                               "b": _to_jax(core.up_proj.lora_B["default"].weight).T}},
    }
    method = jpeft.lora(rank=4, alpha=8, use_rslora=use_rslora,
                        targets=[jpeft.Rule(r"up_proj/kernel", rank=2), r".*/(kernel|embedding)"])
    expected = model(torch.tensor(np.asarray(IDS))).detach().numpy()
    np.testing.assert_allclose(tiny_forward(method.apply(params, adapter), IDS), expected,
                               rtol=1e-5, atol=1e-5)

    trainable, total = model.get_nb_trainable_parameters()
    report = jpeft.param_report(params, adapter)
    assert (report.trainable, report.total) == (trainable, total)

    merged = method.merge(params, adapter)
    plain = model.merge_and_unload()
    np.testing.assert_allclose(merged["q_proj"]["kernel"], _to_jax(plain.q_proj.weight).T,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["embed"]["embedding"], _to_jax(plain.embed.weight),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["up_proj"]["kernel"], _to_jax(plain.up_proj.weight).T,
                               rtol=1e-5, atol=1e-6)


def test_tied_head_through_a_lora_embedding_follows_the_tying_setting():
    params = tiny_params()
    x = jax.random.normal(jax.random.key(5), (2, D))
    for tie in (False, True):
        method = jpeft.lora(rank=3, targets=r"embed/embedding", ensure_weight_tying=tie)
        adapter = randomize(method.init(jax.random.key(0), params))
        table = method.apply(params, adapter)["embed"]["embedding"]
        head = table.materialize() if tie else params["embed"]["embedding"]  # untied: the lookups change only
        np.testing.assert_allclose(ops.attend(x, table), x @ head.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ops.embed(IDS, table), table.materialize()[IDS], rtol=1e-5, atol=1e-5)
