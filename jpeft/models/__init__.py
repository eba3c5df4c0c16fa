"""Model families whose every weight use goes through :mod:`jpeft.ops` (so PEFT wrappers just work).

A family is one module (``llama``) that registers a :class:`Family`; a :class:`Model`
binds it to a config and is all that methods, loaders, generation and the trainer use.
The shared pieces (stacked layers live in :mod:`jpeft.stack`): :mod:`~jpeft.models.spec` (parameter specs and logical axes),
:mod:`~jpeft.models.hooks` (where input methods feed a model),
:mod:`~jpeft.models.blocks` (norms, RoPE,
attention), :mod:`~jpeft.models.kv_cache` and :mod:`~jpeft.models.generation`.

Example:
    >>> from jpeft import models
    >>> models.families.names()
    ['bert', 'llama', 't5']
"""

from jpeft.models import bert, families, llama, t5
from jpeft.models.generation import generate
from jpeft.models.hooks import HookPoint
from jpeft.models.model import Family, Model
from jpeft.models.spec import ParamSpec

__all__ = ["Family", "HookPoint", "Model", "ParamSpec", "bert", "families", "generate", "llama", "t5"]
