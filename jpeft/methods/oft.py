"""OFT: a block-diagonal orthogonal rotation of each adapted layer's input (Qiu et al., 2023; PEFT 0.21's ``OFTConfig``).

For a kernel seen as the matrix ``(I, O)`` (input axes flattened row-major, then output
axes), the input is cut into ``n = I / b`` blocks of ``b`` features and each block is
rotated by its own orthogonal ``R_i (b, b)``: ``y = (x @ blockdiag(R_1..R_n)) @ W``, so the
merged kernel is ``W' = blockdiag(R) @ W`` (torch's ``(O, I)`` weight: ``W'^T = R W^T``, PEFT's
``merge``). As in PEFT 0.14 and later:

* each ``R_i`` is the Cayley transform of a skew-symmetric ``Q_i`` whose strict upper
  triangle (row-major) is the trainable vector: the adapter holds ``R (*lead, n, b(b-1)/2)``
  (PEFT's ``oft_R.weight``); ``R_i = (I - Q_i)(I + Q_i)^-1`` exactly, or with
  ``use_cayley_neumann`` (PEFT's default) its truncated Neumann series
  ``I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1)`` for ``k = num_cayley_neumann_terms`` (PEFT's
  loop, term for term, including its ``k = 3`` case);
* ``block_size`` (PEFT's ``oft_block_size``, default 32) or ``r`` (the number of blocks)
  decides the blocks, one of them non-zero; a size that does not divide ``I`` is adjusted
  as PEFT's ``adjust_oft_parameters`` does (with its warning);
* ``block_share``: one ``R`` for all blocks of a weight (``R (*lead, 1, b(b-1)/2)``);
* init: ``Q = 0``, so every ``R_i`` is the identity and a fresh adapter changes nothing, exactly.

``apply`` never forms a full-size weight: each op reshapes ``x`` to ``(..., n, b)``, rotates
the blocks (``n b^2`` multiply-adds per row) and runs the frozen matmul on the result, so a
4-bit base stays 4-bit and gets no gradient. ``merge`` forms ``blockdiag(R) @ W`` per weight.

Not supported: ``coft`` (PEFT's constrained OFT projects the parameters in place on every
forward, a training-time state update jpeft's functional step does not make; a file with it
is refused), ``module_dropout`` (training-only: a file trained with it loads exactly, with a
warning), embedding and convolution layers, ``bias`` other than ``none``, ``modules_to_save``.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"dense": {"kernel": jnp.ones((8, 3))}}
    >>> method = jpeft.oft(block_size=4, targets=r".*/kernel")
    >>> adapter = method.init(jax.random.key(0), params)
    >>> adapter["dense"]["kernel"]["R"].shape      # 2 blocks of 4: 6 = 4 * 3 / 2 per block
    (2, 6)
    >>> x = jnp.arange(8.0)
    >>> bool(jnp.all(jpeft.ops.linear(x, method.apply(params, adapter)["dense"]["kernel"]) == x @ params["dense"]["kernel"]))
    True
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ops, tree
from jpeft.errors import SettingError
from jpeft.methods import delta, registry
from jpeft.methods.base import Method


def adjust(in_features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``in_features`` nearest ``value`` (the lower on a tie).

    Example:
        >>> adjust(576, 32), adjust(100, 32), adjust(20, 32)
        (32, 25, 20)
    """
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def blocks(in_size: int, block_size: int, r: int) -> tuple[int, int]:
    """``(block size, number of blocks)`` of a weight with ``in_size`` inputs, as PEFT's ``update_layer`` picks them.

    Example:
        >>> blocks(576, 32, 0), blocks(1536, 0, 8)
        ((32, 18), (192, 8))
    """
    if r == 0:
        size = block_size
        if in_size % size != 0 or size > in_size:
            size = adjust(in_size, size)
            warnings.warn(f"OFT: block_size {block_size} does not divide a weight's {in_size} inputs; adjusted to "
                          f"{size} (as PEFT does)", stacklevel=4)
        return size, in_size // size
    count = r
    if in_size % count != 0 or count > in_size:
        count = adjust(in_size, count)
        warnings.warn(f"OFT: r={r} blocks do not divide a weight's {in_size} inputs; adjusted to {count} "
                      "(as PEFT does)", stacklevel=4)
    return in_size // count, count


