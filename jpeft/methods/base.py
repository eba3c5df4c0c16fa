"""The record every PEFT method is: a name, three pure functions, and what a trainer needs to know.

``init(key, params) -> adapter``
    The trainable pytree. It works on concrete arrays and on
    ``jax.ShapeDtypeStruct`` leaves, so ``jax.eval_shape(method.init, key, params)``
    gives the adapter's shapes without allocating the model.
``apply(params, adapter, *, rng=None) -> params``
    The parameters the model runs with. Weight methods wrap leaves in
    :class:`jpeft.ops.WeightWrapper` objects that jpeft's models use efficiently;
    input methods attach values at the model's hook points (:mod:`jpeft.models.hooks`).
    ``rng`` switches on training-time randomness (e.g. LoRA dropout).
``merge(params, adapter) -> params``
    Plain arrays with the adapter folded in: zero inference overhead, and the
    generic way to use an adapter with Flax models that jpeft does not own.

The optional fields say what a training program would otherwise have to guess:

``logical_axes(adapter, param_axes) -> adapter_axes``
    Logical axis names for every adapter leaf, from the parameters'; ``None`` means
    :func:`inherited_axes`. :mod:`jpeft.sharding` turns them into shardings.
``fold(adapter) -> adapter``
    The form to save: training-only reparameterisations folded away (P-tuning's
    encoder, prefix tuning's MLP). ``None``: the adapter is saved as it is.
``merge_blocker(params) -> str | None``
    Why ``merge`` is not the right way to run this adapter on these parameters (it
    cannot be merged, or merging would dequantize a 4-bit base), or ``None`` when merging
    is exact and cheap. :func:`for_inference` uses it.
``settings``
    What the method was built with that its adapter does not show (VeRA's projection seed,
    AdaLoRA's budget schedule, OFT's block options), by the builder's argument names: writers
    of other formats read it (:mod:`jpeft.io.peft`). Empty for most methods.
``training``
    A :class:`Training` record of what the method adds to a training run (AdaLoRA's budget
    and penalty, ULMFiT's stages, PIR's data-driven selection, PiSSA's rebase), one typed
    field per hook. Most methods have none; :mod:`jpeft.lifecycle` is the one place that
    honours them, in the order a run needs.
``label``
    A short human-readable description (``"lora r=8"``) for result tables.

``jax.grad``, optax and orbax see the adapter alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import optax

from jpeft.layout import flatten_axes, inherited_axes  # noqa: F401  (re-exported: methods derive their axes with them)
from jpeft.errors import SettingError

Axes = tuple[str | None, ...]


WrapOptimizer = Callable[[optax.GradientTransformation], optax.GradientTransformation]
"""``optimizer -> optimizer``: what a method does to the program's optimizer (it sees the raw gradients)."""
Penalty = Callable[[Any], Any]
"""``adapter -> scalar`` added to the training loss."""
Prepare = Callable[[Any, Callable[[Any, Any], Any], Iterable[Any]], "Method"]
"""``(params, loss_fn(params, batch), batches) -> Method``: choose what to train from data."""
Summary = Callable[[Any], "str | None"]
"""``trained adapter -> line to print and record``."""


class Rebase(NamedTuple):
    """A method whose fresh adapter is taken out of the base weights (LoRA's PiSSA and OLoRA inits).

    ``base(params, fresh_adapter) -> params``: the frozen parameters that go with the fresh
    adapter (PiSSA's residual ``W - s * A0 @ B0``), so ``apply`` of the fresh adapter over them
    is the original model. ``init`` is deterministic in the key and parameters, so a resumed
    run, or a program loading the trained adapter, gets the same base again.

    ``over_original(params, trained, fresh) -> (method, adapter)``: the trained adapter as
    one that runs on the *original* ``params`` (for PiSSA, the plain LoRA of rank ``2r``):
    what a program that loads a saved adapter onto the base model runs.
    """

    base: Callable[[Any, Any], Any]
    over_original: Callable[[Any, Any, Any], tuple["Method", Any]]


class Training(NamedTuple):
    """What a method adds to a training run, one typed hook each; ``Training()`` adds nothing.

    ``optimizer``
        A :data:`WrapOptimizer`: the program's optimizer (clipping + AdamW) goes in, the one
        the run uses comes out. ULMFiT chains its per-layer rate scales after it; AdaLoRA
        wraps it to update its rank budget from the raw gradients, the parameters and the step
        (its state rides in the optax state, so checkpoints carry it).
    ``penalty``
        A :data:`Penalty` added to the training loss (AdaLoRA's orthogonality penalty).
    ``stages``
        ``((first_step, method), ...)``: the method that trains from each 1-based optimizer step
        on (this one trains until the first), for methods whose trainable set changes (ULMFiT's
        gradual unfreezing). :func:`jpeft.lifecycle.enter_stage` moves from one to the next.
    ``prepare``
        A :data:`Prepare`, called once before ``init``; the run trains the method it returns
        (PIR's importance-ranked entries).
    ``rebase``
        A :class:`Rebase` (PiSSA, OLoRA).
    ``summary``
        A :data:`Summary` of the trained adapter (AdaLoRA: the rank pattern it ended with).
    """

    optimizer: WrapOptimizer | None = None
    penalty: Penalty | None = None
    stages: tuple[tuple[int, "Method"], ...] = ()
    prepare: Prepare | None = None
    rebase: Rebase | None = None
    summary: Summary | None = None

    def hooks(self) -> list[str]:
        """The names of the hooks this record sets.

        Example:
            >>> Training(penalty=lambda a: 0.0).hooks()
            ['penalty']
        """
        return [name for name in self._fields if getattr(self, name) not in (None, ())]


