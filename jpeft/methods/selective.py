"""Selective fine-tuning: train a chosen subset of the model's own weights, in place.

Which weights: the same rules as every method (regexes fullmatched against
``/``-joined paths, predicates, :class:`jpeft.Rule`; first match wins; a rule that
matches nothing is an error), matched against the paths **as the model's layers name
them**: a weight of a scanned (stacked) layer is seen once per layer,
``layers_{i}/self_attn/q_proj/kernel``, whether the model stacks its layers or not. So
``targets=r"layers_(28|29)/.*"`` or ``top_layers=2`` picks two layers, ``r".*/self_attn/.*"``
only attention, and :func:`bitfit` the biases.

The adapter holds exactly the selected weights under those per-layer paths (a trained
copy each, in the base's dtype). For a stacked weight it holds only the chosen layers'
slices, never the whole stack, and the gradient exists only for them:

* with unrolled layers, ``apply`` puts the trained leaves in place of the originals (pass
  ``jpeft.tree.without(params, adapter)`` as the frozen tree so they are not held twice);
* with a stack, ``apply`` hands the model a :class:`jpeft.stack.Segments`: runs of
  layers that train the same weights, each scanned on its own, reading the frozen stack
  in place. Layers below the lowest trained one cost no backward pass at all, and frozen
  weights cost no weight gradient;
* ``merge`` writes the trained leaves (and slices) into plain arrays: exact.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"layers": {"w": jnp.zeros((4, 3, 3)), "bias": jnp.zeros((4, 3))}, "head": jnp.ones((3, 2))}
    >>> method = jpeft.selective(top_layers=2)           # the top two layers' weights, nothing else
    >>> adapter = method.init(jax.random.key(0), params)
    >>> sorted(jpeft.tree.flatten(adapter))
    ['layers_2/bias', 'layers_2/w', 'layers_3/bias', 'layers_3/w']
    >>> method.merge(params, jax.tree.map(lambda x: x + 1, adapter))["layers"]["bias"][:, 0].tolist()
    [0.0, 0.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from jpeft import stack
from jpeft import ops, tree
from jpeft.errors import SettingError
from jpeft.layout import default_layout
from jpeft.methods import registry
from jpeft.methods.base import Method, flatten_axes


class Slot(NamedTuple):
    """One weight as the model's layers name it.

    Attributes:
        source: the parameter's path (``layers/mlp/up_proj/kernel`` for a stacked one).
        layer: the layer it belongs to (from ``layers_{i}``), or ``None`` outside the layers.
        sliced: whether it is row ``layer`` of a stacked parameter.
        leaf: its shape and dtype (``jax.ShapeDtypeStruct``).
        kind: its role from the logical axes: ``"kernel"``, ``"table"`` or ``"vector"``.
    """

    source: str
    layer: int | None
    sliced: bool
    leaf: Any
    kind: str


def layer_view(params: Any, model: Any = None) -> dict[str, Slot]:
    """``{per-layer path: Slot}`` for every weight; a stacked one appears once per layer.

    Roles come from ``model``'s logical axes when given, else from the per-layer shape
    (:func:`jpeft.layout.default_layout`).

    Example:
        >>> import jax.numpy as jnp
        >>> view = layer_view({"layers": {"scale": jnp.ones((2, 4))}, "norm": jnp.ones(4)})
        >>> sorted(view), view["layers_1/scale"].source, view["layers_1/scale"].kind
        (['layers_0/scale', 'layers_1/scale', 'norm'], 'layers/scale', 'vector')
    """
    layouts = model.layouts() if model is not None else {}
    out = {}
    for path, leaf in tree.flatten(params).items():
        shape, dtype = tuple(leaf.shape), getattr(leaf, "dtype", jnp.float32)
        if stack.in_stack(path):
            per_layer = jax.ShapeDtypeStruct(shape[1:], dtype)
            kind = layouts[path].kind if path in layouts else default_layout(shape[1:]).kind
            for i in range(shape[0]):
                out[stack.unstacked_path(path, i)] = Slot(path, i, True, per_layer, kind)
        else:
            kind = layouts[path].kind if path in layouts else default_layout(shape).kind
            out[path] = Slot(path, stack.stacked_path(path)[1], False, jax.ShapeDtypeStruct(shape, dtype), kind)
    return out


def num_layers(view: Mapping[str, Slot], model: Any = None) -> int:
    """The number of layers: the model's, else one more than the highest layer index (0 without layers)."""
    if model is not None:
        return model.num_layers
    return 1 + max((s.layer for s in view.values() if s.layer is not None), default=-1)


