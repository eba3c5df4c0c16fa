"""Whole weights trained next to any method: Hugging Face PEFT's ``modules_to_save``.

A classification head is new: no low-rank update of a random matrix makes sense, so it
is trained whole while the method adapts the encoder. :func:`with_modules_to_save` turns
a method into one whose adapter also holds a trainable copy of the selected parameters,
under the key :data:`KEY` at their own paths::

    {<the method's adapter>..., "modules_to_save": {"classifier": {"kernel": ..., "bias": ...}}}

``apply`` and ``merge`` put the copies in place of the originals, then run the method.
The copies are saved, restored and sharded with the adapter (their logical axes are the
parameters'), and :func:`jpeft.io.peft.save_peft` writes them as PEFT's
``modules_to_save`` (the module's own tensor names, e.g. ``classifier.weight``), which
:func:`~jpeft.io.peft.load_peft` reads back into this form.
Parameters the method already trains whole (full fine-tuning) are not copied twice.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((4, 4))}, "classifier": {"kernel": jnp.zeros((4, 2))}}
    >>> method = with_modules_to_save(jpeft.lora(rank=2, targets=r"dense/kernel"), r"classifier/.*")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> sorted(jpeft.tree.flatten(adapter))
    ['dense/kernel/a', 'dense/kernel/b', 'modules_to_save/classifier/kernel']
    >>> adapter["modules_to_save"]["classifier"]["kernel"] += 1.0
    >>> method.merge(params, adapter)["classifier"]["kernel"][0].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.methods.base import Method, Rebase, Training, inherited_axes

KEY = "modules_to_save"


def split(adapter: Any) -> tuple[Any, dict]:
    """``(the method's own adapter, {path: trained copy})`` of a :func:`with_modules_to_save` adapter."""
    if not isinstance(adapter, dict) or KEY not in adapter:
        return adapter, {}
    inner = {k: v for k, v in adapter.items() if k != KEY}
    return inner, tree.flatten(adapter[KEY])


def with_modules_to_save(method: Method, targets: tree.Targets) -> Method:
    """``method`` plus whole trainable copies of the parameters ``targets`` selects (see the module docstring).

    The method's training hooks that concern its own adapter carry over: a ``rebase``
    (PiSSA's residual base) rebases the weights the method adapts and leaves the copies
    alone, a ``penalty`` and a ``summary`` read the method's own adapter.

    Raises:
        ValueError (here): when the method changes its optimizer, chooses its weights from
            data, or trains by stages (AdaLoRA, PIR, ULMFiT): the copies would not follow.
        ValueError (from ``init``): when a target matches no parameter, or the method adapts
            a selected weight itself (LoRA on the head: train it whole or adapt it, not both).
    """
    rules = tree.as_rules(targets)
    hooks = method.training
    unsupported = [h for h in ("optimizer", "prepare", "stages") if h in hooks.hooks()]
    if unsupported:
        raise ValueError(f"{method.describe()} cannot train modules_to_save besides its own adapter: it has "
                         f"a training {' and '.join(unsupported)} hook the copies would not follow; train the "
                         "method without modules_to_save (null), or pick a method without that hook")

    def init_fn(key: jax.Array, params: Any) -> Any:
        inner = method.init(key, params)
        if isinstance(inner, dict) and KEY in inner:
            raise ValueError(f"{method.describe()}'s adapter already has a {KEY!r} entry")
        selected = tree.flatten(tree.split(params, rules)[0])
        own = tree.flatten(inner)
        adapted = sorted(p for p in selected if any(q.startswith(p + "/") for q in own))
        if adapted:
            raise ValueError(f"{adapted[0]!r} is both adapted by {method.describe()} and selected as a module to "
                             "save (trained whole); narrow the method's targets or the modules_to_save")
        copies = {p: jnp.array(leaf, copy=True) for p, leaf in selected.items() if p not in own}
        return {**inner, KEY: tree.unflatten(copies)} if copies else inner

    def with_copies(params: Any, copies: dict) -> Any:
        return tree.replace(params, copies) if copies else params

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        inner, copies = split(adapter)
        return method.apply(with_copies(params, copies), inner, rng=rng)

    def merge_fn(params: Any, adapter: Any) -> Any:
        inner, copies = split(adapter)
        return method.merge(with_copies(params, copies), inner)

    def axes_fn(adapter: Any, param_axes: Any) -> Any:
        inner, copies = split(adapter)
        own = method.logical_axes(inner, param_axes) if method.logical_axes else inherited_axes(inner, param_axes)
        if not copies:
            return own
        return {**own, KEY: inherited_axes(tree.unflatten(copies), param_axes)}

    def fold_fn(adapter: Any) -> Any:
        inner, copies = split(adapter)
        folded = method.fold(inner)
        return {**folded, KEY: tree.unflatten(copies)} if copies else folded

    def with_same_copies(adapter: Any, like: Any) -> Any:
        _, copies = split(like)
        return {**adapter, KEY: tree.unflatten(copies)} if copies else adapter

    def rebase_base(params: Any, fresh: Any) -> Any:
        return hooks.rebase.base(params, split(fresh)[0])

    def over_original(params: Any, trained: Any, fresh: Any) -> tuple[Method, Any]:
        plain, adapter = hooks.rebase.over_original(params, split(trained)[0], split(fresh)[0])
        return with_modules_to_save(plain, targets), with_same_copies(adapter, trained)

    training = Training(
        penalty=None if hooks.penalty is None else (lambda adapter: hooks.penalty(split(adapter)[0])),
        summary=None if hooks.summary is None else (lambda adapter: hooks.summary(split(adapter)[0])),
        rebase=None if hooks.rebase is None else Rebase(rebase_base, over_original))
    return method._replace(
        init=init_fn, apply=apply_fn, merge=merge_fn, logical_axes=axes_fn,
        fold=None if method.fold is None else fold_fn, training=training,
        label=f"{method.describe()} + saved modules")
