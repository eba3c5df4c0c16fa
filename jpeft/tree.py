"""Paths, selection rules, and splitting/combining parameter trees.

A parameter tree is a nested dict of arrays (Flax's ``params``). Each leaf has a
path: its keys joined by ``/``, e.g. ``layers_0/self_attn/q_proj/kernel``.

Rules select leaves by path. A rule is a regex matched with :func:`re.fullmatch`
against the path, or a predicate ``(path, leaf) -> bool``. Rules are ordered and
the first rule that matches a leaf wins; a rule that matches no leaf at all is an
error (:class:`RuleError`) that names the rule and shows some real paths, so a typo
in a target never silently trains nothing.

Example:
    >>> import jax.numpy as jnp
    >>> from jpeft import tree
    >>> params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    >>> sorted(tree.flatten(params))
    ['dense/bias', 'dense/kernel']
    >>> picked, rest = tree.split(params, r".*/kernel")
    >>> tree.combine(rest, picked)["dense"]["kernel"].shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jpeft import ops

Path = str
Predicate = Callable[[Path, Any], bool]


class RuleError(ValueError):
    """A selection rule is malformed or matched no parameter."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Selects leaves by path and carries per-rule settings for a method.

    Args:
        pattern: a regex matched with ``re.fullmatch`` against the ``/``-joined
            path, or a predicate ``(path, leaf) -> bool``.
        **settings: method settings that apply to leaves this rule selects,
            e.g. ``Rule(r".*/mlp/.*/kernel", rank=16)`` for LoRA.

    Example:
        >>> Rule(r".*/q_proj/kernel", rank=4).matches("layers_0/self_attn/q_proj/kernel", None)
        True
    """

    pattern: str | Predicate
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __init__(self, pattern: str | Predicate, **settings: Any):
        if isinstance(pattern, str):
            try:
                re.compile(pattern)
            except re.error as err:
                raise RuleError(f"target rule {pattern!r} is not a valid regex: {err}") from None
        elif not callable(pattern):
            raise RuleError(
                f"a target rule must be a regex string or a (path, leaf) -> bool predicate, "
                f"got {type(pattern).__name__}"
            )
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "settings", dict(settings))

    def matches(self, path: Path, leaf: Any) -> bool:
        if isinstance(self.pattern, str):
            return re.fullmatch(self.pattern, path) is not None
        return bool(self.pattern(path, leaf))

    def __repr__(self) -> str:
        pattern = self.pattern if isinstance(self.pattern, str) else getattr(
            self.pattern, "__name__", repr(self.pattern))
        extra = "".join(f", {k}={v!r}" for k, v in self.settings.items())
        return f"Rule({pattern!r}{extra})"


Targets = str | Predicate | Rule | Sequence[str | Predicate | Rule]


def as_rules(targets: Targets) -> tuple[Rule, ...]:
    """Normalizes a target spec (regex, predicate, Rule, or a sequence of them)."""
    if isinstance(targets, (str, Rule)) or callable(targets):
        targets = [targets]
    rules = tuple(t if isinstance(t, Rule) else Rule(t) for t in targets)
    if not rules:
        raise RuleError("no target rules given: pass at least one regex, predicate or Rule")
    return rules


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(keypath) -> Path:
    """Joins a ``jax.tree_util`` key path into a ``/``-separated string."""
    return "/".join(_key_name(k) for k in keypath)


def flatten(tree: Any) -> dict[Path, Any]:
    """``{path: leaf}`` for every leaf; jpeft weight wrappers count as leaves."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=ops.is_wrapper)
    return {path_to_str(kp): leaf for kp, leaf in leaves}


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """Inverse of :func:`flatten` for nested-dict trees."""
    out: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = leaf
    return out


def _describe_paths(paths: Sequence[Path], limit: int = 8) -> str:
    shown = "\n  ".join(paths[:limit])
    more = f"\n  ... ({len(paths) - limit} more)" if len(paths) > limit else ""
    return f"  {shown}{more}"


