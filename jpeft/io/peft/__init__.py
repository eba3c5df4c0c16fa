"""The Hugging Face PEFT adapter format (``adapter_config.json`` + ``adapter_model.safetensors``), both directions.

:func:`save_peft` writes a jpeft adapter as a folder ``PeftModel.from_pretrained`` loads;
:func:`load_peft` reads such a folder as a jpeft ``(method, adapter)``. Which methods have a
format is one table (:mod:`jpeft.io.peft.codecs`); each method family's codec is one module
here; :mod:`jpeft.io.peft.common` is the format's shared part. See ``docs/peft-format.md``.
"""

from jpeft.io.peft.codecs import BY_METHOD, for_method, for_peft_type
from jpeft.io.peft.common import PeftCodec, module_of
from jpeft.io.peft.files import load_peft, save_peft, task_type

__all__ = ["BY_METHOD", "PeftCodec", "for_method", "for_peft_type", "load_peft", "module_of", "save_peft",
           "task_type"]
