"""VeRA: trainable scaling vectors over shared frozen random projections (Kopiczko et al., 2024; PEFT's ``VeraConfig``).

For a kernel seen as the matrix ``(I, O)`` (input axes flattened, then output axes), with
PEFT's torch-oriented shared projections ``A (r, I_max)`` and ``B (O_max, r)``, sliced to
the weight (``A[:, :I]``, ``B[:O]``, as PEFT slices them for smaller layers):

    ``dW = diag(lambda_b) B diag(lambda_d) A``   (torch's ``(O, I)``; the Flax kernel gets its transpose)

The adapter holds, per kernel, ``lambda_d (*lead, r)`` and ``lambda_b (*lead, *out)`` and
nothing else. As in PEFT, ``lambda_b`` starts at zero (a fresh adapter changes nothing,
exactly) and ``lambda_d`` at ``d_initial`` (0.1). ``apply`` never forms ``dW``: each op runs
``x @ W + (((x @ A^T) * lambda_d) @ B^T) * lambda_b`` (:meth:`VeraWeight._apply`), over a
4-bit base too.

**Where the projections live.** One pair serves every adapted weight (PEFT's design: the
largest input and output sizes among the targets, sliced per weight). They are frozen, so
they are not in the adapter: ``jax.grad``, optax and orbax see ``lambda_d`` / ``lambda_b``
only (no gradient, no optimizer state, no checkpoint bytes for the projections). They are
a pure function of the method's settings instead, like PEFT's ``projection_prng_key``: drawn
with numpy's ``default_rng(projection_prng_key)`` as PEFT's kaiming-uniform (gain
``sqrt(2)``, ``U(+-sqrt(6 / fan_in))``, fan-in ``I_max`` for ``A`` and ``r`` for ``B``) the
first time a method meets a parameter tree, and cached. The arrays travel in the weight
wrapper as a static :class:`Projections` value (hashed by content), so inside ``jit`` they
are constants: nothing stacks them per layer for ``scan``. A method read from a PEFT file
carries the file's projections (``projections=``); torch's generator cannot be replayed, so
a jpeft-drawn pair is not PEFT's pair for the same key, and the PEFT export always writes
the projections (PEFT's ``save_projection=True``).

Supported as in PEFT: ``r`` (default 256), ``d_initial``, ``projection_prng_key``,
``save_projection`` (always true on export; a file without projections is refused: its
pair cannot be reproduced). Not supported: ``vera_dropout`` (training-only: a file trained
with it loads exactly, with a warning), ``bias != "none"``, ``modules_to_save``,
``fan_in_fan_out`` (GPT-2's ``Conv1D``), embedding layers (PEFT's VeRA has none either).

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((6, 4))}, "out": {"kernel": jnp.ones((4, 3))}}
    >>> method = jpeft.vera(rank=2, targets=r".*/kernel")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> {k: v.shape for k, v in sorted(adapter["dense"]["kernel"].items())}
    {'lambda_b': (4,), 'lambda_d': (2,)}
    >>> w = method.apply(params, adapter)["dense"]["kernel"]
    >>> type(w).__name__, w.projections.a.shape, w.projections.b.shape    # A (r, I_max), B (O_max, r)
    ('VeraWeight', (2, 6), (4, 2))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree
from jpeft.errors import SettingError
from jpeft.layout import layouts_for
from jpeft.methods import delta, registry
from jpeft.methods.base import Method


class Projections:
    """VeRA's shared frozen pair, torch-oriented as PEFT stores them: ``a (r, I_max)``, ``b (O_max, r)``.

    Hashable by content (a static field of :class:`VeraWeight`, so a constant under ``jit``).

    Example:
        >>> p = Projections(np.ones((2, 6)), np.ones((4, 2)))
        >>> p == Projections(np.ones((2, 6)), np.ones((4, 2))), p.rank, p.max_in, p.max_out
        (True, 2, 6, 4)
    """

    def __init__(self, a, b):
        self.a = np.ascontiguousarray(np.asarray(a, np.float32))
        self.b = np.ascontiguousarray(np.asarray(b, np.float32))
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"VeRA projections must be A (r, in) and B (out, r) with the same r; got A "
                             f"{self.a.shape} and B {self.b.shape}")
        digest = hashlib.sha1()
        for x in (self.a, self.b):
            digest.update(str(x.shape).encode())
            digest.update(x.tobytes())
        self._digest = digest.hexdigest()

    rank = property(lambda self: self.a.shape[0])
    max_in = property(lambda self: self.a.shape[1])
    max_out = property(lambda self: self.b.shape[0])

    def __hash__(self) -> int:
        return hash(self._digest)

    def __eq__(self, other) -> bool:
        return isinstance(other, Projections) and other._digest == self._digest

    def __repr__(self) -> str:
        return f"Projections(A {self.a.shape}, B {self.b.shape}, {self._digest[:8]})"


@functools.lru_cache(maxsize=16)
def draw_projections(key: int, rank: int, max_in: int, max_out: int) -> Projections:
    """The pair for ``projection_prng_key=key``: PEFT's kaiming-uniform bounds, numpy's generator (not torch's).

    Example:
        >>> p = draw_projections(0, 4, 96, 64)
        >>> float(np.abs(p.a).max()) <= math.sqrt(6 / 96), float(np.abs(p.b).max()) <= math.sqrt(6 / 4)
        (True, True)
    """
    rng = np.random.default_rng(key)
    bound_a, bound_b = math.sqrt(6.0 / max_in), math.sqrt(6.0 / rank)
    a = rng.uniform(-bound_a, bound_a, (rank, max_in))
    b = rng.uniform(-bound_b, bound_b, (max_out, rank))
    return Projections(a, b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VeraWeight(delta.DeltaWeight):
    """A weight plus its VeRA update; ops run ``x @ W + ((x @ A^T) * lambda_d) @ B^T * lambda_b``, never ``dW``."""

    projections: Projections | None = dataclasses.field(default=None, metadata=dict(static=True))

    def _pair(self, dtype) -> tuple[jax.Array, jax.Array]:
        """``A^T`` sliced to ``(I, r)`` and ``B^T`` sliced to ``(r, O)``, Flax-oriented constants."""
        out_size = math.prod(self.out_shape)
        a_IxR = jnp.asarray(self.projections.a[:, :self.in_size].T, dtype)
        b_RxO = jnp.asarray(self.projections.b[:out_size].T, dtype)
        return a_IxR, b_RxO

    def _dense(self, factors: dict) -> jax.Array:
        a_IxR, b_RxO = self._pair(jnp.float32)
        lambda_b = factors["lambda_b"].astype(jnp.float32).reshape(-1)
        return (a_IxR * factors["lambda_d"].astype(jnp.float32)) @ (b_RxO * lambda_b)

    def _apply(self, x_NxI: jax.Array) -> jax.Array:
        a_IxR, b_RxO = self._pair(x_NxI.dtype)
        lambda_d = self.factors["lambda_d"].astype(x_NxI.dtype)
        lambda_b = self.factors["lambda_b"].astype(x_NxI.dtype).reshape(-1)
        return (((x_NxI @ a_IxR) * lambda_d) @ b_RxO) * lambda_b

    @staticmethod
    def factor_axes(name: str, in_axes: tuple, out_axes: tuple) -> tuple:
        """``lambda_d`` is on the rank axis (replicated), ``lambda_b`` on the weight's output axes."""
        return (delta.RANK_AXIS,) if name == "lambda_d" else tuple(out_axes)


def _kind(d_initial: float, projections: Projections | None) -> delta.DeltaKind:
    def shapes(d_in: tuple, d_out: tuple, rank: int) -> delta.Shapes:
        return {"lambda_d": (rank,), "lambda_b": tuple(d_out)}

    def init(key, shapes: delta.Shapes, in_size: int, out_size: int, rank: int, dtype) -> dict:
        del key  # deterministic, as PEFT's reset_vera_parameters
        return {"lambda_d": jnp.full(shapes["lambda_d"], d_initial, dtype),
                "lambda_b": jnp.zeros(shapes["lambda_b"], dtype)}

    return delta.DeltaKind("vera", "VeRA", shapes, init, VeraWeight, lambda r: f"vera r={r}",
                           options=(("projections", projections),))


def vera(
    rank: int = 256,
    targets: tree.Targets = r".*/(q|k|v|o)_proj/kernel",
    *,
    d_initial: float = 0.1,
    projection_prng_key: int = 0,
    projections: Any = None,
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """Builds a VeRA method (defaults: Hugging Face PEFT's ``VeraConfig``, ``r=256, d_initial=0.1``).

    Args:
        rank: the projections' inner size ``r`` (one for all targets: the pair is shared).
        targets: which kernels to adapt (regexes, predicates or :class:`jpeft.Rule` objects
            without per-rule settings).
        d_initial: the value every ``lambda_d`` starts at.
        projection_prng_key: the seed of the shared projections (numpy's generator; see the
            module docstring).
        projections: a :class:`Projections` (or ``(A, B)`` torch-oriented arrays) to use
            instead of drawing them: what :func:`jpeft.io.peft.load_peft` passes.
        dtype: dtype of the trainable vectors.
        model: the :class:`jpeft.models.Model` whose parameters are adapted.

    Returns:
        A :class:`jpeft.Method`; its adapter holds ``lambda_d (r,)`` and ``lambda_b (*out)`` per kernel.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise SettingError("rank", rank, "must be a positive integer", what="VeRA")
    if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
        raise SettingError("d_initial", d_initial, "must be a finite number", what="VeRA")
    if isinstance(projection_prng_key, bool) or not isinstance(projection_prng_key, int) or projection_prng_key < 0:
        raise SettingError("projection_prng_key", projection_prng_key, "must be an integer >= 0", what="VeRA")
    if projections is not None and not isinstance(projections, Projections):
        projections = Projections(*projections)
    if projections is not None and projections.rank != rank:
        raise SettingError("projections", projections, f"have r={projections.rank}, but rank is {rank}", what="VeRA")
    rules = tree.as_rules(targets)
    for rule in rules:
        if rule.settings:
            raise ValueError(f"{rule!r} has per-rule settings {sorted(rule.settings)}, but VeRA's rank is one for "
                             "all targets (they share the projections); give rank= to jpeft.vera")

    def sizes(params) -> tuple[int, int]:
        """The largest flattened input and output sizes among the targeted kernels."""
        flat, layouts = tree.flatten(params), layouts_for(params, model=model)
        kind = _kind(float(d_initial), None)
        max_in = max_out = 0
        for path in tree.assign(params, rules):
            _, d_in, d_out = delta.split_weight(kind, path, tuple(flat[path].shape), layouts[path])
            max_in, max_out = max(max_in, math.prod(d_in)), max(max_out, math.prod(d_out))
        return max_in, max_out

    def pair_for(params) -> Projections:
        max_in, max_out = sizes(params)
        if projections is None:
            return draw_projections(projection_prng_key, rank, max_in, max_out)
        if projections.max_in < max_in or projections.max_out < max_out:
            raise ValueError(f"the VeRA projections A {projections.a.shape} and B {projections.b.shape} are smaller "
                             f"than the largest targeted weight needs (in {max_in}, out {max_out}); they were made "
                             "for other targets or another model")
        return projections

    def inner(pair: Projections | None) -> Method:
        return delta.delta_method(_kind(float(d_initial), pair), rank, float(rank), rules, dtype=dtype, model=model)

    def init_fn(key: jax.Array, params: Any) -> dict:
        return inner(None).init(key, params)

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        return inner(pair_for(params)).apply(params, adapter, rng=rng)

    def merge_fn(params: Any, adapter: Any) -> Any:
        return inner(pair_for(params)).merge(params, adapter)

    template = inner(None)
    return Method("vera", init_fn, apply_fn, merge_fn, template.logical_axes, merge_blocker=template.merge_blocker,
                  settings={"d_initial": float(d_initial), "projection_prng_key": int(projection_prng_key)},
                  label=f"vera r={rank}")


registry.register("vera", vera)
