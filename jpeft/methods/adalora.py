"""AdaLoRA: an SVD-shaped update whose rank budget is moved to where it matters during training (Zhang et al., 2023).

As Hugging Face PEFT's ``AdaLoraConfig`` / ``RankAllocator``, with Flax-oriented factors
(a kernel ``(*in, *out)`` is the matrix ``(I, O)``):

* **The update.** Per adapted kernel ``a (*in, r)``, ``e (r,)`` and ``b (r, *out)``:
  ``dW = (a * e) @ b * alpha / (r + 1e-5)`` (PEFT: ``B (A * E) * scaling / (ranknum + 1e-5)``
  with ``A = a.T (r, I)``, ``E = e (r, 1)``, ``B = b.T (O, r)``). ``e`` starts at zero and
  ``a``, ``b`` at ``N(0, 0.02)``, so a fresh adapter changes nothing. Applied as
  ``x @ W + s * ((x @ a) * e) @ b``, LoRA's cost.
* **The orthogonality penalty** (:func:`orthogonality_penalty`, the method's ``penalty``):
  ``orth_reg_weight`` times the mean over every ``A`` and ``B`` of ``||A A^T - I||_F`` and
  ``||B^T B - I||_F``, added to the training loss.
* **The budget schedule** (:func:`budget_schedule`, the method's ``training.optimizer``, wrapping the
  optimizer): after each optimizer step (0-based step ``t``, PEFT's ``global_step`` in its
  example loop), while ``t < total_step - tfinal``, each factor entry's sensitivity
  ``|p * grad|`` (``p`` after the step, ``grad`` the raw gradient) is smoothed with ``beta1``
  and its uncertainty ``|ipt - smoothed|`` with ``beta2``; a triplet's score is
  ``s(e_i) + mean_j s(a_ji) + mean_j s(b_ij)`` with ``s = smoothed * uncertainty``. The
  budget stays at ``init_r`` per module for ``t <= tinit``, then falls cubically to
  ``target_r`` per module at ``total_step - tfinal``; every ``deltaT`` steps the triplets
  scoring at or below the ``(init - budget)``-th smallest score of all modules get ``e = 0``.
  At ``t == total_step - tfinal`` the final allocation is made (and the scores dropped); after
  it the same triplets are zeroed at every step. Zeroing is part of the step's update
  (``-p`` there), so the trainer needs no AdaLoRA code and the state (scores, step, rank
  pattern) is checkpointed with the optimizer's.

The rank pattern of an adapter is where ``e != 0``: the schedule zeroes pruned triplets
exactly, and a trained kept value is never exactly zero. An adapter whose ``e`` are all
zero (fresh) has no pattern: it is saved at full rank, as PEFT saves one never masked.
The PEFT files (:mod:`jpeft.io.peft.adalora`) carry the kept ranks only, with
``rank_pattern``.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
    >>> method = jpeft.adalora(init_r=3, target_r=2, targets=r".*/kernel", total_step=10)
    >>> adapter = method.init(jax.random.key(0), params)
    >>> {k: v.shape for k, v in sorted(adapter["dense"]["kernel"].items())}
    {'a': (6, 3), 'b': (3, 4), 'e': (3,)}
    >>> bool((method.merge(params, adapter)["dense"]["kernel"] == 1).all())   # e == 0
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import tree
from jpeft.errors import SettingError
from jpeft.methods import delta, registry
from jpeft.methods.base import Method, Training

EPS = 1e-5
"""PEFT's ``ranknum + 1e-5`` in the scale."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaloraWeight(delta.DeltaWeight):
    """A weight plus its AdaLoRA update; ops run ``x @ W + s * ((x @ a) * e) @ b`` without forming ``dW``."""

    @staticmethod
    def _matrices(factors: dict, dtype):
        e = factors["e"].astype(dtype)
        a_IxR = factors["a"].reshape(-1, e.shape[-1]).astype(dtype)
        b_RxO = factors["b"].reshape(e.shape[-1], -1).astype(dtype)
        return a_IxR, e, b_RxO

    def _dense(self, factors: dict) -> jax.Array:
        a_IxR, e, b_RxO = self._matrices(factors, jnp.float32)
        return (a_IxR * e) @ b_RxO

    def _apply(self, x_NxI: jax.Array) -> jax.Array:
        a_IxR, e, b_RxO = self._matrices(self.factors, x_NxI.dtype)
        return ((x_NxI @ a_IxR) * e) @ b_RxO

    @staticmethod
    def factor_axes(name: str, in_axes: tuple, out_axes: tuple) -> tuple:
        """``a`` keeps the weight's input axes, ``b`` its output axes; ``e`` is the rank axis alone."""
        return {"a": (*in_axes, delta.RANK_AXIS), "e": (delta.RANK_AXIS,)}.get(name, (delta.RANK_AXIS, *out_axes))


