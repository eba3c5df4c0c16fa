"""Building a model's parameter tree from a checkpoint file, one tensor at a time.

Shared by every loader (Hugging Face safetensors, GGUF) and every model family: the
loader reads tensors in the order :meth:`ParamAssembler.read_order` gives, converts each
to jpeft's layout through the family's name table (:mod:`jpeft.models.names`), and hands it
to :meth:`ParamAssembler.add`. When the model stacks its layers, a leaf is complete
once every layer's tensor is in; as soon as a leaf is complete it becomes a device array
(and, with a quantize-on-load ``leaf_fn``, a 4-bit one), so the float model is never
held whole. :meth:`ParamAssembler.finish` reports every missing, unexpected and
mis-shaped tensor at once.

Example:
    >>> import numpy as np
    >>> from jpeft.models import llama
    >>> model = llama.model(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
    ...                                       num_layers=1, num_heads=2, tie_word_embeddings=True))
    >>> a = ParamAssembler(model, "float32", "demo")
    >>> a.add("norm/scale", np.ones(8), "output_norm")
    >>> a.finish()
    Traceback (most recent call last):
    ...
    jpeft.errors.CheckpointError: demo does not match the model: 10 missing (embed_tokens/embedding, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree
from jpeft.errors import CheckpointError
from jpeft.models import names as names_lib
from jpeft import stack


def listing(items, limit: int = 5) -> str:
    items = sorted(items)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def describe_config(config: Any, limit: int = 10) -> str:
    """``name=value, ...`` of a config dataclass's scalar fields (for error messages)."""
    if not dataclasses.is_dataclass(config):
        return repr(config)
    fields = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]
    scalars = [f"{k}={v!r}" for k, v in fields if isinstance(v, (int, float, bool, str))][:limit]
    return ", ".join(scalars)


class ParamAssembler:
    """Collects converted tensors one at a time into ``model``'s parameter tree.

    ``add(path, array, source)`` takes an unrolled jpeft path (``layers_3/mlp/up_proj/kernel``)
    and a numpy array already in jpeft layout. ``leaf_fn(path, array)`` (default: keep it;
    see :func:`jpeft.quant.quantize_on_load`) makes the stored leaf from each complete one.
    """

    def __init__(self, model: Any, dtype, source: str, leaf_fn: Callable | None = None):
        self.model, self.dtype, self.source = model, jnp.dtype(dtype), source
        self.leaf_fn = leaf_fn or (lambda path, array: array)
        self.expected = {p: tuple(s.shape) for p, s in tree.flatten(model.unstacked().abstract_params()).items()}
        final_paths = tree.flatten(model.abstract_params())
        self.stacked = any(stack.in_stack(p) for p in final_paths)
        self.num_layers = {p: leaf.shape[0] for p, leaf in final_paths.items() if stack.in_stack(p)}
        self.buffers: dict[str, np.ndarray] = {}  # stacked leaves still being filled
        self.filled: dict[str, int] = {}          # layers written into each buffer
        self.leaves: dict[str, object] = {}       # finished leaves, by final path
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        self.misshaped: list[str] = []

    def leaf_path(self, path: str) -> tuple[str, int | None]:
        """``(final path, layer index)``: ``layers/...`` and the layer for a stacked tensor."""
        return stack.stacked_path(path) if self.stacked else (path, None)

    def reject(self, name: str) -> None:
        """Record a source tensor that has no place in the model."""
        self.unexpected.append(name)

    def add(self, path: str, array: np.ndarray, name: str) -> None:
        """Check and store one tensor (``name`` is its name in the source file)."""
        if path not in self.expected:
            return self.reject(name)
        if tuple(array.shape) != self.expected[path]:
            self.misshaped.append(f"{name} -> {path}: got {tuple(array.shape)}, expected {self.expected[path]}")
            return None
        if path in self.seen:
            return self.reject(f"{name} (duplicate)")
        self.seen.add(path)
        leaf_path, layer = self.leaf_path(path)
        if layer is None:
            self._emit(leaf_path, jnp.asarray(np.asarray(array).astype(self.dtype)))
            return None
        layers = self.num_layers[leaf_path]
        if leaf_path not in self.buffers:
            self.buffers[leaf_path] = np.empty((layers, *array.shape), self.dtype)
            self.filled[leaf_path] = 0
        self.buffers[leaf_path][layer] = array
        self.filled[leaf_path] += 1
        if self.filled[leaf_path] == layers:
            # The numpy buffer is freed once jnp.asarray returns, before leaf_fn runs.
            self._emit(leaf_path, jnp.asarray(self.buffers.pop(leaf_path)))
        return None

    def add_named(self, table: names_lib.NameTable, name: str, read: Callable[[str], np.ndarray]) -> None:
        """Map a file's tensor ``name`` through ``table``, read it only if it has a place, and add it."""
        if table.is_ignored(name):
            return None
        found = table.to_path(name)
        if found is None:
            return self.reject(name)
        path, rule = found
        if rule.optional and path not in self.expected:
            return None  # e.g. a tied lm_head.weight stored anyway
        return self.add(path, names_lib.to_model(read(name), rule, self.model.config), name)

    def _emit(self, path: str, array: jax.Array) -> None:
        # Wait for it: with async dispatch, the next tensors would be read (and quantized)
        # while this one's float input and working memory are still alive.
        self.leaves[path] = jax.block_until_ready(self.leaf_fn(path, array))

    def finish(self) -> Any:
        """The parameter tree, or a :class:`CheckpointError` naming every problem found.

        Then, if ``leaf_fn`` has ``check_all_used`` (a quantize-on-load hook), a rule
        that selected no tensor raises :class:`jpeft.RuleError`.
        """
        missing = sorted(set(self.expected) - self.seen)
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({listing(missing)})")
        if self.unexpected:
            problems.append(f"{len(self.unexpected)} unexpected ({listing(self.unexpected)})")
        if self.misshaped:
            problems.append(f"{len(self.misshaped)} mis-shaped ({listing(self.misshaped, 3)})")
        if problems:
            raise CheckpointError(
                f"{self.source} does not match the model: " + "; ".join(problems)
                + f". Expected the {len(self.expected)} tensors of a {self.model.name!r} model with "
                f"{describe_config(self.model.config)}.")
        if hasattr(self.leaf_fn, "check_all_used"):
            self.leaf_fn.check_all_used()
        return tree.unflatten(self.leaves)

    def read_order(self, names: Iterable[str], table: names_lib.NameTable) -> list[str]:
        """Tensor names reordered so that each stacked leaf is completed before the next.

        Without stacked layers every tensor is its own leaf and the file order is kept.
        """
        names = list(names)
        if not self.stacked:
            return names

        def key(name):
            found = table.to_path(name)
            if found is None:
                return "", 0
            leaf_path, layer = self.leaf_path(found[0])
            return leaf_path, layer or 0

        return sorted(names, key=key)