class Method(NamedTuple):
    """A PEFT method as a record of pure functions (see the module docstring)."""

    name: str
    init: Callable[..., Any]
    apply: Callable[..., Any]
    merge: Callable[[Any, Any], Any]
    logical_axes: Callable[[Any, Any], Any] | None = None
    fold: Callable[[Any], Any] | None = None
    merge_blocker: Callable[[Any], str | None] | None = None
    settings: Mapping[str, Any] = MappingProxyType({})
    label: str | None = None
    training: Training = Training()

    def saved_form(self, adapter: Any) -> Any:
        """The adapter as it is saved (``fold`` applied, if the method has one)."""
        return adapter if self.fold is None else self.fold(adapter)

    def describe(self) -> str:
        """``label`` or the method's name."""
        return self.label or self.name


def for_inference(method: Method, params: Any, adapter: Any) -> Any:
    """The parameters to run inference with: ``merge`` when it is exact and cheap, else ``apply``.

    A 4-bit base stays 4-bit (merging would dequantize every adapted weight), adapters
    that cannot be merged (bottleneck) run through ``apply``, and input methods'
    ``merge`` is their ``apply`` anyway.

    Example:
        >>> import jax, jax.numpy as jnp, jpeft
        >>> params = {"dense": {"kernel": jnp.ones((4, 4))}}
        >>> method = jpeft.lora(rank=2, targets=r".*/kernel")
        >>> adapter = method.init(jax.random.key(0), params)
        >>> type(for_inference(method, params, adapter)["dense"]["kernel"]).__name__
        'ArrayImpl'
    """
    blocked = method.merge_blocker(params) if method.merge_blocker is not None else None
    return method.apply(params, adapter) if blocked else method.merge(params, adapter)


def refuse_rebased(method: Method, what: str) -> None:
    """Raises ``ValueError`` when ``method``'s adapter goes with a rebased base, not the shared one.

    An adapter whose method has ``rebase`` (LoRA's PiSSA and OLoRA inits) was trained over
    its own residual base ``W - s*A0@B0``; over the original parameters, or next to other
    adapters on one shared base, it is another model. Its plain LoRA form of rank ``2r``
    (:func:`jpeft.methods.lora.as_plain_lora`) runs on the original parameters.

    Example:
        >>> import jpeft
        >>> refuse_rebased(jpeft.lora(rank=2, targets=r".*"), "here")  # a plain init: nothing to say
        >>> refuse_rebased(jpeft.lora(rank=2, targets=r".*", init="pissa"), "here")
        Traceback (most recent call last):
        ...
        ValueError: here: a lora r=2 ... adapter goes with the base its init rebased ...
    """
    if method.training.rebase is None:
        return
    raise ValueError(f"{what}: a {method.describe()} adapter goes with the base its init rebased (the residual "
                     "W - s*A0@B0 of PiSSA / OLoRA), not with the original parameters; convert it first to the plain "
                     "LoRA of rank 2r that runs on them: jpeft.methods.lora.as_plain_lora(method, params, "
                     "adapter, method.init(key, params)), with the key that made the fresh adapter")


def tile_ids(init_ids, n: int, vocab: int) -> list[int]:
    """The token ids of an initialisation text repeated to ``n`` tokens (as Hugging Face PEFT does).

    Example:
        >>> tile_ids([4, 9], 5, vocab=10)
        [4, 9, 4, 9, 4]
    """
    ids = [int(i) for i in init_ids]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"init_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    return (ids * (n // len(ids) + 1))[:n]


def text_ids(init_text: str | None, init_ids, tokenizer, where: str):
    """Token ids for a text initialisation: ``init_ids`` as given, or ``init_text`` tokenized.

    ``tokenizer`` is a Hugging Face tokenizer or any ``text -> ids`` callable.
    """
    if init_text is None:
        return init_ids
    if init_ids is not None:
        raise SettingError("init_ids", init_ids, "cannot be given together with init_text", what=where)
    if not init_text.strip():
        raise SettingError("init_text", init_text, "is empty; give a text or another init", what=where)
    if tokenizer is None:
        raise ValueError(f"{where}: init_text needs the tokenizer (tokenizer=...) to turn it into token ids")
    ids = tokenizer(init_text, add_special_tokens=False)["input_ids"] if hasattr(tokenizer, "encode") \
        else tokenizer(init_text)
    return [int(i) for i in ids]
