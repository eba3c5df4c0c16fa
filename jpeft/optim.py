"""Optimizer pieces for selective fine-tuning: per-rule update scales, the slanted triangular schedule,
and carrying optimizer state from one adapter structure to the next.

* :func:`scale_by_rules`: an optax transformation that multiplies each update by the
  ``lr_scale`` of the first :class:`jpeft.Rule` matching its path, the rules vocabulary
  every method selects weights with. Chained after an optimizer it gives per-weight
  learning rates (ULMFiT's discriminative rates are such rules, one per layer group).
* :func:`slanted_triangular`: ULMFiT's learning-rate schedule (Howard & Ruder, 2018):
  a short linear rise, then a long linear decay, between ``peak / ratio`` and ``peak``.
* :func:`carry_over`: the state of an optimizer over a grown adapter, keeping every
  leaf that was there before (gradual unfreezing adds layers to the adapter).

Example:
    >>> import jax.numpy as jnp, optax
    >>> from jpeft import Rule
    >>> tx = optax.chain(optax.sgd(1.0), scale_by_rules([Rule("low/.*", lr_scale=0.5)]))
    >>> updates, _ = tx.update({"low": {"w": jnp.ones(2)}, "top": jnp.ones(2)}, tx.init(None))
    >>> updates["low"]["w"].tolist(), updates["top"].tolist()
    ([-0.5, -0.5], [-1.0, -1.0])
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jpeft import tree


def scale_by_rules(rules: tree.Targets, *, setting: str = "lr_scale") -> optax.GradientTransformation:
    """Multiplies each update leaf by the ``setting`` of the first rule matching its path (1 if none does).

    Rules are matched as everywhere in jpeft (``re.fullmatch`` on ``/``-joined paths,
    predicates, first match wins) once per path, while tracing. Unlike a method's targets,
    a rule that matches no update is allowed here: an adapter that grows by stages (gradual
    unfreezing) meets the rules of its lower layers only later. A matching rule without
    the setting means 1.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft import Rule
        >>> tx = scale_by_rules([Rule(r"layers_0/.*", lr_scale=0.25), Rule(r".*")])
        >>> tx.update({"layers_0": {"w": jnp.ones(1)}, "norm": jnp.ones(1)}, tx.init(None))[0]["layers_0"]["w"]
        Array([0.25], dtype=float32)
    """
    rules = tree.as_rules(rules)
    for rule in rules:
        value = rule.settings.get(setting, 1.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{rule!r}: {setting} must be a number >= 0, got {value!r}")

    def scale_of(path: str, leaf: Any) -> float:
        rule = next((r for r in rules if r.matches(path, leaf)), None)
        return 1.0 if rule is None else float(rule.settings.get(setting, 1.0))

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda kp, u: u * jnp.asarray(scale_of(tree.path_to_str(kp), u), u.dtype), updates)
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


def slanted_triangular(peak: float, steps: int, *, cut: int | None = None, cut_frac: float = 0.1,
                       ratio: float = 32.0) -> optax.Schedule:
    """ULMFiT's slanted triangular learning rate (Howard & Ruder, 2018, eq. 3) as an optax schedule.

    With ``t`` the optimizer's count (0 for the first update), ``cut = floor(steps *
    cut_frac)`` unless given, ``p = t / cut`` while ``t < cut`` and ``1 - (t - cut) /
    (steps - cut)`` after, the rate is ``peak * (1 + p * (ratio - 1)) / ratio``: from
    ``peak / ratio`` up to ``peak`` at ``t = cut``, back down to ``peak / ratio`` at ``t = steps``.
    (The paper writes the decay's length as ``cut * (1 / cut_frac - 1)``, which is
    ``steps - cut`` when ``steps * cut_frac`` is a whole number.)

    Example:
        >>> schedule = slanted_triangular(0.32, 100)
        >>> [round(float(schedule(t)), 4) for t in (0, 5, 10, 55, 100)]
        [0.01, 0.165, 0.32, 0.165, 0.01]
    """
    if not peak > 0 or steps < 1 or not ratio >= 1:
        raise ValueError(f"slanted_triangular needs peak > 0, steps >= 1 and ratio >= 1, got {peak}, {steps}, {ratio}")
    cut = int(steps * cut_frac) if cut is None else int(cut)
    if not 0 <= cut < steps:
        raise ValueError(f"slanted_triangular: cut={cut} must be in [0, steps={steps})")

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        rise = t / max(cut, 1)
        fall = 1.0 - (t - cut) / (steps - cut)
        p = jnp.clip(jnp.where(t < cut, rise, fall), 0.0, 1.0)
        return peak * (1.0 + p * (ratio - 1.0)) / ratio

    return schedule


def carry_over(old_state: Any, new_state: Any) -> Any:
    """``new_state`` with every leaf that ``old_state`` has at the same key path (same shape and dtype) taken from it.

    For an optimizer whose adapter grew (a stage of gradual unfreezing): ``carry_over(
    opt_state, optimizer.init(new_adapter))`` keeps the moments of the weights trained
    before and the step counts (so schedules go on), and starts the new weights' moments
    at zero. Adam's bias correction reads the shared count, so a new weight's first
    updates are corrected as if it had been trained from the start: with Adam's default
    betas a weight added at step 10 moves about half as far in its first update as a
    fresh one would, at step 100 about as far, at step 1,000 about 2.5 times as far.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.adam(0.1, b1=0.5)
        >>> old = opt.update({"a": jnp.ones(2)}, opt.init({"a": jnp.zeros(2)}))[1]
        >>> new = carry_over(old, opt.init({"a": jnp.zeros(2), "b": jnp.zeros(3)}))
        >>> int(new[0].count), new[0].mu["a"].tolist(), new[0].mu["b"].tolist()
        (1, [0.5, 0.5], [0.0, 0.0, 0.0])
    """
    old = {jax.tree_util.keystr(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(old_state)[0]}

    def pick(kp, leaf):
        before = old.get(jax.tree_util.keystr(kp))
        fits = before is not None and jnp.shape(before) == jnp.shape(leaf) and \
            jnp.result_type(before) == jnp.result_type(leaf)
        return before if fits else leaf

    return jax.tree_util.tree_map_with_path(pick, new_state)


_GIVEN_NORM: contextvars.ContextVar = contextvars.ContextVar("jpeft_given_global_norm", default=None)


def global_norm(tree_: Any) -> jax.Array:
    """The square root of the sum of every leaf's squares (real-valued leaves)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree_)))


