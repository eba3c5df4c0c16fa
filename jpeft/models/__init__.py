"""Models whose every weight use goes through :mod:`jpeft.ops` (so PEFT wrappers just work)."""

from jpeft.models import llama
from jpeft.models.llama import (
    LlamaConfig,
    embed_tokens,
    forward,
    generate,
    init_cache,
    init_params,
    lm_head,
    param_axes,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "LlamaConfig",
    "embed_tokens",
    "forward",
    "generate",
    "init_cache",
    "init_params",
    "llama",
    "lm_head",
    "param_axes",
    "stack_layers",
    "unstack_layers",
]
