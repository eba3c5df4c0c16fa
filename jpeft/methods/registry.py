"""Methods by name: a builder registered under a name, its settings read from its signature.

A program that lets users pick a method by name (a YAML run config, a command line)
asks this registry instead of knowing the methods. A method's settings are its
builder's keyword arguments; :func:`check_settings` validates a mapping of them
against the builder's signature (unknown names with a suggestion, types from the
annotations, choices from ``Literal``), and :func:`build` calls the builder, turning a
:class:`jpeft.errors.SettingError` into a message that names the setting.

Builder arguments named in :data:`CONTEXT` are not settings: the program passes what
it has (the :class:`~jpeft.models.Model`, the tokenizer, the run's number of optimizer
steps ``total_step``) to builders that ask for them.

Registering a new method is one call::

    def scaled_bias(scale: float = 1.0, *, model=None) -> jpeft.Method: ...
    registry.register("scaled_bias", scaled_bias)

Example:
    >>> from jpeft.methods import registry
    >>> "lora" in registry.names()
    True
    >>> registry.check_settings("lora", {"rank": 4, "targets": ".*/q_proj/kernel"})
    {'rank': 4, 'targets': '.*/q_proj/kernel'}
    >>> registry.check_settings("lora", {"rnak": 4})
    Traceback (most recent call last):
    ...
    jpeft.methods.registry.SettingsMappingError: unknown setting 'rnak'; did you mean 'rank'? (lora's settings: alpha, dropout, dtype, ensure_weight_tying, init, rank, targets, use_dora, use_rslora)
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import pydantic

from jpeft.errors import SettingError
from jpeft.methods.base import Method

CONTEXT = ("model", "tokenizer", "total_step")
"""Builder arguments a program fills from what it has loaded or runs, not from user settings.

``total_step`` is the number of optimizer steps the run takes, for methods whose schedule
depends on it (AdaLoRA's rank budget): a context item rather than a setting, so it cannot
disagree with the run's own step count."""


class SettingsMappingError(ValueError):
    """A settings mapping that does not fit a registered builder: an unknown name or key, a
    value of the wrong type or outside its choices, or a value the builder rejects (its
    :class:`jpeft.errors.SettingError`, re-worded for a program that names the key itself).

    Attributes:
        setting: the offending setting's name (``None`` for problems of the whole mapping).
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class Registered(NamedTuple):
    name: str
    builder: Callable[..., Method]
    summary: str


_METHODS: dict[str, Registered] = {}


def register(name: str, builder: Callable[..., Method], *, summary: str | None = None) -> Callable[..., Method]:
    """Registers ``builder`` under ``name`` (replacing an earlier one); returns the builder."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {name!r}")
    doc = inspect.getdoc(builder) or ""
    _METHODS[name] = Registered(name, builder, summary or (doc.splitlines()[0] if doc else name))
    return builder


def _all() -> dict[str, Registered]:
    importlib.import_module("jpeft.methods")  # registers jpeft's own methods
    return _METHODS


def names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_all())


