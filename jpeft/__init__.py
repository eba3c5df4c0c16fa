"""jpeft: parameter-efficient fine-tuning as pytree transformations, in JAX.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"layer": {"q_proj": {"kernel": jnp.ones((8, 8))}}}
    >>> method = jpeft.lora(rank=2, alpha=4, targets=r".*/q_proj/kernel")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> print(jpeft.param_report(params, adapter).trainable)
    32
"""

from jpeft import ops, tree
from jpeft.methods.base import Method
from jpeft.methods.full import full
from jpeft.methods.lora import LoraWeight, lora
from jpeft.report import ParamReport, param_report
from jpeft.tree import Rule, RuleError

__all__ = [
    "LoraWeight",
    "Method",
    "ParamReport",
    "Rule",
    "RuleError",
    "full",
    "lora",
    "ops",
    "param_report",
    "tree",
]
__version__ = "0.1.0"
