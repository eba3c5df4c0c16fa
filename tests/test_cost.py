"""LoRA never pays for a full-size weight gradient: XLA's compiled FLOPs show it."""

import jax
import jax.numpy as jnp
import optax

import jpeft
from jpeft.analysis import grad_step_cost
from jpeft.models import llama

CONFIG = llama.LlamaConfig(
    vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4,
    num_kv_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
ALL_LINEAR = r".*/(q|k|v|o|gate|up|down)_proj/kernel"
KEY = jax.random.key(0)


def xent_loss(method):
    def loss(adapter, frozen, tokens_BxT):
        logits_BxTxV, _ = llama.forward(method.apply(frozen, adapter), CONFIG, tokens_BxT)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits_BxTxV[:, :-1], tokens_BxT[:, 1:]).mean()
    return loss


def test_lora_step_costs_at_most_072_of_full_finetuning():
    params = jax.eval_shape(llama.model(CONFIG).init, KEY)
    tokens = jax.ShapeDtypeStruct((4, 32), jnp.int32)
    lora, full = jpeft.lora(rank=8, targets=ALL_LINEAR), jpeft.full()
    lora_cost = grad_step_cost(xent_loss(lora), jax.eval_shape(lora.init, KEY, params), params, tokens)
    full_adapter = jax.eval_shape(full.init, KEY, params)
    full_cost = grad_step_cost(xent_loss(full), full_adapter,
                               jpeft.tree.without(params, full_adapter), tokens)
    ratio = lora_cost.flops / full_cost.flops
    print(f"lora_over_full_flops={ratio:.3f}")
    assert 0.5 < ratio <= 0.72


def test_the_measurement_sees_a_merged_weight():
    """Forming W + s*A@B inside the step (what merge does) must cost more than LoRA's path."""
    params = jax.eval_shape(llama.model(CONFIG).init, KEY)
    tokens = jax.ShapeDtypeStruct((4, 32), jnp.int32)
    lora = jpeft.lora(rank=8, targets=ALL_LINEAR)
    adapter = jax.eval_shape(lora.init, KEY, params)

    def merged_loss(adapter, frozen, tokens_BxT):
        logits_BxTxV, _ = llama.forward(lora.merge(frozen, adapter), CONFIG, tokens_BxT)
        return logits_BxTxV.mean()

    def unmerged_loss(adapter, frozen, tokens_BxT):
        logits_BxTxV, _ = llama.forward(lora.apply(frozen, adapter), CONFIG, tokens_BxT)
        return logits_BxTxV.mean()

    assert grad_step_cost(merged_loss, adapter, params, tokens).flops > \
        grad_step_cost(unmerged_loss, adapter, params, tokens).flops