def assign(tree: Any, rules: Targets) -> dict[Path, Rule]:
    """Maps each selected leaf path to the first rule that matches it.

    Raises:
        RuleError: if any rule matches no leaf (names the rule, shows real paths).

    Example:
        >>> import jax.numpy as jnp
        >>> assign({"a": {"kernel": jnp.ones((2, 2))}}, r"a/kernel")
        {'a/kernel': Rule('a/kernel')}
    """
    rules = as_rules(rules)
    flat = flatten(tree)
    chosen: dict[Path, Rule] = {}
    used = [False] * len(rules)
    for path, leaf in flat.items():
        for i, rule in enumerate(rules):
            if rule.matches(path, leaf):
                chosen[path] = rule
                used[i] = True
                break
    unused = [rule for rule, u in zip(rules, used) if not u]
    if unused:
        raise RuleError(
            f"target rule(s) {', '.join(map(repr, unused))} matched no parameter "
            f"(rules are matched with re.fullmatch against '/'-joined paths; an earlier rule may "
            f"also have taken every leaf it would match). Some real paths:\n"
            + _describe_paths(list(flat))
        )
    return chosen


def _map_paths(fn, tree: Any) -> Any:
    """``fn(path, leaf)`` at every leaf (wrappers count as leaves), keeping the tree's containers."""
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: fn(path_to_str(kp), leaf), tree,
                                            is_leaf=ops.is_wrapper)


def split(tree: Any, rules: Targets) -> tuple[Any, Any]:
    """Splits a tree into ``(selected, rest)``, two trees shaped like ``tree`` with ``None`` holes.

    Like equinox's ``partition``: both keep the containers they were given (dicts,
    ``FrozenDict``, tuples, lists), a leaf sits in exactly one of them and ``None`` stands
    in the other. ``combine(selected, rest)`` gives back the original tree.

    Example:
        >>> import jax.numpy as jnp
        >>> picked, rest = split({"w": (jnp.ones(2), jnp.zeros(3))}, r"w/0")
        >>> picked["w"][1] is None, rest["w"][0] is None
        (True, True)
    """
    chosen = assign(tree, rules)
    selected = _map_paths(lambda p, leaf: leaf if p in chosen else None, tree)
    rest = _map_paths(lambda p, leaf: None if p in chosen else leaf, tree)
    return selected, rest


def combine(*trees: Any) -> Any:
    """Merges trees of the same structure: each position takes the first non-``None`` leaf.

    The inverse of :func:`split` (in any order): ``combine(*split(tree, rules)) == tree``.
    """
    if not trees:
        raise ValueError("combine needs at least one tree")

    def first(*leaves):
        return next((leaf for leaf in leaves if leaf is not None), None)

    is_leaf = lambda x: x is None or ops.is_wrapper(x)
    try:
        return jax.tree.map(first, *trees, is_leaf=is_leaf)
    except ValueError as err:
        raise ValueError(f"combine needs trees of the same structure (as split makes them): {err}") from None


def without(tree: Any, replaced: Any) -> Any:
    """``tree`` with ``None`` wherever ``replaced`` has a leaf (the frozen rest of a split).

    Used to hand a train step only the frozen weights when an adapter replaces some of
    them outright (full fine-tuning, BitFit), so they are not held twice.
    """
    gone = set(flatten(replaced))
    return _map_paths(lambda p, leaf: None if p in gone else leaf, tree)


def replace(tree: Any, new_leaves: Mapping[Path, Any]) -> Any:
    """``tree`` with the leaves at the given paths replaced (containers kept; the rest shared).

    Example:
        >>> import jax.numpy as jnp
        >>> replace({"a": jnp.ones(2), "b": jnp.ones(3)}, {"b": "new"})["b"]
        'new'
    """
    missing = set(new_leaves) - set(flatten(tree))
    if missing:
        raise ValueError(f"no leaves at {sorted(missing)[:5]} to replace")
    return _map_paths(lambda p, leaf: new_leaves.get(p, leaf), tree)


def leaf_size(leaf: Any) -> int:
    """Number of logical parameters of a leaf (a wrapper counts as its weight's shape)."""
    return int(np.prod(leaf.shape, dtype=np.int64))


def leaf_bytes(leaf: Any) -> int:
    """Bytes a leaf takes in memory: wrappers count the arrays they hold."""
    if ops.is_wrapper(leaf):
        return sum(leaf_bytes(x) for x in jax.tree_util.tree_leaves(leaf))
    return int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