def get(name: str) -> Registered:
    """The registration of ``name``; an unknown name is a :class:`SettingsMappingError` listing the known ones."""
    methods = _all()
    if name not in methods:
        close = difflib.get_close_matches(str(name), list(methods), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SettingsMappingError(f"unknown method {name!r}{hint} (registered: {', '.join(sorted(methods))})")
    return methods[name]


def settings(name: str) -> dict[str, inspect.Parameter]:
    """The builder's settings (its parameters, without :data:`CONTEXT`), by name."""
    return arguments(get(name).builder)


def defaults(name: str) -> dict[str, Any]:
    """The builder's default for every setting that has one."""
    return {n: p.default for n, p in settings(name).items() if p.default is not inspect.Parameter.empty}


# ----------------------------------------------------------------------------- type checks


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(hint)[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


class Says(NamedTuple):
    """``Annotated`` metadata: how a message says a broken constraint (``Says("must be in [0, 1)")``)."""

    problem: str


def _says(hint: Any) -> str | None:
    """The :class:`Says` of ``hint`` or of an ``Annotated`` member of its union, if any."""
    if typing.get_origin(hint) is typing.Annotated:
        return next((m.problem for m in hint.__metadata__ if isinstance(m, Says)), None)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return next((said for arg in typing.get_args(hint) if (said := _says(arg))), None)
    return None


_CONSTRAINTS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
                "less_than_equal": ("le", "<="), "multiple_of": ("multiple_of", "a multiple of")}
"""pydantic's error types for ``annotated_types`` constraints, and how a message says them."""


def _adapter(hint: Any) -> pydantic.TypeAdapter | None:
    """A strict pydantic validator of ``hint`` (ints are not bools, strings not numbers, floats finite), or
    ``None`` for an annotation pydantic cannot build one for (the builder checks those)."""
    try:
        return _cached_adapter(hint)
    except TypeError:  # an unhashable annotation: built each time
        return _cached_adapter.__wrapped__(hint)


@functools.lru_cache(maxsize=None)
def _cached_adapter(hint: Any) -> pydantic.TypeAdapter | None:
    config = pydantic.ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
    try:
        return pydantic.TypeAdapter(hint, config=config)
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError):
        return None


def _coerce(value: Any, hint: Any) -> tuple[bool, Any, str | None]:
    """``(fits, value, constraint problem)``: whether ``value`` fits ``hint``, the value (ints become floats
    for floats), and a broken ``Annotated`` constraint as a predicate (``"must be > 0"``) when that is why."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True, value, None
    adapter = _adapter(hint)
    if adapter is None:
        return True, value, None
    try:
        return True, adapter.validate_python(value), None
    except pydantic.ValidationError as err:
        errors = err.errors()
    if isinstance(value, str):  # YAML reads 1e-3 as a string: a number where the hint takes one
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            try:
                return True, adapter.validate_python(number), None
            except pydantic.ValidationError as err:
                as_number = err.errors()
                if any(e["type"] in _CONSTRAINTS or e["type"] == "finite_number" for e in as_number):
                    errors = as_number  # a number, out of range: say that, not "a str"
    said = _says(hint)
    for e in errors:
        if said is not None and (e["type"] in _CONSTRAINTS or e["type"] == "value_error"):
            return False, value, said
        if e["type"] in _CONSTRAINTS:
            key, words = _CONSTRAINTS[e["type"]]
            bound = e["ctx"][key]
            bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound  # "> 0", not "> 0.0"
            return False, value, f"must be {words} {bound}"
        if e["type"] == "finite_number":
            return False, value, "is not a finite number"
    return False, value, None


def _describe(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not a finite number"
    return f"{value!r} is a {type(value).__name__}"


def check_settings(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Validates settings against ``name``'s builder signature; returns them (floats coerced).

    Raises:
        SettingsMappingError: for an unknown setting (with a close match when there is one), a
            value of the wrong type, or a value outside a ``Literal``'s choices.
    """
    return check_arguments(get(name).builder, given, what=name)