def choose(params: Any, targets: tree.Targets, model: Any = None) -> dict[str, Slot]:
    """The slots ``targets`` select, matched against per-layer paths (a rule that matches nothing is an error)."""
    view = layer_view(params, model)
    chosen = tree.assign(tree.unflatten({p: s.leaf for p, s in view.items()}), targets)
    return {p: view[p] for p in sorted(chosen)}


def check_layers(top_layers: int | None, layers: list[int] | None, what: str) -> None:
    """Value checks of ``top_layers`` / ``layers`` that need no model (a :class:`SettingError` each)."""
    if top_layers is not None and layers is not None:
        raise SettingError("layers", layers, "cannot be given together with top_layers; use one of them", what=what)
    if top_layers is not None and (not isinstance(top_layers, int) or isinstance(top_layers, bool) or top_layers < 1):
        raise SettingError("top_layers", top_layers, "must be a positive integer (how many layers, from the top)",
                           what=what)
    if layers is not None:
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise SettingError("layers", layers, "must be a non-empty list of layer indices (negative: from the top)",
                               what=what)
        if len(set(layers)) != len(layers):
            raise SettingError("layers", layers, "names a layer twice", what=what)


def layer_set(top_layers: int | None, layers: list[int] | None, count: int, what: str) -> frozenset[int] | None:
    """The layer indices ``top_layers`` / ``layers`` name in a model of ``count`` layers (``None``: all)."""
    if top_layers is not None:
        if top_layers > count:
            raise SettingError("top_layers", top_layers, f"is more than the model's {count} layers", what=what)
        return frozenset(range(count - top_layers, count))
    if layers is not None:
        bad = [i for i in layers if not -count <= i < count]
        if bad:
            raise SettingError("layers", layers, f"has index {bad[0]} outside the model's {count} layers "
                               f"(0..{count - 1}, or -{count}..-1 counted from the top)", what=what)
        chosen = [i % count for i in layers]
        if len(set(chosen)) != len(chosen):
            raise SettingError("layers", layers, "names a layer twice (a negative index counts from the top)",
                               what=what)
        return frozenset(chosen)
    return None


# ----------------------------------------------------------------------------- apply / merge


def _slots_of(params: Any) -> dict[str, Any]:
    """``{path: leaf}`` including ``None`` holes (weights an adapter took out of the frozen tree)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None or ops.is_wrapper(x))
    return {tree.path_to_str(kp): leaf for kp, leaf in leaves}


def _place(params: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, dict[int, Any]]]:
    """``(whole leaves by path, {stacked path: {layer: slice}})`` for an adapter's leaves, checked against ``params``."""
    slots = _slots_of(params)
    whole: dict[str, Any] = {}
    sliced: dict[str, dict[int, Any]] = {}
    for path, leaf in tree.flatten(adapter).items():
        if path in slots:
            base = slots[path]
            if base is not None and tuple(base.shape) != tuple(leaf.shape):
                raise ValueError(f"adapter leaf {path!r} has shape {tuple(leaf.shape)} but the parameter has shape "
                                 f"{tuple(base.shape)}; was the adapter made for another model?")
            whole[path] = leaf
            continue
        source, layer = stack.stacked_path(path)
        base = slots.get(source)
        if layer is None or base is None:
            raise ValueError(f"adapter leaf {path!r} is no parameter of this model, nor a layer of a stacked one; "
                             "was the adapter made for another model or by another method?")
        if not 0 <= layer < base.shape[0] or tuple(base.shape[1:]) != tuple(leaf.shape):
            raise ValueError(f"adapter leaf {path!r} of shape {tuple(leaf.shape)} does not fit the stacked parameter "
                             f"{source!r} of shape {tuple(base.shape)}; was the adapter made for another model?")
        sliced.setdefault(source, {})[layer] = leaf
    return whole, sliced


def _fill(params: Any, leaves: Mapping[str, Any]) -> Any:
    """``params`` with ``leaves`` put at their paths (over a leaf or a ``None`` hole)."""
    if not leaves:
        return params
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: leaves.get(tree.path_to_str(kp), leaf), params,
                                            is_leaf=lambda x: x is None or ops.is_wrapper(x))


def _stack_root(source: str) -> tuple[str, str]:
    """``(path of the stack, path inside it)`` of a stacked parameter's path."""
    parts = source.split("/")
    cut = parts.index(stack.STACK) + 1
    return "/".join(parts[:cut]), "/".join(parts[cut:])


def _subtree(params: Any, path: str) -> Any:
    node = params
    for key in path.split("/"):
        node = node[key]
    return node


def _with_subtree(params: dict, path: str, value: Any) -> dict:
    head, _, rest = path.partition("/")
    return {**params, head: _with_subtree(params[head], rest, value) if rest else value}


