"""What a model offers, written down: one ``typing.Protocol`` per capability.

Methods and programs ask for a capability instead of probing attributes: a weight method
needs :class:`WeightLayouts`, an input method :class:`HookPoints`, text generation a
:class:`CausalLM` (or an :class:`EncoderDecoder`), a classification task a
:class:`Classifier`. :class:`jpeft.models.Model` implements all of them as methods, and
its family says which it really has (an encoder has no language-model head); the Flax
interop's ``FlaxModel`` implements :class:`WeightLayouts`. Both list what they offer in
``capabilities``, which :func:`offers` reads.

Example:
    >>> from jpeft.models import llama
    >>> m = llama.model(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
    ...                                   num_heads=2))
    >>> offers(m, CausalLM), offers(m, Classifier)
    (True, False)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from jpeft.layout import Layout


@runtime_checkable
class WeightLayouts(Protocol):
    """Every weight's role and logical axes: what weight methods (LoRA, IA3, quantization) read."""

    def layouts(self) -> dict[str, Layout]: ...

    def param_axes(self) -> Any: ...

    @property
    def tied_tables(self) -> dict[str, str]: ...


@runtime_checkable
class HookPoints(Protocol):
    """Named points where input methods (prompt, prefix, bottleneck) feed the model."""

    @property
    def hooks(self) -> dict[str, Any]: ...

    def hook(self, name: str) -> Any: ...


@runtime_checkable
class CausalLM(Protocol):
    """A decoder with a language-model head and a key/value cache: it writes text after a prompt."""

    def forward(self, params: Any, tokens_BxT: Any = None, **kwargs) -> Any: ...

    def head(self, params: Any, hidden: Any) -> Any: ...

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Any: ...


@runtime_checkable
class EncoderDecoder(CausalLM, Protocol):
    """A model that reads a source with an encoder and writes a target with a decoder (T5)."""

    def encode(self, params: Any, tokens_BxS: Any, attention_mask_BxS: Any = None) -> Any: ...


@runtime_checkable
class Classifier(Protocol):
    """An encoder with a sequence-classification head."""

    def forward(self, params: Any, tokens_BxT: Any = None, **kwargs) -> Any: ...

    def classify(self, params: Any, hidden: Any, attention_mask: Any) -> Any: ...


def offers(model: Any, capability: type) -> bool:
    """Whether ``model`` has ``capability``: it implements the protocol and lists it in its ``capabilities``."""
    return isinstance(model, capability) and capability in model.capabilities
