"""PEFT methods, one module per family; each builds a :class:`jpeft.Method`.

The builders are re-exported at the top level (``jpeft.lora``, ``jpeft.full``).
"""
