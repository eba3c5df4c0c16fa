"""PEFT methods, one module per family; each builds a :class:`jpeft.Method` and registers its builder.

The builders are re-exported at the top level (``jpeft.lora``, ``jpeft.full``);
:mod:`jpeft.methods.registry` finds them by name.
"""

from jpeft.methods import bottleneck, full, ia3, lora, prefix, prompt, registry  # noqa: F401  (registers)
from jpeft.methods import loha, lokr, selective, sparse, ulmfit  # noqa: F401  (registers)
from jpeft.methods import adalora  # noqa: F401  (registers)
from jpeft.methods import oft, vera  # noqa: F401  (registers)
