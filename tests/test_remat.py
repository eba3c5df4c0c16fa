"""Every remat policy of the layer stack gives the plain step's loss and gradients (on CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.models import llama
from jpeft import stack
from reference import target_xent

CONFIG = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                           num_kv_heads=2, scan_layers=True)
PARAMS = llama.model(CONFIG).init(jax.random.key(0), stddev=0.3)
TOKENS = jnp.array([[5, 9, 2, 7, 1, 3], [0, 0, 4, 6, 11, 2]], jnp.int32)
MASK = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)


def loss_and_grads(remat):
    method = jpeft.lora(rank=2, targets=r".*_proj/kernel")
    adapter = jax.tree.map(lambda x: x + 0.1, method.init(jax.random.key(1), PARAMS))
    config = dataclasses.replace(CONFIG, remat=remat)
    return jax.jit(jax.value_and_grad(lambda a: target_xent(method.apply(PARAMS, a), config, TOKENS, MASK)))(adapter)


@pytest.mark.parametrize("policy", [p for p in stack.REMAT_POLICIES if p != "none"])
def test_policy_equals_no_remat(policy):
    (want, want_g), (got, got_g) = loss_and_grads("none"), loss_and_grads(policy)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got_g, want_g)


def test_policy_names():
    assert stack.check_remat(True) == "layer_input" and stack.check_remat(False) == "none"
    with pytest.raises(ValueError, match="offload"):
        dataclasses.replace(CONFIG, remat="everything")
