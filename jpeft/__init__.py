"""jpeft: parameter-efficient fine-tuning as pytree transformations, in JAX.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"layer": {"q_proj": {"kernel": jnp.ones((8, 8))}}}
    >>> method = jpeft.lora(rank=2, alpha=4, targets=r".*/q_proj/kernel")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> print(jpeft.param_report(params, adapter).trainable)
    32
"""

from jpeft import layout, ops, optim, tree
from jpeft.methods import registry
from jpeft.methods.base import Method, for_inference
from jpeft.methods.adalora import AdaloraWeight, adalora
from jpeft.methods.bottleneck import BottleneckAdapter, bottleneck
from jpeft.methods.combine import combine_adapters
from jpeft.methods.full import full
from jpeft.methods.ia3 import Ia3Weight, ia3
from jpeft.methods.dora import DoraWeight
from jpeft.methods.loha import LohaWeight, loha
from jpeft.methods.lokr import LokrWeight, lokr
from jpeft.methods.lora import LoraWeight, dora, lora
from jpeft.methods.mixed import MixedAdapters
from jpeft.methods.multi import AdapterBank
from jpeft.methods.oft import OftWeight, oft
from jpeft.methods.prefix import fold as fold_prefix
from jpeft.methods.prefix import prefix_tuning
from jpeft.methods.prompt import fold as fold_prompt
from jpeft.methods.prompt import p_tuning, prompt_tuning
from jpeft.methods.selective import bitfit, selective
from jpeft.methods.sparse import pir
from jpeft.methods.ulmfit import ulmfit
from jpeft.methods.vera import VeraWeight, vera
from jpeft.report import ParamReport, param_report
from jpeft.tree import Rule, RuleError

__all__ = [
    "AdaloraWeight",
    "AdapterBank",
    "BottleneckAdapter",
    "DoraWeight",
    "Ia3Weight",
    "LohaWeight",
    "LokrWeight",
    "LoraWeight",
    "Method",
    "MixedAdapters",
    "OftWeight",
    "ParamReport",
    "Rule",
    "RuleError",
    "VeraWeight",
    "adalora",
    "bitfit",
    "bottleneck",
    "combine_adapters",
    "dora",
    "fold_prefix",
    "fold_prompt",
    "for_inference",
    "full",
    "ia3",
    "layout",
    "loha",
    "lokr",
    "lora",
    "oft",
    "p_tuning",
    "prefix_tuning",
    "prompt_tuning",
    "ops",
    "optim",
    "param_report",
    "pir",
    "registry",
    "selective",
    "tree",
    "ulmfit",
    "vera",
]
__version__ = "0.1.0"