def rotations(vec_NxE: jax.Array, block_size: int, neumann_terms: int) -> jax.Array:
    """The orthogonal blocks ``(n, b, b)`` of PEFT's ``_cayley_batch`` for upper-triangle vectors ``(n, b(b-1)/2)``.

    ``neumann_terms = 0``: the exact Cayley transform ``(I - Q)(I + Q)^-1``.

    Example:
        >>> r = rotations(jnp.array([[0.1, 0.2, 0.3]]), 3, 0)
        >>> bool(jnp.allclose(r[0] @ r[0].T, jnp.eye(3), atol=1e-6))
        True
    """
    rows, cols = np.triu_indices(block_size, 1)
    n = vec_NxE.shape[0]
    upper = jnp.zeros((n, block_size, block_size), vec_NxE.dtype).at[:, rows, cols].set(vec_NxE)
    q = upper - jnp.swapaxes(upper, -1, -2)
    eye = jnp.broadcast_to(jnp.eye(block_size, dtype=vec_NxE.dtype), q.shape)
    if neumann_terms == 0:      # R (I + Q) = I - Q, solved as (I + Q)^T R^T = (I - Q)^T
        return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + q, -1, -2), jnp.swapaxes(eye - q, -1, -2)), -1, -2)
    r = eye
    if neumann_terms > 1:
        r = r + 2.0 * q
        if neumann_terms > 2:
            power = q @ q
            r = r + 2.0 * power
            for _ in range(3, neumann_terms - 1):
                power = power @ q
                r = r + 2.0 * power
            r = r + power @ q
    return r


ROTATIONS = "rotations"
"""The factor an exact-Cayley :class:`OftWeight` carries its blocks ``(*lead, n or 1, b, b)`` in (see below)."""


