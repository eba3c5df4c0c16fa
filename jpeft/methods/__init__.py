"""PEFT methods, one module per family; each builds a :class:`jpeft.Method` and registers its builder.

The builders are re-exported at the top level (``jpeft.lora``, ``jpeft.full``);
:mod:`jpeft.methods.registry` finds them by name.
"""

from jpeft.methods import bottleneck, full, ia3, lora, lora_peft, prefix, prompt, registry  # noqa: F401  (registers)
from jpeft.methods import delta_peft, loha, lokr, selective, sparse, ulmfit  # noqa: F401  (registers)
from jpeft.methods import adalora, adalora_peft  # noqa: F401  (registers)
from jpeft.methods import oft, vera, vera_peft  # noqa: F401  (registers)