@contextlib.contextmanager
def given_global_norm(norm: jax.Array):
    """Within the block, :func:`clip_by_global_norm` clips by ``norm`` instead of its updates' own norm.

    For an update applied to one part of the gradients at a time (the optimizer state
    streamed leaf by leaf, :func:`jpeft.offload.update_streamed`): ``norm`` is the whole
    gradient's, computed once.
    """
    token = _GIVEN_NORM.set(norm)
    try:
        yield
    finally:
        _GIVEN_NORM.reset(token)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` for real-valued gradients, computable in host memory too.

    optax squares ``x.real`` and ``x.imag``; the zeros that ``x.imag`` makes for a real array
    live in device memory, so its update cannot run where only host memory is. Same result: gradients whose global norm
    exceeds ``max_norm`` are scaled down to it. Within :func:`given_global_norm` it clips by
    that norm (an update applied to one leaf at a time, :func:`jpeft.offload.update_streamed`).

    Example:
        >>> clip = clip_by_global_norm(1.0)
        >>> [round(x, 4) for x in clip.update({"g": jnp.array([3.0, 4.0])}, clip.init(None))[0]["g"].tolist()]
        [0.6, 0.8]
    """

    def update(updates, state, params=None):
        del params
        norm = _GIVEN_NORM.get()
        if norm is None:
            norm = global_norm(updates)
        within = norm < max_norm
        clipped = jax.tree.map(lambda t: jnp.where(within, t, (t / norm.astype(t.dtype)) * max_norm), updates)
        return clipped, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