def arguments(builder: Callable[..., Any], context: tuple[str, ...] = CONTEXT) -> dict[str, inspect.Parameter]:
    """A builder's settings: its parameters without ``context`` and ``*args`` / ``**kwargs``."""
    params = inspect.signature(builder).parameters
    return {n: p for n, p in params.items()
            if n not in context and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_arguments(builder: Callable[..., Any], given: Mapping[str, Any], *, what: str,
                    context: tuple[str, ...] = CONTEXT) -> dict[str, Any]:
    """Validates keyword arguments against any builder's signature (a method's, a task's); returns them coerced.

    One pydantic validator per annotation (strict: a bool is not an int, a string not a number, except a
    float written as YAML reads ``1e-3``; floats finite), with ``Annotated`` constraints
    (``annotated_types.Gt`` ...) and ``Literal`` choices. ``what`` names the builder in messages;
    ``context``: parameters that are not settings.

    Example:
        >>> from typing import Annotated, Literal
        >>> from annotated_types import Gt
        >>> def scaled(size: Annotated[int, Gt(0)] = 4, mode: Literal["in", "out"] = "in", scale: float = 1.0):
        ...     ...
        >>> check_arguments(scaled, {"size": 8, "scale": "1e-3"}, what="scaled")
        {'size': 8, 'scale': 0.001}
        >>> check_arguments(scaled, {"size": 0}, what="scaled")
        Traceback (most recent call last):
        ...
        jpeft.methods.registry.SettingsMappingError: 0 must be > 0

    Raises:
        SettingsMappingError: as :func:`check_settings`.
    """
    name = what
    params = arguments(builder, context)
    try:
        hints = typing.get_type_hints(builder, include_extras=True)  # with Annotated constraints
    except Exception:  # unresolvable annotations: leave the checks to the builder
        hints = {}
    out = {}
    for key, value in given.items():
        if key not in params:
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SettingsMappingError(f"unknown setting {key!r}{hint} ({name}'s settings: {', '.join(sorted(params))})",
                                setting=None)
        hint = hints.get(key, inspect.Parameter.empty)
        fits, coerced, problem = _coerce(value, hint)
        if not fits:
            if problem is not None:
                raise SettingsMappingError(f"{value!r} {problem}", setting=key)
            if value is None:
                raise SettingsMappingError(f"it needs a {_type_name(hint)}, not null", setting=key)
            if typing.get_origin(hint) is typing.Literal or (
                    typing.get_origin(hint) in (types.UnionType, typing.Union)
                    and all(typing.get_origin(a) is typing.Literal or a is type(None) for a in typing.get_args(hint))):
                raise SettingsMappingError(f"{value!r} must be {_type_name(hint)}", setting=key)
            raise SettingsMappingError(f"{_describe(value)}, it needs a {_type_name(hint)}", setting=key)
        if _is_dtype(params[key].default) and not _is_float_dtype(coerced):
            raise SettingsMappingError(f"{coerced!r} is not a floating-point dtype; give a name such as 'float32' or "
                                "'bfloat16'", setting=key)
        out[key] = coerced
    return out


def _is_dtype(default: Any) -> bool:
    """Whether a builder argument's default is a dtype (``jnp.float32``): its value must be one too."""
    if default is None or isinstance(default, (bool, int, float, str)) or default is inspect.Parameter.empty:
        return False
    try:
        np.dtype(default)
    except TypeError:
        return False
    return True


def _is_float_dtype(value: Any) -> bool:
    """Whether ``value`` names a floating-point dtype (``"float32"``, ``"bfloat16"``, ``jnp.float16``)."""
    if value is None or isinstance(value, (bool, int, float)):
        return False
    try:
        return bool(jnp.issubdtype(jnp.dtype(value), jnp.floating))
    except TypeError:
        return False


def validate(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`check_settings`, then the builder's own checks of the values, before anything is loaded.

    The builder runs once without context (no model, no tokenizer): a
    :class:`jpeft.errors.SettingError` it raises is reported here, while errors that only
    say what context it needs wait for :func:`build`.
    """
    checked = check_settings(name, given)
    try:
        get(name).builder(**checked)
    except SettingError as err:
        raise SettingsMappingError(f"{err.value!r} {err.problem}", setting=err.setting) from None
    except (ValueError, TypeError):
        pass  # needs the model or tokenizer: checked again by build()
    return checked


def build(name: str, given: Mapping[str, Any], **context: Any) -> Method:
    """The method ``name`` built from ``given`` settings plus whatever ``context`` its builder asks for.

    Raises:
        SettingsMappingError: from :func:`check_settings`, or the builder's own
            :class:`jpeft.errors.SettingError` / ``ValueError`` about a value.
    """
    checked = check_settings(name, given)
    builder = get(name).builder
    wanted = inspect.signature(builder).parameters
    extra = {k: v for k, v in context.items() if k in wanted and k in CONTEXT}
    try:
        return builder(**checked, **extra)
    except SettingError as err:
        raise SettingsMappingError(f"{err.value!r} {err.problem}", setting=err.setting) from None
    except (ValueError, TypeError) as err:
        raise SettingsMappingError(str(err)) from None