def _factor_shapes(d_in: tuple, d_out: tuple, rank: int) -> delta.Shapes:
    return {"a": (*d_in, rank), "e": (rank,), "b": (rank, *d_out)}


def _init(key: jax.Array, shapes: delta.Shapes, in_size: int, out_size: int, rank: int, dtype) -> dict:
    k_a, k_b = jax.random.split(key)
    return {"a": 0.02 * jax.random.normal(k_a, shapes["a"], dtype),   # lora_A (r, I): N(0, 0.02)
            "e": jnp.zeros(shapes["e"], dtype),                        # lora_E (r, 1): zero
            "b": 0.02 * jax.random.normal(k_b, shapes["b"], dtype)}   # lora_B (O, r): N(0, 0.02)


def _scale(rank: int, alpha: float) -> float:
    return float(alpha) / (rank + EPS)


KIND = delta.DeltaKind("adalora", "AdaLoRA", _factor_shapes, _init, AdaloraWeight, lambda r: f"adalora r={r}",
                       scale=_scale)


# ----------------------------------------------------------------------------- the adapter's modules


def modules(adapter: Any) -> dict[str, dict]:
    """``{weight path: {"a", "e", "b"}}`` of an AdaLoRA adapter (a stacked weight's factors keep their layer axis)."""
    out: dict[str, dict] = {}
    for path, leaf in tree.flatten(adapter).items():
        weight_path, _, name = path.rpartition("/")
        out.setdefault(weight_path, {})[name] = leaf
    bad = sorted(p for p, f in out.items() if set(f) != {"a", "e", "b"})
    if bad:
        raise ValueError(f"not an AdaLoRA adapter: {bad[:3]} do not hold exactly the factors a, e, b")
    return out