def with_exact_rotations(params: Any) -> Any:
    """Every exact-Cayley :class:`OftWeight` in ``params`` with its rotation blocks made now, for all layers at once.

    The exact transform solves a ``b x b`` system per block. Made inside the layers' ``lax.scan``
    (stacked layers), those solves hung on jax 0.10.2's CPU backend; made here, in one batched
    solve per weight before the model runs, the scan body only multiplies. Gradients flow
    through the solve to ``R`` as before. The Neumann series (no solve) stays in the layers.

    Example:
        >>> params = {"w": OftWeight(jnp.ones((2, 4, 3)), {"R": jnp.zeros((2, 2, 1))}, neumann_terms=0)}
        >>> with_exact_rotations(params)["w"].factors[ROTATIONS].shape   # 2 layers, 2 blocks of 2 x 2
        (2, 2, 2, 2)
    """
    def made(leaf):
        if not isinstance(leaf, OftWeight) or leaf.neumann_terms != 0 or ROTATIONS in leaf.factors:
            return leaf
        vec = leaf.factors["R"]
        blocks_NxBxB = rotations(vec.reshape(-1, vec.shape[-1]).astype(jnp.float32), leaf.block_size, 0)
        blocks = blocks_NxBxB.reshape(*vec.shape[:-1], leaf.block_size, leaf.block_size)
        return dataclasses.replace(leaf, factors={**leaf.factors, ROTATIONS: blocks})

    return jax.tree.map(made, params, is_leaf=lambda x: isinstance(x, OftWeight))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OftWeight(delta.DeltaWeight):
    """A weight whose input is rotated blockwise first: ops run ``(x @ blockdiag(R)) @ W``, never ``W'``.

    ``factors["R"]`` is ``(*lead, n or 1, b(b-1)/2)``; the block size follows from its last axis.
    ``neumann_terms``: PEFT's ``num_cayley_neumann_terms``, or 0 for the exact Cayley transform.
    """

    neumann_terms: int = dataclasses.field(default=5, metadata=dict(static=True))

    @property
    def block_size(self) -> int:
        elements = self.factors["R"].shape[-1]
        return int(round((1 + math.sqrt(1 + 8 * elements)) / 2))

    def _blocks(self, factors: dict, dtype) -> jax.Array:
        """``(n, b, b)`` rotations of one unstacked weight (a shared block repeated ``n`` times): the
        ``rotations`` made before the layers run (:func:`with_exact_rotations`), else made here."""
        if ROTATIONS in factors:
            r = factors[ROTATIONS].astype(dtype)
        else:
            r = rotations(factors["R"].astype(jnp.float32), self.block_size, self.neumann_terms).astype(dtype)
        return jnp.broadcast_to(r, (self.in_size // self.block_size, *r.shape[1:]))

    def _rotate(self, x_NxI: jax.Array) -> jax.Array:
        r_nxbxb = self._blocks(self.factors, x_NxI.dtype)
        x_blocks = x_NxI.reshape(*x_NxI.shape[:-1], *r_nxbxb.shape[:2])
        return jnp.einsum("...rk,rkc->...rc", x_blocks, r_nxbxb).reshape(x_NxI.shape)

    def materialize(self, dtype=None) -> jax.Array:
        def one(factors, base):
            r_nxbxb = self._blocks(factors, jnp.float32)
            w = base.reshape(*r_nxbxb.shape[:2], -1)
            return jnp.einsum("rkc,rco->rko", r_nxbxb, w).reshape(base.shape)

        fn = one
        for _ in range(self.lead):
            fn = jax.vmap(fn)
        return fn(self.factors, ops.as_array(self.base, jnp.float32)).astype(dtype or self.dtype)

    def linear(self, x: jax.Array) -> jax.Array:
        self._unstacked("linear")
        return ops.linear(self._rotate(x), self.base)

    def einsum(self, subscripts: str, x: jax.Array) -> jax.Array:
        self._unstacked("einsum")
        x_sub, w_in, w_out, out = ops.split_subscripts(subscripts, self.inputs)
        kept = "".join(c for c in x_sub if c not in w_in)
        x_in_last = jnp.einsum(f"{x_sub}->{kept}{w_in}", x)        # the weight's input axes last, in its order
        lead_shape = x_in_last.shape[:len(kept)]
        x_rot = self._rotate(x_in_last.reshape(*lead_shape, self.in_size)).reshape(x_in_last.shape)
        return ops.einsum(f"{kept}{w_in},{w_in}{w_out}->{out}", x_rot, self.base)

    @staticmethod
    def factor_axes(name: str, in_axes: tuple, out_axes: tuple) -> tuple:
        """The blocks' parameters mix the weight's input features: replicated (they are small)."""
        return (None, None)


def _kind(block_size: int, r: int, block_share: bool, neumann_terms: int) -> delta.DeltaKind:
    def shapes(d_in: tuple, d_out: tuple, rank: int) -> delta.Shapes:
        size, count = blocks(math.prod(d_in), block_size, r)
        return {"R": (1 if block_share else count, size * (size - 1) // 2)}

    def init(key, shapes: delta.Shapes, in_size: int, out_size: int, rank: int, dtype) -> dict:
        del key
        return {"R": jnp.zeros(shapes["R"], dtype)}            # Q = 0: every block is the identity

    label = f"oft b={block_size}" if r == 0 else f"oft r={r}"
    return delta.DeltaKind("oft", "OFT", shapes, init, OftWeight, lambda _: label,
                           options=(("neumann_terms", neumann_terms),))


def oft(
    block_size: int = 32,
    r: int = 0,
    targets: tree.Targets = r".*/(q|k|v|o)_proj/kernel",
    *,
    block_share: bool = False,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    coft: bool = False,
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """Builds an OFT method (defaults: Hugging Face PEFT 0.21's ``OFTConfig``: blocks of 32, Cayley-Neumann, 5 terms).

    Args:
        block_size: PEFT's ``oft_block_size`` (0 when ``r`` is given).
        r: the number of blocks per weight instead (PEFT's ``r``; 0 when ``block_size`` is given).
        targets: which kernels to adapt (regexes, predicates or :class:`jpeft.Rule` objects
            without per-rule settings).
        block_share: one rotation shared by all blocks of a weight.
        use_cayley_neumann: the truncated Neumann series instead of the exact inverse.
        num_cayley_neumann_terms: the series' terms (PEFT's loop; see the module docstring).
        coft: PEFT's constrained OFT; not supported (an error).
        dtype: dtype of the trainable vectors.
        model: the :class:`jpeft.models.Model` whose parameters are adapted.

    Returns:
        A :class:`jpeft.Method`; its adapter holds ``R (n, b(b-1)/2)`` per kernel (``(1, ...)`` when shared).
    """
    for name, value in (("block_size", block_size), ("r", r), ("num_cayley_neumann_terms", num_cayley_neumann_terms)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise SettingError(name, value, "must be an integer >= 0", what="OFT")
    if (block_size != 0) == (r != 0):
        raise SettingError("block_size", block_size, f"and r={r}: give exactly one of them non-zero (PEFT's rule: "
                           "r blocks of block_size make the input size)", what="OFT")
    if block_size == 1:
        raise SettingError("block_size", block_size, "must be at least 2 (a 1 x 1 rotation has no parameter)",
                           what="OFT")
    for name, value in (("block_share", block_share), ("use_cayley_neumann", use_cayley_neumann), ("coft", coft)):
        if not isinstance(value, bool):
            raise SettingError(name, value, "must be true or false", what="OFT")
    if coft:
        raise SettingError("coft", coft, "is not supported: PEFT's constrained OFT rewrites its parameters in place "
                           "on every forward pass; use coft=false", what="OFT")
    if use_cayley_neumann and num_cayley_neumann_terms == 0:
        raise SettingError("num_cayley_neumann_terms", 0, "must be >= 1 with use_cayley_neumann", what="OFT")
    rules = tree.as_rules(targets)
    for rule in rules:
        if rule.settings:
            raise ValueError(f"{rule!r} has per-rule settings {sorted(rule.settings)}; OFT's block size is one for "
                             "all targets (PEFT's); give block_size= or r= to jpeft.oft")
    terms = num_cayley_neumann_terms if use_cayley_neumann else 0
    method = delta.delta_method(_kind(block_size, r, block_share, terms), 1, 1.0, rules, dtype=dtype, model=model)
    settings = {"block_size": block_size, "r": r, "block_share": block_share,
                "use_cayley_neumann": use_cayley_neumann, "num_cayley_neumann_terms": num_cayley_neumann_terms}
    label = (f"oft b={block_size}" if r == 0 else f"oft r={r}") + (" shared" if block_share else "")
    if use_cayley_neumann:
        return method._replace(settings=settings, label=label)

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        return with_exact_rotations(method.apply(params, adapter, rng=rng))

    return method._replace(apply=apply_fn, settings=settings, label=label)


registry.register("oft", oft)
