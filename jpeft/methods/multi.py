"""One frozen base, many tasks: several adapters held at once and switched per call.

An :class:`AdapterBank` maps names to ``(method, adapter)`` pairs of any kind (LoRA,
IA3, prompt, prefix, bottleneck, ...). ``bank.apply(params, name)`` is that
method's ``apply``: it builds a new tree around the same base arrays, so switching
costs no copy of the base and no reload. The bank is a pytree (the adapters are its
leaves; names and methods are static), so it can be passed to a jitted function with
the name as a static argument: each adapter kind compiles once.

Example:
    >>> import jax, jax.numpy as jnp, jpeft
    >>> params = {"embed_tokens": {"embedding": jnp.ones((8, 4))}, "q_proj": {"kernel": jnp.ones((4, 4))}}
    >>> lora = jpeft.lora(rank=2, targets=r"q_proj/kernel")
    >>> ia3 = jpeft.ia3(targets=r"q_proj/kernel", feedforward=None)
    >>> bank = jpeft.AdapterBank({"a": (lora, lora.init(jax.random.key(0), params)),
    ...                           "b": (ia3, ia3.init(jax.random.key(1), params))})
    >>> bank.names
    ('a', 'b')
    >>> type(bank.apply(params, "b")["q_proj"]["kernel"]).__name__
    'Ia3Weight'
    >>> bank.apply(params, "a")["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jpeft.methods.base import Method, refuse_rebased
from jpeft.methods.combine import combine_adapters


@jax.tree_util.register_pytree_node_class
class AdapterBank:
    """Named ``(method, adapter)`` pairs over one frozen base (see the module docstring).

    Args:
        adapters: ``{name: (method, adapter)}``.
    """

    def __init__(self, adapters: Mapping[str, tuple[Method, Any]]):
        entries = {}
        for name, entry in adapters.items():
            if not isinstance(name, str):
                raise TypeError(f"adapter names must be strings, got {name!r}")
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], Method)):
                raise TypeError(f"adapter {name!r} must be a (jpeft.Method, adapter) pair, got {type(entry).__name__}")
            refuse_rebased(entry[0], f"AdapterBank: adapter {name!r}")
            entries[name] = entry
        self._entries = dict(sorted(entries.items()))

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names, sorted."""
        return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> tuple[Method, Any]:
        """``(method, adapter)`` of one adapter."""
        if name not in self._entries:
            raise KeyError(f"no adapter named {name!r} in this bank; it holds {list(self.names)}")
        return self._entries[name]

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {m.name}" for n, (m, _) in self._entries.items())
        return f"AdapterBank({{{inner}}})"

    def apply(self, params: Any, name: str, *, rng: jax.Array | None = None) -> Any:
        """The parameters the model runs with under adapter ``name`` (the base is shared, not copied)."""
        method, adapter = self[name]
        return method.apply(params, adapter, rng=rng)

    def merge(self, params: Any, name: str) -> Any:
        """``method.merge`` of adapter ``name``: plain parameters for that one task."""
        method, adapter = self[name]
        return method.merge(params, adapter)

    def replace(self, name: str, adapter: Any, method: Method | None = None) -> "AdapterBank":
        """A new bank with adapter ``name`` added or replaced (e.g. after training it).

        ``method`` may be left out when ``name`` is already in the bank.
        """
        if method is None:
            method = self[name][0]
        return AdapterBank({**self._entries, name: (method, adapter)})

    def add_weighted(self, params: Any, name: str, adapters: list[str], weights: list[float],
                     combination_type: str = "svd", **options) -> "AdapterBank":
        """A new bank with ``name``: LoRA adapters combined as PEFT's ``add_weighted_adapter`` does.

        ``options`` are :func:`jpeft.methods.combine.combine_adapters`'s (``svd_rank``,
        ``density``, ``majority_sign_method``, ``key``, ``model``, ...).
        """
        method, adapter = combine_adapters(params, {n: self[n] for n in adapters}, weights, combination_type,
                                           **options)
        return self.replace(name, adapter, method)

    def check(self, params: Any) -> None:
        """Raises ``ValueError`` naming the first adapter that does not fit ``params``.

        Runs every ``apply`` on shapes only (``jax.eval_shape``): nothing is computed.
        """
        for name, (method, adapter) in self._entries.items():
            try:
                jax.eval_shape(lambda p, a, m=method: m.apply(p, a), params, adapter)
            except (ValueError, TypeError) as err:
                raise ValueError(f"adapter {name!r} ({method.name}) does not fit these parameters: {err}") from err

    def tree_flatten(self):
        names = tuple(self._entries)
        return [a for _, a in self._entries.values()], (names, tuple(m for m, _ in self._entries.values()))

    @classmethod
    def tree_unflatten(cls, aux, children):
        names, methods = aux
        return cls({n: (m, a) for n, m, a in zip(names, methods, children)})
