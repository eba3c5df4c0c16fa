"""ULMFiT's fine-tuning recipe (Howard & Ruder, 2018) for a pretrained model: gradual unfreezing and
discriminative learning rates, over layer groups.

Layer groups, counted from the top (the model says how many layers it has; paths say which
layer a weight is in, ``layers_{i}`` or a row of the ``layers`` stack):

* group 0: the top ``layers_per_group`` layers, with the weights after the layers (the final
  norm, an untied output head: any weight outside the layers that is not a table);
* group ``g``: the ``layers_per_group`` layers below group ``g - 1`` (the lowest may be smaller);
* the last group: embedding tables (``("vocab", ...)`` logical axes), if the targets select any.

**Gradual unfreezing**: stage ``s`` (from step ``1 + s * unfreeze_every``) trains groups
``0..s``, up to ``groups`` of them. Each stage is a selective method
(:mod:`jpeft.methods.selective`): a frozen group has no adapter leaf, so it costs no weight
gradient and no optimizer state, and groups below the lowest trained one cost no backward
pass at all. The stages are the method's :attr:`jpeft.methods.base.Training.stages`; the trainer moves
from one to the next (trained values and optimizer state carried over) and compiles once
per stage.

**Discriminative learning rates**: group ``g``'s updates are multiplied by ``factor ** -g``
(ULMFiT's ``eta^(l-1) = eta^l / 2.6``), an optax transformation (:func:`jpeft.optim.scale_by_rules`)
driven by rules on the same per-layer paths, chained after the optimizer (the method's training
``optimizer`` hook).

**Slanted triangular learning rates** are a schedule: :func:`jpeft.optim.slanted_triangular`,
``train.schedule: slanted_triangular`` in the training program.

Example:
    >>> import jax, jpeft
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=4,
    ...                                       num_heads=2, tie_word_embeddings=True, scan_layers=True))
    >>> method = jpeft.ulmfit(layers_per_group=2, unfreeze_every=10, model=model)
    >>> [start for start, _ in method.training.stages]          # groups 1 and 2 (the embedding) join at steps 11, 21
    [11, 21]
    >>> sorted({p.split("/")[0] for p in jpeft.tree.flatten(method.init(None, model.init(jax.random.key(0))))})
    ['layers_2', 'layers_3', 'norm']
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import optax

from jpeft import optim, tree
from jpeft.errors import SettingError
from jpeft.methods import registry
from jpeft.methods.base import Method, Training
from jpeft.methods.selective import Slot, choose, selection_method


def layer_group(slot: Slot, num_layers: int, layers_per_group: int) -> int:
    """The group of a weight (see the module docstring); tables get ``ceil(num_layers / layers_per_group)``.

    Example:
        >>> import jax
        >>> from jpeft.methods.selective import Slot
        >>> leaf = jax.ShapeDtypeStruct((4,), "float32")
        >>> [layer_group(Slot("layers/w", i, True, leaf, "vector"), 5, 2) for i in range(5)]
        [2, 1, 1, 0, 0]
    """
    if slot.layer is not None:
        return (num_layers - 1 - slot.layer) // layers_per_group
    return math.ceil(num_layers / layers_per_group) if slot.kind == "table" else 0


def discriminative_rules(slots: Mapping[str, Slot], num_layers: int, layers_per_group: int = 1,
                         factor: float = 2.6) -> list[tree.Rule]:
    """Rules giving each group's weights ``lr_scale = factor ** -group`` (for :func:`jpeft.optim.scale_by_rules`).

    One rule per layer group (``(.*/)?layers_(i|j)/.*``) and one for the tables among ``slots``;
    anything else (group 0) keeps scale 1.

    Example:
        >>> [r.settings["lr_scale"] for r in discriminative_rules({}, num_layers=3, factor=2.0)]
        [1.0, 0.5, 0.25]
    """
    rules = []
    for g in range(math.ceil(num_layers / layers_per_group)):
        top = num_layers - g * layers_per_group
        members = range(max(top - layers_per_group, 0), top)
        rules.append(tree.Rule(rf"(?:.*/)?layers_(?:{'|'.join(map(str, members))})/.*", lr_scale=factor ** -g))
    tables = sorted(p for p, s in slots.items() if s.layer is None and s.kind == "table")
    if tables:
        g = math.ceil(num_layers / layers_per_group)
        rules.append(tree.Rule("|".join(map(re.escape, tables)), lr_scale=factor ** -g))
    return rules


def _check_stages_fit(unfreeze_every: int | None, groups: int, total_step: int | None) -> None:
    """A :class:`SettingError` when gradual unfreezing would leave groups untrained: the last of the ``groups``
    stages starts at step ``1 + (groups - 1) * unfreeze_every``, which must not be after ``total_step``."""
    if unfreeze_every is None or total_step is None or groups < 2:
        return
    last_start = 1 + (groups - 1) * unfreeze_every
    if last_start <= total_step:
        return
    untrained = groups - 1 - (total_step - 1) // unfreeze_every
    most = (total_step - 1) // (groups - 1)
    fix = f"lower it to at most {most}" if most >= 1 else "set it to null (every group from the first step)"
    raise SettingError("unfreeze_every", unfreeze_every,
                       f"leaves {untrained} of the {groups} groups untrained: the last one would join at step "
                       f"{last_start}, after the run's last step {total_step}; {fix}, lower groups, or train more "
                       "steps", what="ulmfit")


def ulmfit(
    targets: tree.Targets = r".*",
    layers_per_group: int = 1,
    groups: int | None = None,
    factor: float = 2.6,
    unfreeze_every: int | None = None,
    *,
    model: Any = None,
    total_step: int | None = None,
) -> Method:
    """Gradual unfreezing with discriminative learning rates (see the module docstring).

    Args:
        targets: the weights ULMFiT may train (rules on per-layer paths); default all of them.
        layers_per_group: layers per group.
        groups: how many groups (from the top) are trained by the last stage; ``None``: all.
        factor: each group's learning rate is the one above it divided by ``factor``
            (ULMFiT's 2.6; 1 turns discriminative rates off).
        unfreeze_every: steps per stage: one more group joins every ``unfreeze_every``
            steps. ``None``: every group from the first step (no gradual unfreezing).
        model: the :class:`jpeft.models.Model` (needed: its layers, their roles).
        total_step: the optimizer steps the run takes (a program passes it): with it, an
            ``unfreeze_every`` whose last stage would start after the last step (groups
            that would never train) is refused.

    Returns:
        A :class:`jpeft.Method` training the top group, with the later stages in its
        ``training.stages`` and the discriminative rates as its ``training.optimizer``.
    """
    what = "ulmfit"
    for name, value in (("layers_per_group", layers_per_group), ("groups", groups), ("unfreeze_every", unfreeze_every)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SettingError(name, value, "must be a positive integer" + ("" if name == "layers_per_group"
                                                                                 else " or null"), what=what)
    if not (isinstance(factor, (int, float)) and factor > 0):
        raise SettingError("factor", factor, "must be > 0 (ULMFiT uses 2.6; 1 gives every group the same rate)",
                           what=what)
    rules = tree.as_rules(targets)
    if model is None:
        raise ValueError("ulmfit needs model= (its layers and their roles make the groups)")
    count = model.num_layers
    chosen_slots = choose(model.abstract_params(), rules, model)
    layer_groups = math.ceil(count / layers_per_group)
    has_table = any(s.layer is None and s.kind == "table" for s in chosen_slots.values())
    total = layer_groups + has_table
    groups = total if groups is None else groups
    if groups > total:
        raise SettingError("groups", groups, f"is more than the {total} groups this model has ({layer_groups} groups "
                           f"of {layers_per_group} of its {count} layers" + (" + the embedding)" if has_table else ")"),
                           what=what)
    _check_stages_fit(unfreeze_every, groups, total_step)
    rates = optim.scale_by_rules(discriminative_rules(chosen_slots, count, layers_per_group, factor))

    def with_rates(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
        return optax.chain(optimizer, rates)  # per-layer-group learning rates: updates scaled after the optimizer

    def stage(trained: int) -> Method:
        def pick(params: Any) -> dict[str, Slot]:
            chosen = choose(params, rules, model)
            picked = {p: s for p, s in chosen.items() if layer_group(s, count, layers_per_group) < trained}
            if not picked:
                raise ValueError(f"ulmfit: the targets {list(rules)} select no weight in the top {trained} group(s)")
            return picked

        label = (f"ulmfit ({groups} group(s) of {layers_per_group} layer(s), factor {factor:g}"
                 + (f", one more every {unfreeze_every} steps)" if unfreeze_every else ")"))
        return selection_method("ulmfit", pick, label=label, training=Training(optimizer=with_rates))

    if unfreeze_every is None:
        return stage(groups)
    later = tuple((1 + s * unfreeze_every, stage(s + 1)) for s in range(1, groups))
    return stage(1)._replace(training=Training(optimizer=with_rates, stages=later))


registry.register("ulmfit", ulmfit)