def segments(stacked: Any, rows: Mapping[str, Mapping[int, Any]]) -> stack.Segments:
    """A stacked subtree as :class:`~jpeft.stack.Segments` in which ``rows[path][layer]`` replace its slices.

    Consecutive layers that replace the same weights form one part; each part's replaced
    slices are stacked (a copy of the trained slices only), the rest is read in place.

    Example:
        >>> import jax.numpy as jnp
        >>> seg = segments({"w": jnp.zeros((4, 2)), "b": jnp.zeros((4, 2))}, {"w": {2: jnp.ones(2), 3: jnp.ones(2)}})
        >>> seg
        Segments(parts=[(0, 2), (2, 4)])
    """
    length = stack.stack_length(stacked)
    owners = [frozenset(p for p, by_layer in rows.items() if i in by_layer) for i in range(length)]
    parts, start = [], 0
    for i in range(1, length + 1):
        if i < length and owners[i] == owners[start]:
            continue
        own = {p: jnp.stack([rows[p][j] for j in range(start, i)]) for p in owners[start]}
        own_tree = jax.tree_util.tree_map_with_path(lambda kp, _: own.get(tree.path_to_str(kp)), stacked,
                                                    is_leaf=ops.is_wrapper)
        parts.append((start, i, own_tree))
        start = i
    return stack.Segments(stacked, tuple(parts))


def apply_selected(params: Any, adapter: Any) -> Any:
    """The parameters with the adapter's trained weights in place (stacks become :class:`Segments`).

    Needs no rules: each adapter leaf's path says where it goes (a parameter's path, or
    ``layers_{i}/...`` for row ``i`` of a stacked one).
    """
    whole, sliced = _place(params, adapter)
    out = _fill(params, whole)
    by_stack: dict[str, dict[str, dict[int, Any]]] = {}
    for source, rows in sliced.items():
        root, inner = _stack_root(source)
        by_stack.setdefault(root, {})[inner] = rows
    for root, rows in by_stack.items():
        out = _with_subtree(out, root, segments(_subtree(out, root), rows))
    return out


def merge_selected(params: Any, adapter: Any) -> Any:
    """Plain parameters with the adapter's trained weights (and stacked slices) written in."""
    whole, sliced = _place(params, adapter)
    flat = tree.flatten(params)
    for source, rows in sliced.items():
        layers = sorted(rows)
        base = flat[source]
        whole[source] = base.at[jnp.asarray(layers)].set(jnp.stack([rows[i] for i in layers]).astype(base.dtype))
    return _fill(params, whole)


def selected_axes(adapter: Any, param_axes: Any) -> dict:
    """Logical axes of an adapter of selected weights: the parameter's (a stacked one's without ``layers``)."""
    flat_axes = flatten_axes(param_axes)
    out = {}
    for path, leaf in tree.flatten(adapter).items():
        source, layer = stack.stacked_path(path)
        if path in flat_axes:
            axes = flat_axes[path]
        elif layer is not None and source in flat_axes:
            axes = flat_axes[source][1:]
        else:
            axes = (None,) * len(leaf.shape)
        out[path] = tuple(axes)
    return tree.unflatten(out)


def selection_method(name: str, pick: Callable[[Any], Mapping[str, Slot]], *, label: str, **fields) -> Method:
    """A :class:`Method` training the slots ``pick(params)`` chooses, in place (BitFit, chosen layers, ULMFiT stages).

    ``fields``: further :class:`Method` fields (ULMFiT's ``training``).
    """

    def init_fn(key: jax.Array, params: Any) -> dict:
        del key
        chosen = pick(params)
        flat = tree.flatten(params)
        wrapped = sorted(p for p, s in chosen.items() if ops.is_wrapper(flat[s.source]))
        if wrapped:
            raise ValueError(f"{name} trains weights in place, but {wrapped[0]!r} is a "
                             f"{type(flat[chosen[wrapped[0]].source]).__name__} (a quantized base cannot be trained); "
                             "load the base unquantized, or narrow the targets")
        out = {}
        for path, slot in chosen.items():
            leaf = flat[slot.source]
            # A copy, so donating the adapter to a train step never frees the base weights.
            out[path] = leaf[slot.layer] if slot.sliced else jnp.array(leaf, copy=True)
        return tree.unflatten(out)

    def apply_fn(params: Any, adapter: Any, *, rng: jax.Array | None = None) -> Any:
        del rng
        return apply_selected(params, adapter)

    return Method(name, init_fn, apply_fn, merge_selected, logical_axes=selected_axes, label=label, **fields)


# ----------------------------------------------------------------------------- builders


