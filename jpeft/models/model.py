"""A model is a value: a family's functions plus a config.

A :class:`Family` is one module's worth of functions (its parameter specs, forward
pass, hook points, checkpoint names); a :class:`Model` binds a family to a config.
Everything outside the family's own module (methods, loaders, generation, sharding,
the trainer) works through this value and never imports a family:

* ``model.specs()``, ``model.param_axes()``, ``model.layouts()``,
  ``model.abstract_params()``, ``model.init(key)``: parameters and their roles;
* ``model.forward(params, tokens_BxT, **kw)`` -> ``(logits or hidden, cache)``;
  ``model.head(params, hidden)`` and ``model.init_cache(...)`` for decoders;
* ``model.hooks``: ``{name: HookPoint}`` where input methods feed it;
* ``model.names``: its checkpoint name tables (Hugging Face, GGUF) for the loaders.

``Model`` is hashable and a static pytree (no leaves), so it passes through
``jax.jit`` as compile-time metadata.

Example:
    >>> import jax
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                       num_layers=2, num_heads=4, num_kv_heads=2))
    >>> model.name, model.num_layers, sorted(model.hooks)
    ('llama', 2, ['attn_output', 'mlp_output', 'prefix', 'prompt'])
    >>> model.layouts()["embed_tokens/embedding"].kind
    'table'
    >>> logits, _ = model.forward(model.init(jax.random.key(0)), jax.numpy.ones((1, 4), "int32"))
    >>> logits.shape
    (1, 4, 32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.layout import Layout
from jpeft.models import capabilities
from jpeft.models import hooks as hooks_lib
from jpeft.models import spec
from jpeft import stack


class Family(NamedTuple):
    """The functions that make a model family (all module-level, so a family is hashable).

    Attributes:
        name: the family's name (``"llama"``).
        specs: ``config -> tree of ParamSpec``.
        forward: ``(params, config, tokens_BxT=None, **kw) -> (out, cache)``.
        hooks: ``config -> {name: HookPoint}``.
        head: ``(params, config, hidden) -> logits`` (language models).
        init_cache: ``(config, batch, max_len, dtype) -> cache`` (decoders).
        keys_values_of_text: ``(params, config, ids) -> (key, value)``, each ``(L, n, width)``:
            the ``"prefix"`` value that acts as ``ids`` written before the input.
        names: checkpoint name tables (a :class:`jpeft.models.names.CheckpointNames`) or None.
        num_layers: ``config -> int``.
        unstacked: ``config -> config`` with unrolled layers (what checkpoint files name).
        max_positions: ``config -> int``, the context length (or None).
        tied_tables: ``config -> {table path: head path}``: embedding tables that are also the
            output head, and the path the head would have if it were its own weight (what
            checkpoint formats name it).
        classify: ``(params, config, hidden_BxTxD, attention_mask_BxT) -> logits_BxC``: the
            sequence-classification head of an encoder (None: the family has none).
        encode: ``(params, config, tokens_BxS, attention_mask_BxS=None) -> encoded`` for
            encoder-decoder models (``None``: a decoder-only or encoder-only model).
    """

    name: str
    specs: Callable[[Any], Any]
    forward: Callable[..., Any]
    hooks: Callable[[Any], Mapping[str, hooks_lib.HookPoint]]
    head: Callable[..., Any] | None = None
    init_cache: Callable[..., Any] | None = None
    keys_values_of_text: Callable[..., Any] | None = None
    names: Any = None
    num_layers: Callable[[Any], int] | None = None
    unstacked: Callable[[Any], Any] | None = None
    max_positions: Callable[[Any], int] | None = None
    tied_tables: Callable[[Any], dict[str, str]] | None = None
    classify: Callable[..., Any] | None = None
    encode: Callable[..., Any] | None = None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Model:
    """A :class:`Family` bound to a config (see the module docstring)."""

    family: Family
    config: Any

    @property
    def name(self) -> str:
        return self.family.name

    # ------------------------------------------------------------------ parameters

    def specs(self) -> Any:
        """The tree of :class:`jpeft.models.spec.ParamSpec`."""
        return self.family.specs(self.config)

    def param_axes(self) -> Any:
        """Logical axes of every parameter (a tree of tuples)."""
        return spec.param_axes(self.specs())

    def layouts(self) -> dict[str, Layout]:
        """``{path: Layout}``: every parameter's role (kernel, table, vector), from its logical axes."""
        return spec.layouts(self.specs())

    def abstract_params(self, dtype=None) -> Any:
        """The parameters' ``jax.ShapeDtypeStruct`` (in the config's ``param_dtype`` by default)."""
        return spec.abstract_params(self.specs(), dtype or self._param_dtype())

    def init(self, key: jax.Array, *, stddev: float = 0.02) -> Any:
        """Random parameters (see :func:`jpeft.models.spec.init_params`)."""
        return spec.init_params(self.specs(), key, self._param_dtype(), stddev=stddev)

    def _param_dtype(self):
        return jnp.dtype(getattr(self.config, "param_dtype", "float32"))

    # ------------------------------------------------------------------ running

    def forward(self, params: Any, tokens_BxT: jax.Array | None = None, **kwargs) -> Any:
        return self.family.forward(params, self.config, tokens_BxT, **kwargs)

    def head(self, params: Any, hidden: jax.Array) -> jax.Array:
        if self.family.head is None:
            raise NotImplementedError(f"the {self.name!r} family has no language-model head")
        return self.family.head(params, self.config, hidden)

    def classify(self, params: Any, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Class logits ``(B, num_labels)`` from ``forward``'s hidden states (encoders with a head)."""
        if self.family.classify is None:
            raise NotImplementedError(f"the {self.name!r} family has no sequence-classification head "
                                      "(a decoder-only language model); use an encoder such as BERT")
        return self.family.classify(params, self.config, hidden, attention_mask)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Any:
        if self.family.init_cache is None:
            raise NotImplementedError(f"the {self.name!r} family has no key/value cache (not a decoder)")
        return self.family.init_cache(self.config, batch, max_len, dtype)

    @property
    def capabilities(self) -> frozenset:
        """The :mod:`jpeft.models.capabilities` this model offers: the family's optional parts decide."""
        family, offered = self.family, {capabilities.WeightLayouts, capabilities.HookPoints}
        if family.head is not None and family.init_cache is not None:
            offered.add(capabilities.CausalLM)
            if family.encode is not None:
                offered.add(capabilities.EncoderDecoder)
        if family.classify is not None:
            offered.add(capabilities.Classifier)
        return frozenset(offered)

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the model reads a source with an encoder and writes a target with a decoder (T5)."""
        return self.family.encode is not None

    def encode(self, params: Any, tokens_BxS: jax.Array, attention_mask_BxS: jax.Array | None = None) -> Any:
        """An encoder-decoder model's encoder output for a source (what its decoder attends to)."""
        if self.family.encode is None:
            raise NotImplementedError(f"the {self.name!r} family has no encoder (not an encoder-decoder model)")
        return self.family.encode(params, self.config, tokens_BxS, attention_mask_BxS=attention_mask_BxS)

    @property
    def tied_tables(self) -> dict[str, str]:
        """``{table path: head path}``: embedding tables the model also uses as its output head (tied embeddings)."""
        return {} if self.family.tied_tables is None else dict(self.family.tied_tables(self.config))

    @property
    def max_positions(self) -> int | None:
        return None if self.family.max_positions is None else self.family.max_positions(self.config)

    # ------------------------------------------------------------------ layout questions

    @property
    def hooks(self) -> dict[str, hooks_lib.HookPoint]:
        """``{name: HookPoint}``: where input methods can feed this model."""
        return dict(self.family.hooks(self.config))

    def hook(self, name: str) -> hooks_lib.HookPoint:
        """The hook point ``name``, or a ValueError listing the ones this model has."""
        points = self.hooks
        if name not in points:
            raise ValueError(f"the {self.name!r} model has no {name!r} hook point; it has {sorted(points)}")
        return points[name]

    def check_params(self, params: Any) -> None:
        """Raises a ValueError if ``params`` are not this model's (a weight of another shape).

        Compares shapes only (nothing is computed), one layer at a time, so stacked and
        unrolled layers both pass. Input methods call it: their adapters are shaped by the
        model they were built for, not by the parameters they are applied to.
        """
        def per_layer(flat: dict) -> dict:
            out = {}
            for path, leaf in flat.items():
                shape = tuple(leaf.shape)
                if stack.in_stack(path):
                    out[path] = shape[1:]
                else:
                    out[stack.stacked_path(path)[0]] = shape
            return out

        want = per_layer(tree.flatten(self.unstacked().abstract_params()))
        got = per_layer({p: v for p, v in tree.flatten(params).items() if hooks_lib.HOOKS not in p.split("/")})
        wrong = sorted(p for p in want.keys() & got.keys() if want[p] != got[p])
        if wrong or not want.keys() & got.keys():
            detail = (f"{wrong[0]!r} has shape {got[wrong[0]]} per layer, the model needs {want[wrong[0]]}"
                      if wrong else "none of their paths are the model's")
            raise ValueError(f"these parameters are not the {self.name!r} model's this method was built for: "
                             f"{detail}. Was the adapter made for another model?")

    def virtual_tokens(self, params: Any) -> int:
        """The most slots that a prompt or prefix in ``params`` takes before an input (0: none).

        A prefix adapter may feed several key/value hook points at once (T5's encoder,
        decoder and cross-attention); each takes the same ``n`` slots before its own input.
        A model refuses combinations it cannot run (a prompt and a prefix together) itself.
        """
        return max(hooks_lib.virtual_lengths(params, self.hooks).values(), default=0)

    @property
    def num_layers(self) -> int:
        if self.family.num_layers is None:
            raise NotImplementedError(f"the {self.name!r} family does not say how many layers it has")
        return self.family.num_layers(self.config)

    @property
    def names(self) -> Any:
        """Checkpoint name tables (Hugging Face, GGUF), or ``None``; ``hf`` is this config's table."""
        names = self.family.names
        if names is not None and getattr(names, "hf_for_config", None) is not None:
            return names._replace(hf=names.hf_for_config(self.config))
        return names

    def unstacked(self) -> "Model":
        """This model with unrolled layers (``layers_{i}``), as checkpoint files name them."""
        if self.family.unstacked is None:
            return self
        return Model(self.family, self.family.unstacked(self.config))

    def replace(self, **changes) -> "Model":
        """This model with config fields changed (``model.replace(scan_layers=True)``)."""
        return Model(self.family, dataclasses.replace(self.config, **changes))
