"""Bottleneck adapters: small residual MLPs inside every layer (Houlsby et al., 2019; Pfeiffer et al., 2020).

An adapter maps a block's output ``h`` (width ``D``) to ``h + up(act(down(h)))``
through a bottleneck of width ``r``. The up projection starts at zero, so a fresh
adapter changes nothing. Placements:

* ``"houlsby"``: after the attention block and after the feed-forward block;
* ``"pfeiffer"``: after the feed-forward block only.

The model says where its blocks end: its ``attn_output`` and ``mlp_output`` hook points
(``block`` :class:`~jpeft.models.hooks.HookPoint`). The adapter holds every layer's
weights stacked, ``{"attn_output" | "mlp_output": {"down" | "up": {"kernel", "bias"}}}``
with a leading ``(L,)`` axis, so one adapter fits the model whether it stacks its layers
or not; ``apply`` attaches a :class:`BottleneckAdapter` at each hook point.

There is nothing to merge: the adapters are extra layers with a nonlinearity, which
no base weight can absorb, so ``merge`` raises and ``apply`` is the way to run them.

Example:
    >>> import jax, jpeft
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                       num_layers=2, num_heads=4))
    >>> method = jpeft.bottleneck(size=4, placement="houlsby", model=model)
    >>> adapter = method.init(jax.random.key(1), model.init(jax.random.key(0)))
    >>> adapter["attn_output"]["down"]["kernel"].shape   # (layers, D, size)
    (2, 16, 4)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jpeft import ops, tree
from jpeft.errors import SettingError
from jpeft.methods import registry
from jpeft.methods.base import Method
import jpeft.models.hooks as hooks

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "swish": jax.nn.silu,
               "tanh": jnp.tanh}
PLACEMENTS = {"houlsby": ("attn_output", "mlp_output"), "pfeiffer": ("mlp_output",)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BottleneckAdapter:
    """``h -> h + up(act(down(h)))``, the callable a model finds at an adapter hook.

    Example:
        >>> import jax.numpy as jnp
        >>> a = BottleneckAdapter(jnp.ones((2, 1)), jnp.zeros(1), jnp.ones((1, 2)), jnp.zeros(2))
        >>> a(jnp.array([[1.0, -3.0]])).tolist()
        [[1.0, -3.0]]
    """

    down_kernel: jax.Array
    down_bias: jax.Array
    up_kernel: jax.Array
    up_bias: jax.Array
    activation: str = dataclasses.field(default="relu", metadata=dict(static=True))

    def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
        z_BxTxR = ACTIVATIONS[self.activation](ops.linear(h_BxTxD, self.down_kernel, self.down_bias))
        return h_BxTxD + ops.linear(z_BxTxR, self.up_kernel, self.up_bias)


def bottleneck(
    size: int = 64,
    *,
    placement: Literal["pfeiffer", "houlsby"] = "pfeiffer",
    activation: Literal["relu", "gelu", "silu", "swish", "tanh"] = "relu",
    dtype=jnp.float32,
    model: Any = None,
) -> Method:
    """Builds a bottleneck-adapter method.

    Args:
        size: the bottleneck width ``r`` (e.g. ``D / 16``).
        placement: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"``
            (after feed-forward only).
        activation: one of ``relu``, ``gelu``, ``silu``/``swish``, ``tanh``.
        dtype: dtype of the adapter weights.
        model: the :class:`jpeft.models.Model` (its ``attn_output`` / ``mlp_output`` hook points).

    Returns:
        A :class:`jpeft.Method`. ``down`` starts as PyTorch's ``nn.Linear`` (uniform
        ``+-1/sqrt(D)``, zero bias), ``up`` at zero. ``merge`` raises (see the module docstring).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise SettingError("size", size, "must be a positive int", what="bottleneck")
    if placement not in PLACEMENTS:
        raise SettingError("placement", placement, f"must be one of {tuple(PLACEMENTS)}", what="bottleneck")
    if activation not in ACTIVATIONS:
        raise SettingError("activation", activation, f"must be one of {tuple(ACTIVATIONS)}", what="bottleneck")
    if model is None:
        raise ValueError("bottleneck adapters feed the model's block-output hook points: pass model= "
                         "(a jpeft.models.Model)")
    points = {slot: model.hook(slot) for slot in PLACEMENTS[placement]}

    def init_fn(key: jax.Array, params: Any) -> dict:
        del params
        adapter = {}
        for i, (slot, point) in enumerate(points.items()):
            lead, d_model = (point.layers,), point.width
            bound = 1.0 / math.sqrt(d_model)
            down = jax.random.uniform(jax.random.fold_in(key, i), (*lead, d_model, size), dtype, -bound, bound)
            adapter[slot] = {
                "down": {"kernel": down, "bias": jnp.zeros((*lead, size), dtype)},
                "up": {"kernel": jnp.zeros((*lead, size, d_model), dtype), "bias": jnp.zeros((*lead, d_model), dtype)},
            }
        return adapter

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        del rng
        model.check_params(params)
        expected = {f"{s}/{p}/{w}" for s in points for p in ("down", "up") for w in ("kernel", "bias")}
        flat = tree.flatten(adapter)
        if set(flat) != expected:
            raise ValueError(
                f"this is not a {placement} bottleneck adapter: expected leaves like {sorted(expected)[:2]}; "
                f"missing {sorted(expected - set(flat))[:4]}, unexpected {sorted(set(flat) - expected)[:4]}. "
                "Was it made by another method or placement?")
        for slot, point in points.items():
            w = adapter[slot]
            r = w["down"]["kernel"].shape[-1]
            lead, d_model = (point.layers,), point.width
            shapes = {"down/kernel": (*lead, d_model, r), "down/bias": (*lead, r),
                      "up/kernel": (*lead, r, d_model), "up/bias": (*lead, d_model)}
            for part, want in shapes.items():
                got = tuple(flat[f"{slot}/{part}"].shape)
                if got != want:
                    raise ValueError(f"{slot}/{part} has shape {got} but this model needs {want}; "
                                     "was the adapter made for another model?")
            module = BottleneckAdapter(w["down"]["kernel"], w["down"]["bias"], w["up"]["kernel"], w["up"]["bias"],
                                       activation)
            params = hooks.attach(params, point, module)
        return params

    def merge_fn(params: Any, adapter: Any) -> dict:
        raise ValueError(
            "bottleneck adapters cannot be merged: they are extra layers with a nonlinearity that no base weight "
            "can absorb. Run the model with method.apply(params, adapter) instead (jpeft's models call the "
            "adapters at their block-output hook points).")

    def merge_blocker(params: Any) -> str:
        del params
        return "bottleneck adapters are extra layers with a nonlinearity: they cannot be merged"

    return Method("bottleneck", init_fn, apply_fn, merge_fn, merge_blocker=merge_blocker,
                  label=f"bottleneck {placement} r={size}")


registry.register("bottleneck", bottleneck)
