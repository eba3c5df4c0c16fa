"""Bottleneck adapters: small residual MLPs inside every layer (Houlsby et al., 2019; Pfeiffer et al., 2020).

An adapter maps a block's output ``h`` (width ``D``) to ``h + up(act(down(h)))``
through a bottleneck of width ``r``. The up projection starts at zero, so a fresh
adapter changes nothing. Placements:

* ``"houlsby"``: after the attention block and after the feed-forward block;
* ``"pfeiffer"``: after the feed-forward block only.

The adapter mirrors the parameter tree: ``layers_{i}/{attn,mlp}_adapter/{down,up}/
{kernel,bias}`` (stacked under ``layers`` when the parameters are). ``apply`` puts a
:class:`BottleneckAdapter` at the model's ``layers_{i}/attn_adapter`` and
``mlp_adapter`` hooks (see :mod:`jpeft.models.llama`), which the model calls on the
block's output before the residual add.

There is nothing to merge: the adapters are extra layers with a nonlinearity, which
no base weight can absorb, so ``merge`` raises and ``apply`` is the way to run them.

Example:
    >>> import jax, jpeft
    >>> from jpeft.models import llama
    >>> config = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                            num_layers=2, num_heads=4)
    >>> params = llama.init_params(config, jax.random.key(0))
    >>> method = jpeft.bottleneck(size=4, placement="houlsby")
    >>> adapter = method.init(jax.random.key(1), params)
    >>> adapter["layers_1"]["attn_adapter"]["down"]["kernel"].shape
    (16, 4)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import ops, tree
from jpeft.methods.base import Method

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "swish": jax.nn.silu,
               "tanh": jnp.tanh}
PLACEMENTS = {"houlsby": ("attn_adapter", "mlp_adapter"), "pfeiffer": ("mlp_adapter",)}


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


def _layers(params: Any) -> tuple[list[str], tuple[int, ...], int]:
    """``(layer subtree names, leading axes, D)`` of a Llama-family parameter tree."""
    stacked = "layers" in params
    names = ["layers"] if stacked else sorted(
        (k for k in params if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k.split("_")[1]))
    try:
        o_proj = params[names[0]]["self_attn"]["o_proj"]["kernel"]
    except (IndexError, KeyError, TypeError):
        raise ValueError("bottleneck adapters need a Llama-family parameter tree (layers_{i}/self_attn/... or a "
                         "stacked layers/... subtree); see jpeft.models.llama") from None
    return names, tuple(o_proj.shape[:-2]), o_proj.shape[-1]


def bottleneck(
    size: int = 64,
    *,
    placement: str = "pfeiffer",
    activation: str = "relu",
    dtype=jnp.float32,
) -> Method:
    """Builds a bottleneck-adapter method.

    Args:
        size: the bottleneck width ``r`` (e.g. ``D / 16``).
        placement: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"``
            (after feed-forward only).
        activation: one of ``relu``, ``gelu``, ``silu``/``swish``, ``tanh``.
        dtype: dtype of the adapter weights.

    Returns:
        A :class:`jpeft.Method`. ``down`` starts as PyTorch's ``nn.Linear`` (uniform
        ``+-1/sqrt(D)``, zero bias), ``up`` at zero. ``merge`` raises (see the module docstring).

    Example:
        >>> import jax, jax.numpy as jnp, jpeft
        >>> from jpeft.models import llama
        >>> c = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
        >>> params = llama.init_params(c, jax.random.key(0))
        >>> method = jpeft.bottleneck(size=2)
        >>> applied = method.apply(params, method.init(jax.random.key(1), params))
        >>> type(applied["layers_0"]["mlp_adapter"]).__name__
        'BottleneckAdapter'
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"bottleneck size must be a positive int, got {size!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"bottleneck placement must be one of {tuple(PLACEMENTS)}, got {placement!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"bottleneck activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    slots = PLACEMENTS[placement]

    def init_fn(key: jax.Array, params: Any) -> dict:
        names, lead, d_model = _layers(params)
        bound = 1.0 / math.sqrt(d_model)
        adapter = {}
        for i, (name, slot) in enumerate((n, s) for n in names for s in slots):
            down = jax.random.uniform(jax.random.fold_in(key, i), (*lead, d_model, size), dtype, -bound, bound)
            adapter[name] = {**adapter.get(name, {}), slot: {
                "down": {"kernel": down, "bias": jnp.zeros((*lead, size), dtype)},
                "up": {"kernel": jnp.zeros((*lead, size, d_model), dtype), "bias": jnp.zeros((*lead, d_model), dtype)},
            }}
        return adapter

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> dict:
        del rng
        names, lead, d_model = _layers(params)
        expected = {f"{n}/{s}/{p}/{w}" for n in names for s in slots
                    for p in ("down", "up") for w in ("kernel", "bias")}
        flat = tree.flatten(adapter)
        if set(flat) != expected:
            raise ValueError(
                f"this is not a {placement} bottleneck adapter for these parameters: expected leaves like "
                f"{sorted(expected)[:2]}; missing {sorted(expected - set(flat))[:4]}, unexpected "
                f"{sorted(set(flat) - expected)[:4]}. Was it made by another method, placement or model?")
        out = dict(params)
        for name in names:
            layer = dict(out[name])
            for slot in slots:
                w = adapter[name][slot]
                r = w["down"]["kernel"].shape[-1]
                shapes = {"down/kernel": (*lead, d_model, r), "down/bias": (*lead, r),
                          "up/kernel": (*lead, r, d_model), "up/bias": (*lead, d_model)}
                for part, want in shapes.items():
                    got = tuple(w[part.split("/")[0]][part.split("/")[1]].shape)
                    if got != want:
                        raise ValueError(f"{name}/{slot}/{part} has shape {got} but this model needs {want}; "
                                         "was the adapter made for another model?")
                if slot in layer:
                    raise ValueError(f"{name} already has an {slot}; apply one bottleneck adapter at a time.")
                layer[slot] = BottleneckAdapter(w["down"]["kernel"], w["down"]["bias"], w["up"]["kernel"],
                                                w["up"]["bias"], activation)
            out[name] = layer
        return out

    def merge_fn(params: Any, adapter: Any) -> dict:
        raise ValueError(
            "bottleneck adapters cannot be merged: they are extra layers with a nonlinearity that no base weight "
            "can absorb. Run the model with method.apply(params, adapter) instead (jpeft's models call the "
            "adapters at their attn_adapter / mlp_adapter hooks).")

    return Method("bottleneck", init_fn, apply_fn, merge_fn)
