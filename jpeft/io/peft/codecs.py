"""Which methods have a Hugging Face PEFT format: the codec registry, keyed by jpeft method name.

One table, written out: a method name (``Method.name``) maps to the :class:`PeftCodec`
that writes and reads it, and a file's ``peft_type`` finds the codec that reads it.
Adding a format for a method is one codec module in this package and one line here.

Example:
    >>> for_method("dora").peft_type, for_peft_type("LOKR") is for_method("lokr")
    ('LORA', True)
"""

from __future__ import annotations

from jpeft.errors import CheckpointError
from jpeft.io.peft import adalora, delta, ia3, lora, oft, prompt, vera
from jpeft.io.peft.common import PeftCodec

BY_METHOD: dict[str, PeftCodec] = {
    "lora": lora.CODEC,
    "dora": lora.CODEC,         # PEFT's LORA with use_dora: true
    "loha": delta.LOHA,
    "lokr": delta.LOKR,
    "adalora": adalora.CODEC,
    "vera": vera.CODEC,
    "oft": oft.CODEC,
    "ia3": ia3.CODEC,
    "prompt_tuning": prompt.PROMPT_TUNING,
    "p_tuning": prompt.P_TUNING,
    "prefix_tuning": prompt.PREFIX_TUNING,
}

BY_PEFT_TYPE: dict[str, PeftCodec] = {codec.peft_type: codec for codec in BY_METHOD.values()}


def for_method(name: str) -> PeftCodec:
    """The codec that writes method ``name``'s adapters; a ValueError for a method without a PEFT format."""
    if name not in BY_METHOD:
        raise ValueError(f"the {name!r} method has no Hugging Face PEFT format; these have one: "
                         f"{', '.join(sorted(BY_METHOD))}")
    return BY_METHOD[name]


def for_peft_type(peft_type: str) -> PeftCodec:
    """The codec that reads files of ``peft_type`` (``adapter_config.json``'s); a CheckpointError for another type."""
    if peft_type not in BY_PEFT_TYPE:
        raise CheckpointError(f"PEFT adapters of type {peft_type!r} are not supported; jpeft reads only "
                              f"{', '.join(sorted(BY_PEFT_TYPE))}")
    return BY_PEFT_TYPE[peft_type]
