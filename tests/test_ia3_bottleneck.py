"""IA3 and bottleneck adapters on a tiny Llama, with Hugging Face PEFT as the IA3 reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import ops
from jpeft.models import llama
from jpeft import stack
from reference import adam_steps, target_xent

# attention_bias: k/v biases must be scaled by IA3 too.
CONFIG = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, attention_bias=True)
SCAN_CONFIG = dataclasses.replace(CONFIG, scan_layers=True)
MODEL = llama.model(CONFIG)
PARAMS = llama.model(CONFIG).init(jax.random.key(0), stddev=0.3)
TOKENS = jnp.array([[5, 9, 2, 7, 1, 3], [0, 0, 4, 6, 11, 2]], jnp.int32)
MASK = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)
forward = jax.jit(llama.forward)

METHODS = {
    "ia3": lambda: jpeft.ia3(model=MODEL),
    "houlsby": lambda: jpeft.bottleneck(4, placement="houlsby", activation="silu", model=MODEL),
    "pfeiffer": lambda: jpeft.bottleneck(4, placement="pfeiffer", model=MODEL),
}


def randomize(adapter, seed=1, around=0.0):
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([around + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def logits(params, config=CONFIG):
    return forward(params, config, TOKENS, attention_mask_BxT=MASK)[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_fresh_adapter_is_exactly_the_identity(name):
    method = METHODS[name]()
    adapter = method.init(jax.random.key(1), PARAMS)
    np.testing.assert_array_equal(logits(method.apply(PARAMS, adapter)), logits(PARAMS))


def test_ia3_targets_keys_values_and_ffn_and_merge_matches():
    method = jpeft.ia3()
    adapter = method.init(jax.random.key(0), PARAMS)
    layer = adapter["layers_0"]
    assert {k: v["kernel"]["ia3_l"].shape for k, v in layer["self_attn"].items()} == {"k_proj": (8,), "v_proj": (8,)}
    assert layer["mlp"]["down_proj"]["kernel"]["ia3_l"].shape == (32,)  # the FFN intermediate, down_proj's input
    adapter = randomize(adapter, around=1.0)
    applied = method.apply(PARAMS, adapter)
    assert isinstance(applied["layers_0"]["self_attn"]["k_proj"]["bias"], jpeft.Ia3Weight)
    merged = method.merge(PARAMS, adapter)
    assert not any(ops.is_wrapper(x) for x in jpeft.tree.flatten(merged).values())
    unmerged = logits(applied)
    np.testing.assert_allclose(logits(merged), unmerged, atol=1e-5)
    assert np.abs(unmerged - logits(PARAMS)).max() > 1e-2
    # The same vectors stacked for scan_layers give the same model.
    stacked = stack.stack_layers(adapter, CONFIG.num_layers)
    scan_params = stack.stack_layers(PARAMS, CONFIG.num_layers)
    assert method.init(jax.random.key(0), scan_params)["layers"]["mlp"]["down_proj"]["kernel"]["ia3_l"].shape == (2, 32)
    np.testing.assert_allclose(logits(method.apply(scan_params, stacked), SCAN_CONFIG), unmerged, atol=1e-5)
    np.testing.assert_allclose(logits(method.merge(scan_params, stacked), SCAN_CONFIG), unmerged, atol=1e-5)


def test_ia3_matches_peft_on_a_torch_linear_stack():
    import peft
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k_proj, self.v_proj = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
            self.down_proj = torch.nn.Linear(5, 6, bias=False)

        def forward(self, x, h):
            return self.k_proj(x), self.v_proj(x), self.down_proj(h)

    torch.manual_seed(0)
    block = Block()
    t = lambda x: jnp.asarray(x.detach().numpy())
    params = {name: {"kernel": t(m.weight).T, **({"bias": t(m.bias)} if m.bias is not None else {})}
              for name, m in [("k_proj", block.k_proj), ("v_proj", block.v_proj), ("down_proj", block.down_proj)]}
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    block = peft.inject_adapter_in_model(config, block)
    method = jpeft.ia3(targets=r"(k|v|down)_proj/kernel", feedforward=r"down_proj/kernel")
    adapter = randomize(method.init(jax.random.key(0), params), around=1.0)
    with torch.no_grad():
        for name in ("k_proj", "v_proj", "down_proj"):
            l_hf = getattr(block, name).ia3_l["default"]
            l_hf.copy_(torch.tensor(np.array(adapter[name]["kernel"]["ia3_l"])).reshape(l_hf.shape))
    x, h = np.random.default_rng(0).normal(size=(2, 3, 6)), np.random.default_rng(1).normal(size=(2, 3, 5))
    with torch.no_grad():
        want = [y.numpy() for y in block(torch.tensor(x, dtype=torch.float32), torch.tensor(h, dtype=torch.float32))]
    applied = method.apply(params, adapter)
    got = [ops.linear(jnp.asarray(x, jnp.float32), applied[n]["kernel"], applied[n].get("bias"))
           for n in ("k_proj", "v_proj")]
    got.append(ops.linear(jnp.asarray(h, jnp.float32), applied["down_proj"]["kernel"]))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    merged = method.merge(params, adapter)
    with torch.no_grad():
        for name in ("k_proj", "v_proj", "down_proj"):
            module = getattr(block, name)
            module.merge()
            np.testing.assert_allclose(merged[name]["kernel"], module.base_layer.weight.numpy().T, atol=1e-6)
            if module.base_layer.bias is not None:
                np.testing.assert_allclose(merged[name]["bias"], module.base_layer.bias.numpy(), atol=1e-6)


def test_bottleneck_placements_and_stacked_layers():
    houlsby = METHODS["houlsby"]().init(jax.random.key(0), PARAMS)
    pfeiffer = METHODS["pfeiffer"]().init(jax.random.key(0), PARAMS)
    assert set(houlsby) == {"attn_output", "mlp_output"} and set(pfeiffer) == {"mlp_output"}
    assert houlsby["mlp_output"]["down"]["kernel"].shape == (CONFIG.num_layers, 16, 4)  # every layer's, stacked
    assert float(jnp.abs(houlsby["mlp_output"]["up"]["kernel"]).max()) == 0.0
    method = METHODS["houlsby"]()
    adapter = randomize(houlsby)
    unrolled = logits(method.apply(PARAMS, adapter))
    assert np.abs(unrolled - logits(PARAMS)).max() > 1e-2
    # The same adapter on the same weights stacked for scan_layers gives the same model.
    scan_params = stack.stack_layers(PARAMS, CONFIG.num_layers)
    stacked = method.apply(scan_params, adapter)
    np.testing.assert_allclose(logits(stacked, SCAN_CONFIG), unrolled, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged"):
        method.merge(PARAMS, adapter)


@pytest.mark.parametrize("name", ["ia3", "houlsby"])
def test_gradients_exist_only_for_the_adapter_and_training_lowers_the_loss(name):
    method = METHODS[name]()
    adapter = method.init(jax.random.key(1), PARAMS)
    losses, grads = adam_steps(lambda a: target_xent(method.apply(PARAMS, a), CONFIG, TOKENS, MASK), adapter)
    assert jax.tree.structure(grads[0]) == jax.tree.structure(adapter)
    # Bottleneck: "up" starts at zero, so only it gets a gradient at the very first step.
    checked = {p: g for p, g in jpeft.tree.flatten(grads[0]).items() if name == "ia3" or "/up/" in p}
    assert checked and all(float(jnp.abs(g).max()) > 0 for g in checked.values()), checked.keys()
    assert losses[-1] < 0.9 * losses[0], losses


def test_errors_are_clear():
    ia3, houlsby, pfeiffer = (METHODS[n]() for n in ("ia3", "houlsby", "pfeiffer"))
    ia3_adapter = ia3.init(jax.random.key(0), PARAMS)
    houlsby_adapter = houlsby.init(jax.random.key(0), PARAMS)
    small = llama.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2)
    small_params = llama.model(small).init(jax.random.key(0))
    with pytest.raises(ValueError, match="another model"):
        ia3.apply(small_params, ia3_adapter)
    with pytest.raises(ValueError, match="another model"):
        houlsby.apply(small_params, houlsby_adapter)
    with pytest.raises(ValueError, match="not an IA3 vector"):
        ia3.apply(PARAMS, houlsby_adapter)
    with pytest.raises(ValueError, match="not a houlsby bottleneck adapter"):
        houlsby.apply(PARAMS, ia3_adapter)
    with pytest.raises(ValueError, match="not a pfeiffer bottleneck adapter"):
        pfeiffer.apply(PARAMS, houlsby_adapter)
    with pytest.raises(ValueError, match="not a LoRA factor"):
        jpeft.lora().apply(PARAMS, ia3_adapter)
    with pytest.raises(jpeft.RuleError, match="matched none of the IA3 targets"):
        jpeft.ia3(targets=r".*/k_proj/kernel").init(jax.random.key(0), PARAMS)
    with pytest.raises(ValueError, match="not a kernel"):
        jpeft.ia3(targets=r".*/(embedding|k_proj/kernel)", feedforward=None, model=MODEL).init(jax.random.key(0), PARAMS)
    for build, message in [(lambda: jpeft.bottleneck(0), "positive int"),
                           (lambda: jpeft.bottleneck(4, placement="middle"), "placement"),
                           (lambda: jpeft.bottleneck(4, activation="softmax"), "activation")]:
        with pytest.raises(ValueError, match=message):
            build()