def _as_3d(factors: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(a (L, I, r), e (L, r), b (L, r, O))``: one row per module (each layer of a stack is one)."""
    e = factors["e"]
    r, count = e.shape[-1], math.prod(e.shape[:-1])
    return factors["a"].reshape(count, -1, r), e.reshape(count, r), factors["b"].reshape(count, r, -1)


def orthogonality_penalty(adapter: Any, weight: float = 0.5) -> jax.Array:
    """PEFT's ``orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F over every A and B)``.

    Example:
        >>> import jax.numpy as jnp
        >>> eye = {"w": {"a": jnp.eye(3, 2), "e": jnp.ones(2), "b": jnp.eye(2, 3)}}
        >>> float(orthogonality_penalty(eye))
        0.0
    """
    norms = []
    for factors in modules(adapter).values():
        a_LxIxR, _, b_LxRxO = _as_3d(factors)
        eye = jnp.eye(a_LxIxR.shape[-1], dtype=jnp.float32)
        for cov in (jnp.einsum("lir,lis->lrs", a_LxIxR, a_LxIxR), jnp.einsum("lro,lso->lrs", b_LxRxO, b_LxRxO)):
            norms.append(jnp.sqrt(jnp.sum(jnp.square(cov.astype(jnp.float32) - eye), axis=(-2, -1))))
    return weight * jnp.mean(jnp.concatenate(norms))


def rank_pattern(adapter: Any) -> dict[str, np.ndarray] | None:
    """``{weight path: bool (*layers, r)}``: the kept triplets (``e != 0``), or ``None`` when no ``e`` is nonzero
    (a fresh adapter: nothing was allocated yet).

    Example:
        >>> import numpy as np
        >>> rank_pattern({"w": {"a": np.ones((4, 2)), "e": np.array([0.5, 0.0]), "b": np.ones((2, 3))}})
        {'w': array([ True, False])}
    """
    kept = {p: np.asarray(f["e"]) != 0 for p, f in sorted(modules(adapter).items())}
    return kept if any(k.any() for k in kept.values()) else None


def describe_pattern(adapter: Any) -> str | None:
    """One line per adapted weight with its kept ranks (per layer for a stack), or ``None`` for a fresh adapter."""
    kept = rank_pattern(adapter)
    if kept is None:
        return None
    total = sum(int(k.sum()) for k in kept.values())
    size = sum(k.size for k in kept.values())
    lines = [f"adalora rank pattern: {total} of {size} triplets kept"]
    for path, k in kept.items():
        ranks = k.reshape(-1, k.shape[-1]).sum(-1)
        lines.append(f"  {path}: " + " ".join(str(int(r)) for r in ranks))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the budget schedule


class Schedule(NamedTuple):
    """PEFT's schedule settings (``AdaLoraConfig``)."""

    target_r: int
    tinit: int
    tfinal: int
    deltaT: int
    beta1: float
    beta2: float
    total_step: int

    def budget(self, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
        """PEFT's ``RankAllocator.budget_schedule``: ``(budget, whether step t allocates)``, in Python numbers."""
        if step <= self.tinit:
            return init_budget, False
        if step > self.total_step - self.tfinal:
            return target_budget, True
        mul = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((init_budget - target_budget) * (mul ** 3) + target_budget), step % self.deltaT == 0


class BudgetState(NamedTuple):
    """The wrapped optimizer's state plus the schedule's: ``count`` steps taken, the smoothed sensitivity
    ``ipt`` and uncertainty ``unc``, and ``kept``, the last allocation (all kept before the first) as a bool
    per factor entry (a triplet's flag broadcast over its ``a`` and ``b``; the ``e`` leaves are the pattern).
    All three are adapter-shaped, so they are sharded like the adapter (``optax.tree_map_params``)."""

    inner: Any
    count: jax.Array
    ipt: Any
    unc: Any
    kept: dict


def triplet_scores(ipt: Any, unc: Any) -> dict[str, jax.Array]:
    """``{weight path: (*layers, r)}``: PEFT's triplet score ``s(E) + mean s(A) + mean s(B)``, ``s = ipt * unc``."""
    out = {}
    for (path, i), (_, u) in zip(sorted(modules(ipt).items()), sorted(modules(unc).items())):
        s = {n: i[n] * u[n] for n in ("a", "e", "b")}
        a_LxIxR, e_LxR, b_LxRxO = _as_3d(s)
        out[path] = (e_LxR + a_LxIxR.mean(axis=1) + b_LxRxO.mean(axis=2)).reshape(i["e"].shape)
    return out


def budget_schedule(optimizer: optax.GradientTransformation, schedule: Schedule) -> optax.GradientTransformation:
    """``optimizer`` with AdaLoRA's budget schedule around it (see the module docstring); PEFT's
    ``optimizer.step()`` then ``update_and_allocate(global_step)``, as one optax update.

    ``update(grads, state, params)`` needs the parameters (the adapter).
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        kept = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
        return BudgetState(optimizer.init(params), jnp.zeros([], jnp.int32), zeros, zeros, kept)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("AdaLoRA's budget schedule needs the parameters: update(grads, state, params)")
        inner_updates, inner = optimizer.update(grads, state.inner, params)
        stepped = optax.apply_updates(params, inner_updates)
        t = state.count
        final = schedule.total_step - schedule.tfinal
        learning = t < final
        b1, b2 = schedule.beta1, schedule.beta2
        ipt_now = jax.tree.map(lambda p, g: jnp.abs(p * g), stepped, grads)
        ipt = jax.tree.map(lambda old, now: b1 * old + (1 - b1) * now, state.ipt, ipt_now)
        unc = jax.tree.map(lambda old, now, avg: b2 * old + (1 - b2) * jnp.abs(now - avg), state.unc, ipt_now, ipt)
        keep = lambda new, old: jnp.where(learning, new, old)
        ipt, unc = jax.tree.map(keep, ipt, state.ipt), jax.tree.map(keep, unc, state.unc)

        # the budget by step, in Python numbers as PEFT computes it (a table: no float32 rounding of the cubic)
        shapes = {p: f["e"].shape for p, f in modules(params).items()}
        init_budget = sum(math.prod(s) for s in shapes.values())
        target_budget = schedule.target_r * sum(math.prod(s[:-1]) for s in shapes.values())
        table = [schedule.budget(i, init_budget, target_budget) for i in range(schedule.total_step + 2)]
        index = jnp.minimum(t, len(table) - 1)
        budget = jnp.asarray([b for b, _ in table], jnp.int32)[index]
        allocates = jnp.asarray([m for _, m in table])[index]

        scores = triplet_scores(ipt, unc)
        ordered = jnp.sort(jnp.concatenate([s.reshape(-1) for _, s in sorted(scores.items())]))
        k = init_budget - budget                      # torch.kthvalue(scores, k): the k-th smallest
        threshold = jnp.where(k > 0, ordered[jnp.maximum(k - 1, 0)], -jnp.inf)
        allocate = (learning & allocates) | (t == final)
        masking = allocate | (t > final)

        flat_updates, flat_params = tree.flatten(inner_updates), tree.flatten(params)
        flat_kept = tree.flatten(state.kept)
        for path, factors in modules(params).items():
            kept = jnp.where(allocate, scores[path] > threshold, flat_kept[f"{path}/e"])
            lead = kept.ndim - 1
            a, b = factors["a"], factors["b"]
            flat_kept[f"{path}/e"] = kept
            flat_kept[f"{path}/a"] = jnp.broadcast_to(
                kept.reshape(*kept.shape[:lead], *(1,) * (a.ndim - lead - 1), kept.shape[-1]), a.shape)
            flat_kept[f"{path}/b"] = jnp.broadcast_to(kept.reshape(*kept.shape, *(1,) * (b.ndim - lead - 1)), b.shape)
            zero = masking & ~kept
            flat_updates[f"{path}/e"] = jnp.where(zero, -flat_params[f"{path}/e"], flat_updates[f"{path}/e"])
        updates, kept = tree.unflatten(flat_updates), tree.unflatten(flat_kept)
        reset = t == final                            # PEFT's reset_ipt after the final allocation
        ipt, unc = (jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), s) for s in (ipt, unc))
        return updates, BudgetState(inner, t + 1, ipt, unc, kept)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- the builder


def _check(init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step) -> None:
    def integer(value, setting, low):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise SettingError(setting, value, f"must be an integer >= {low}", what="AdaLoRA")
    integer(init_r, "init_r", 1)
    integer(target_r, "target_r", 0)
    if target_r > init_r:
        raise SettingError("target_r", target_r, f"must be at most init_r ({init_r}): the budget only shrinks",
                           what="AdaLoRA")
    integer(tinit, "tinit", 0)
    integer(tfinal, "tfinal", 0)
    integer(deltaT, "deltaT", 1)
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(beta, (int, float)) and 0 < beta < 1):
            raise SettingError(name, beta, "must be a number strictly between 0 and 1", what="AdaLoRA")
    if not (isinstance(orth_reg_weight, (int, float)) and math.isfinite(orth_reg_weight) and orth_reg_weight >= 0):
        raise SettingError("orth_reg_weight", orth_reg_weight, "must be a finite number >= 0", what="AdaLoRA")
    if total_step is not None:
        integer(total_step, "total_step", 1)
        if tinit >= total_step - tfinal:
            raise SettingError("tinit", tinit, f"and tfinal={tfinal} leave no budgeting phase in total_step="
                               f"{total_step} steps (need tinit < total_step - tfinal); lower tinit/tfinal or train "
                               "longer", what="AdaLoRA")


def adalora(
    init_r: int = 12,
    target_r: int = 8,
    alpha: float = 8.0,
    targets: tree.Targets = r".*/(q|k|v|o)_proj/kernel",
    *,
    tinit: int = 0,
    tfinal: int = 0,
    deltaT: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg_weight: float = 0.5,
    total_step: int | None = None,
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """Builds an AdaLoRA method (defaults: Hugging Face PEFT's ``AdaLoraConfig``; see the module docstring).

    Args:
        init_r: the rank each adapted kernel starts with (a :class:`jpeft.Rule` may override it, but PEFT's
            files hold one ``init_r``).
        target_r: the average rank per kernel the budget falls to.
        alpha: PEFT's ``lora_alpha``: ``dW = (a * e) @ b * alpha / (init_r + 1e-5)``.
        targets: which kernels to adapt (regexes fullmatched against ``/``-joined paths, predicates, or rules).
        tinit: steps before the budget starts falling; tfinal: steps at the final budget.
        deltaT: steps between two allocations while it falls.
        beta1, beta2: smoothing of the sensitivity and of its uncertainty.
        orth_reg_weight: weight of the orthogonality penalty on ``A`` and ``B`` (0: none).
        total_step: the number of optimizer steps of the run (PEFT requires it; the trainer passes its
            ``train.steps``). Without it the method runs, merges and saves, but cannot train (its
            ``training.optimizer`` says so).
        dtype: dtype of the trainable factors.
        model: the :class:`jpeft.models.Model` whose parameters are adapted (input/output axes).

    Returns:
        A :class:`jpeft.Method` with ``a (*in, r)``, ``e (r,)``, ``b (r, *out)`` per kernel, the penalty, the
        budget schedule, the penalty and the rank pattern in its ``training`` record.
    """
    _check(init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step)
    schedule = Schedule(target_r, tinit, tfinal, deltaT, float(beta1), float(beta2), total_step)

    def transform(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
        if total_step is None:
            raise ValueError("AdaLoRA's budget schedule needs the run's number of steps: adalora(..., total_step=N) "
                             "(python -m train passes train.steps)")
        return budget_schedule(optimizer, schedule)

    penalty = None if orth_reg_weight == 0 else (lambda adapter: orthogonality_penalty(adapter, orth_reg_weight))
    fields = {"init_r": init_r, "target_r": target_r, "alpha": alpha, "tinit": tinit, "tfinal": tfinal,
              "deltaT": deltaT, "beta1": beta1, "beta2": beta2, "orth_reg_weight": orth_reg_weight,
              "total_step": total_step}
    method = delta.delta_method(KIND, init_r, alpha, targets, dtype=dtype, model=model,
                                settings=fields,
                                training=Training(optimizer=transform, penalty=penalty, summary=describe_pattern))
    return method._replace(label=f"adalora r={init_r}->{target_r}")


registry.register("adalora", adalora)
