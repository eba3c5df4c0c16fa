"""Stacked and unrolled layers: ``layers_{i}/...`` subtrees and one ``layers/...`` stack.

jpeft's models name the parameters of layer ``i`` ``layers_{i}/...`` (as Flax's
``nn.scan``-free modules do). With ``scan_layers`` the ``num_layers`` subtrees become
one ``layers`` subtree whose leaves carry a leading ``(num_layers,)`` axis, which
``jax.lax.scan`` slices. Checkpoint files and the Hugging Face PEFT format always name
one layer at a time, so loaders and exporters convert with these functions; the
convention holds under any prefix (``encoder/layers_3/...`` <-> ``encoder/layers/...``).

Example:
    >>> import jax.numpy as jnp
    >>> p = {"layers_0": {"w": jnp.zeros(3)}, "layers_1": {"w": jnp.ones(3)}, "norm": 1}
    >>> stack_layers(p)["layers"]["w"].shape
    (2, 3)
    >>> stacked_path("encoder/layers_4/mlp/kernel")
    ('encoder/layers/mlp/kernel', 4)
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpeft import tree

STACK = "layers"
_LAYER_RE = re.compile(r"layers_(\d+)")
_PATH_RE = re.compile(r"((?:.*/)?)layers_(\d+)/(.*)")


def layer_names(node: dict) -> list[str]:
    """The ``layers_{i}`` keys of a dict, in layer order.

    Example:
        >>> layer_names({"layers_10": 0, "layers_2": 0, "norm": 0})
        ['layers_2', 'layers_10']
    """
    names = [k for k in node if isinstance(k, str) and _LAYER_RE.fullmatch(k)]
    return sorted(names, key=lambda k: int(k.split("_")[1]))


def stack_layers(params: dict, num_layers: int | None = None) -> dict:
    """``layers_{i}`` subtrees -> one ``layers`` subtree with a leading layer axis (top level only)."""
    names = layer_names(params)
    if num_layers is not None and len(names) != num_layers:
        raise ValueError(f"expected {num_layers} layers_{{i}} subtrees, found {len(names)}")
    out = {k: v for k, v in params.items() if k not in names}
    out[STACK] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
    return out


def unstack_layers(params: dict, num_layers: int | None = None) -> dict:
    """Inverse of :func:`stack_layers`; ``num_layers`` defaults to the stack's length.

    Example:
        >>> unstack_layers({"layers": {"w": jnp.zeros((2, 3))}})["layers_1"]["w"].shape
        (3,)
    """
    if STACK not in params:
        return params
    stack = params[STACK]
    if num_layers is None:
        num_layers = stack_length(stack)
    out = {k: v for k, v in params.items() if k != STACK}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stack)
    return out


def stack_length(stack: Any) -> int:
    """The leading axis length of a stacked subtree."""
    leaves = jax.tree.leaves(stack, is_leaf=lambda x: hasattr(x, "shape"))
    if not leaves:
        raise ValueError("an empty layer stack has no length")
    return int(leaves[0].shape[0])


def stacked_path(path: str) -> tuple[str, int | None]:
    """``(path in the stacked tree, layer index)`` of an unrolled path; ``(path, None)`` outside layers."""
    match = _PATH_RE.fullmatch(path)
    if match is None:
        return path, None
    prefix, index, rest = match.groups()
    return f"{prefix}{STACK}/{rest}", int(index)


def unstacked_path(path: str, index: int) -> str:
    """The path of layer ``index`` for a path inside a ``layers`` stack.

    Example:
        >>> unstacked_path("layers/self_attn/q_proj/kernel", 2)
        'layers_2/self_attn/q_proj/kernel'
    """
    parts = path.split("/")
    if STACK not in parts:
        raise ValueError(f"{path!r} is not inside a {STACK!r} stack")
    i = parts.index(STACK)
    parts[i] = f"layers_{index}"
    return "/".join(parts)


def in_stack(path: str) -> bool:
    """Whether a path lies inside a ``layers`` stack (its leaves have a leading layer axis)."""
    return STACK in path.split("/")


# ----------------------------------------------------------------------------- a stack in segments


@jax.tree_util.register_pytree_node_class
class Segments:
    """A layer stack handed to a model in consecutive parts, some of whose weights come from elsewhere.

    A method that trains slices of a stack (the top layers, one weight type in some layers)
    must neither copy the whole stack nor make ``scan`` differentiate every layer's weights.
    It hands the model a ``Segments`` in place of the stacked subtree:

    * ``shared``: the stacked subtree as it is (every leaf has the leading layer axis); part
      ``[start, stop)`` reads layer ``start + i`` of it in place (``lax.dynamic_index_in_dim``
      inside the loop), so no slice of it is copied;
    * ``parts``: ``((start, stop, own), ...)`` covering ``[0, num_layers)`` in order, where
      ``own`` is a subtree shaped like ``shared`` with ``None`` holes whose leaves (leading axis
      ``stop - start``) take the place of ``shared``'s in those layers.

    :func:`scan` runs one ``lax.scan`` per part. A part that owns nothing depends on no
    trained value, so the backward pass neither computes its weight gradients nor runs
    through it when nothing below it is trained.

    Example:
        >>> shared = {"w": jnp.arange(4.0), "b": jnp.zeros(4)}
        >>> seg = Segments(shared, ((0, 3, {"w": None, "b": None}), (3, 4, {"w": jnp.array([9.0]), "b": None})))
        >>> scan(lambda c, p, x: (c + p["w"], None), 0.0, seg)[0]
        Array(12., dtype=float32)
    """

    def __init__(self, shared: Any, parts: tuple):
        self.shared = shared
        self.parts = tuple((int(start), int(stop), own) for start, stop, own in parts)

    @property
    def length(self) -> int:
        """The number of layers."""
        return self.parts[-1][1] if self.parts else stack_length(self.shared)

    def tree_flatten(self):
        return (self.shared, tuple(own for _, _, own in self.parts)), tuple((a, b) for a, b, _ in self.parts)

    @classmethod
    def tree_unflatten(cls, bounds, children):
        shared, owns = children
        return cls(shared, tuple((a, b, own) for (a, b), own in zip(bounds, owns)))

    def __repr__(self) -> str:
        return f"Segments(parts={[(a, b) for a, b, _ in self.parts]})"


def _reread_rows(prim, *avals, **params) -> bool:
    """Remat policy of a segment's layer: save every intermediate but the rows read from the shared stack.

    Saved, each layer's row would become a stacked residual of the scan: a copy of the
    stack (tests/test_selective.py measures it). The backward pass reads the row again
    instead (a dynamic slice, no arithmetic).
    """
    del avals, params
    return prim.name not in ("dynamic_slice", "squeeze")


def scan(fn, carry: Any, layers: Any, xs: Any = None) -> tuple[Any, Any]:
    """``fn(carry, layer_params, x) -> (carry, y)`` over every layer of a stack, like ``jax.lax.scan``.

    ``layers`` is a stacked subtree (leaves with a leading layer axis) or a :class:`Segments`;
    ``xs`` holds per-layer inputs with a leading layer axis (a KV cache) or is ``None``.
    Returns ``(carry, ys)`` with ``ys`` stacked over all layers.

    Example:
        >>> scan(lambda c, p, x: (c + p["w"], c), 0.0, {"w": jnp.arange(3.0)})[1].tolist()
        [0.0, 0.0, 1.0]
    """
    if not isinstance(layers, Segments):
        return jax.lax.scan(lambda c, inputs: fn(c, *inputs), carry, (layers, xs))
    ys = []
    for start, stop, own in layers.parts:
        if stop <= start:
            continue
        shared = tree.without(layers.shared, own)

        def layer(c, own_i, x_i, i, start=start, shared=shared):
            here = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, start + i, keepdims=False), shared)
            return fn(c, tree.combine(own_i, here), x_i)

        def body(c, inputs, layer=layer):
            i, own_i, x_i = inputs
            return jax.checkpoint(layer, policy=_reread_rows)(c, own_i, x_i, i)

        part_xs = None if xs is None else jax.tree.map(lambda x: x[start:stop], xs)
        carry, y = jax.lax.scan(body, carry, (jnp.arange(stop - start), own, part_xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *parts: jnp.concatenate(parts), *ys)


# ----------------------------------------------------------------------------- remat policies

REMAT_POLICIES = ("none", "layer_input", "dots", "offload")
FETCHED = "jpeft_fetched_layer_params"  # the checkpoint name of a layer's fetched parameters
_FETCH: contextvars.ContextVar = contextvars.ContextVar("jpeft_layer_fetch", default=None)


@contextlib.contextmanager
def fetching_layers(fetch):
    """Within the block, each layer made by :func:`remat_layer` passes its parameters through ``fetch`` first.

    ``fetch(params) -> params`` runs inside the layer's rematerialized region, so the backward
    pass fetches again rather than keeping the fetched copy of every layer (with policy
    ``"none"`` everything else is kept). :func:`jpeft.offload.layers_from_host` uses it to bring a
    frozen base kept in host memory into device memory one layer at a time.

    Example:
        >>> with fetching_layers(lambda p: {"w": p["w"] * 2}):
        ...     f = remat_layer(lambda p, x: p["w"] * x, "dots")
        >>> float(f({"w": jnp.float32(3.0)}, 1.0))
        6.0
    """
    token = _FETCH.set(fetch)
    try:
        yield
    finally:
        _FETCH.reset(token)


def _all_but_fetched(prim, *_, **params) -> bool:
    """Remat policy ``"none"`` with fetched layers: keep every intermediate but the fetched parameters."""
    if prim.name == "name":
        return params.get("name") != FETCHED
    return prim.name != "device_put"  # the copy a fetch makes (the name marks its output, not the copy)


def _fetched_first(fn, fetch):
    def layer(params, *args, **kwargs):
        params = jax.tree.map(lambda x: checkpoint_name(x, FETCHED) if isinstance(x, jax.Array) else x, fetch(params))
        return fn(params, *args, **kwargs)

    return layer


def remat_layer(fn, policy: bool | str | None):
    """``fn`` (one layer) rematerialized in the backward pass by a named policy.

    * ``"none"`` (or ``False``/``None``): every intermediate is kept for the backward pass;
    * ``"layer_input"`` (or ``True``): only each layer's input is kept, the layer runs again;
    * ``"dots"``: the matmul outputs (without batch dimensions) are kept, the rest recomputed;
    * ``"offload"``: those matmul outputs go to host memory (``pinned_host``) and come back
      for the backward pass (backends with memory kinds: TPU, GPU; CPU has them too).

    Example:
        >>> f = remat_layer(lambda x: jnp.sin(x) @ x, "dots")
        >>> jax.grad(lambda x: f(x).sum())(jnp.ones((2, 2))).shape
        (2, 2)
    """
    name = check_remat(policy)
    fetch = _FETCH.get()
    if fetch is not None:  # the layer's parameters are fetched in the layer, and again in its backward pass
        fn = _fetched_first(fn, fetch)
        if name == "none":
            return jax.checkpoint(fn, policy=_all_but_fetched)
    if name == "none":
        return fn
    if name == "layer_input":
        return jax.checkpoint(fn)
    if name == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"))


def check_remat(policy: bool | str | None) -> str:
    """The policy's name (``True`` -> ``"layer_input"``, ``False``/``None`` -> ``"none"``), or a ValueError."""
    if policy is None or policy is False:
        return "none"
    if policy is True:
        return "layer_input"
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES} (or True/False), got {policy!r}")
    return policy