def selective(
    targets: tree.Targets = r".*",
    *,
    top_layers: int | None = None,
    layers: list[int] | None = None,
    model: Any = None,
) -> Method:
    """Trains the weights ``targets`` select, optionally only inside some layers.

    Args:
        targets: rules matched against per-layer paths (``layers_{i}/...``, see the module
            docstring): ``r".*/self_attn/.*"`` (attention only), ``r".*/(input|post_attention)_layernorm/.*"``.
        top_layers: keep only weights inside the top ``k`` layers.
        layers: keep only weights inside these layers (negative indices count from the top).
        model: the :class:`jpeft.models.Model` (roles and the number of layers).

    Returns:
        A :class:`jpeft.Method` whose adapter is the selected weights under per-layer paths.

    Example:
        >>> import jax, jax.numpy as jnp, jpeft
        >>> params = {"layers": {"attn": jnp.zeros((3, 2, 2)), "mlp": jnp.zeros((3, 2, 2))}}
        >>> adapter = jpeft.selective(r".*/attn", layers=[0, -1]).init(jax.random.key(0), params)
        >>> sorted(jpeft.tree.flatten(adapter))
        ['layers_0/attn', 'layers_2/attn']
    """
    what = "selective"
    check_layers(top_layers, layers, what)
    rules = tree.as_rules(targets)

    def pick(params: Any) -> dict[str, Slot]:
        chosen = choose(params, rules, model)
        keep = layer_set(top_layers, layers, num_layers(layer_view(params, model), model), what)
        if keep is not None:
            chosen = {p: s for p, s in chosen.items() if s.layer in keep}
            if not chosen:
                raise ValueError(f"selective: the targets {list(rules)} select no weight inside layers {sorted(keep)}; "
                                 "widen the targets (e.g. '.*') or choose other layers")
        return chosen

    where = (f"top {top_layers} layers" if top_layers is not None else
             f"layers {layers}" if layers is not None else "")
    label = "selective" + (f" {where}" if where else "") + ("" if _is_everything(rules) else f" {_describe(rules)}")
    return selection_method("selective", pick, label=label)


def _is_everything(rules) -> bool:
    return len(rules) == 1 and rules[0].pattern in (".*", r".*")


def _describe(rules) -> str:
    return ", ".join(r.pattern if isinstance(r.pattern, str) else getattr(r.pattern, "__name__", "predicate")
                     for r in rules)


def bitfit(norms: Literal["auto", "always", "never"] = "auto", *, model: Any = None) -> Method:
    """BitFit (Ben Zaken et al., 2022): trains the biases and nothing else.

    A bias is a vector weight (one axis besides the layer stack, from its logical axes)
    named ``bias``, as Flax and Hugging Face name them. Llama-family models (SmolLM2)
    have none; their documented analogue is the norm scales (the other per-channel
    vectors, named ``scale``), which ``norms="auto"`` takes when the model has no biases.

    Args:
        norms: ``"auto"`` (norm scales only when there are no biases), ``"always"``
            (biases and norm scales), ``"never"`` (biases only).
        model: the :class:`jpeft.models.Model` (roles from its logical axes).

    Example:
        >>> import jax, jax.numpy as jnp, jpeft
        >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}, "norm": {"scale": jnp.ones(2)}}
        >>> sorted(jpeft.tree.flatten(jpeft.bitfit().init(jax.random.key(0), params)))
        ['dense/bias']
        >>> sorted(jpeft.tree.flatten(jpeft.bitfit(norms="always").init(jax.random.key(0), params)))
        ['dense/bias', 'norm/scale']
    """
    if norms not in ("auto", "always", "never"):
        raise SettingError("norms", norms, "must be one of 'auto', 'always', 'never'", what="bitfit")

    def vectors(view: Mapping[str, Slot], name: str) -> list[str]:
        return [p for p, s in view.items() if s.kind == "vector" and p.rsplit("/", 1)[-1] == name]

    def pick(params: Any) -> dict[str, Slot]:
        view = layer_view(params, model)
        biases, scales = vectors(view, "bias"), vectors(view, "scale")
        chosen = biases + (scales if norms == "always" or (norms == "auto" and not biases) else [])
        if not chosen:
            raise ValueError("bitfit: the model has no bias vectors" + (
                " (norms='never' leaves out the norm scales, its analogue for models without biases)"
                if norms == "never" else " and no norm scales"))
        return {p: view[p] for p in sorted(chosen)}

    label = {"auto": "bitfit", "always": "bitfit (+ norm scales)", "never": "bitfit (biases only)"}[norms]
    if norms == "auto" and model is not None and not vectors(layer_view(model.abstract_params(), model), "bias"):
        label = "bitfit (norm scales: no biases)"
    return selection_method("bitfit", pick, label=label)


registry.register("selective", selective)
registry.register("bitfit", bitfit)
