"""jpeft's weight methods on Flax models jpeft does not own (linen and nnx), without editing their code.

* :func:`jpeft.interop.linen.wrap` takes a linen module, its variables and example inputs;
* :func:`jpeft.interop.nnx.wrap` takes an nnx module and example inputs.

Both return a :class:`jpeft.interop.core.FlaxModel`: ``params`` (the frozen weights as a plain
tree), ``layouts()`` (each adapted weight's input and output axes, read from its layer), and
``bind(method)``, a function ``(adapter, frozen, *args) -> outputs`` that runs the model with
the adapted layers computed through :mod:`jpeft.ops` (LoRA as ``x @ W + s * (x @ A) @ B``, a
4-bit base dequantized inside the op). Pass the ``FlaxModel`` as a method's ``model=`` so the
method learns the layouts. See :mod:`jpeft.interop.core` for why it works this way.

Importing this package needs flax (``pip install jpeft[flax]``); ``import jpeft`` does not.
"""

from jpeft.interop.core import Contraction, FlaxModel, InteropError, Table, Transposed, Weights

__all__ = ["Contraction", "FlaxModel", "InteropError", "Table", "Transposed", "Weights"]
