"""The run config's reference page, generated from the declarations that validate it.

Every key ``python -m train`` accepts comes from :func:`config_declarations`, the one
function that reads the declarations (today: the dataclasses of ``train/config.py`` for
the program's sections, and each registered method's builder signature for its section,
the same signature ``jpeft.methods.registry`` validates against). Point that function at
new declarations and the page follows; :func:`render` only formats what it returns.

``python scripts/config_reference.py`` prints the page; the docs build calls :func:`render`
(``scripts/docs_hooks.py``), so the published page is never a hand-kept list.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jpeft and train


class Setting(NamedTuple):
    """One config key: its dotted name, type, default and meaning, and the section it belongs to."""

    key: str
    type: str
    default: str
    meaning: str
    section: str


class Section(NamedTuple):
    """A group of keys (``train``, ``lora``, ...) and what it is for."""

    name: str
    doc: str
    settings: list[Setting]


# ------------------------------------------------------------------- the one place that reads declarations


def config_declarations() -> list[Section]:
    """Every section and key the run config accepts, read from the declarations that validate it.

    The program's sections are the nested declarations of ``train.config.RunConfig`` (frozen
    dataclasses with value checks, or pydantic models with field descriptions and constraints:
    both are read); the methods' sections are the registered builders' signatures.
    """
    from jpeft.methods import registry
    from train import config, tasks

    top = Section("top level", _first_paragraph(config.RunConfig.__doc__), [])
    sections = [top]
    for name, hint, default, meaning in _fields_of(config.RunConfig):
        if name in ("sections", *registry.names(), *tasks.names()):
            continue  # the method and task sections come from their registries below
        if _is_declaration(hint):
            sections.append(Section(name, _first_paragraph(hint.__doc__),
                                    [Setting(f"{name}.{n}", _type_name(h), _show(d), m, name)
                                     for n, h, d, m in _fields_of(hint)]))
        else:
            top.settings.append(Setting(name, _type_name(hint), _show(default), meaning, "top level"))
    for name in registry.names():
        sections.append(_builder_section(name, registry.get(name), registry.settings(name), "method"))
    for name in tasks.names():
        sections.append(_builder_section(name, tasks.get(name), tasks.settings(name), "task"))
    return sections


def _is_declaration(hint) -> bool:
    return isinstance(hint, type) and (dataclasses.is_dataclass(hint) or hasattr(hint, "model_fields"))


def _fields_of(cls) -> list[tuple[str, Any, Any, str]]:
    """``(name, type, default, meaning)`` of each field of a dataclass or a pydantic model."""
    if hasattr(cls, "model_fields"):  # pydantic: description and constraints live on the field
        out = []
        for name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True) if not info.is_required() else inspect.Parameter.empty
            meaning = info.description or ""
            rules = [_constraint(c) for c in info.metadata]
            meaning = "; ".join(x for x in [meaning, *rules] if x)
            out.append((name, info.annotation, default, meaning))
        return out
    hints = typing.get_type_hints(cls, include_extras=True)
    comments = _field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        meaning = f.metadata.get("doc") or comments.get(f.name, "")
        check = f.metadata.get("check")
        choices = _choices_of(check)
        rule = ("one of " + ", ".join(f"`{c}`" for c in choices)) if choices else (
            _rule_of(check) if check is not None else _rule_of_hint(hints[f.name]))
        meaning = "; ".join(x for x in [meaning, rule] if x)
        out.append((f.name, hints[f.name], default, meaning))
    return out


def _rule_of_hint(hint: Any) -> str:
    """What an annotation requires, in words: ``Literal`` choices, ``Annotated`` constraints or their ``Says``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return "; ".join(r for r in (_rule_of_hint(a) for a in args if a is not type(None)) if r)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{c}`" for c in args)
    if origin is typing.Annotated:
        says = [m.problem for m in args[1:] if type(m).__name__ == "Says"]
        if says:
            return says[0]
        rules = [_constraint(m) for m in args[1:]]
        return "; ".join(r for r in [_rule_of_hint(args[0]), *rules] if r)
    return ""


def _constraint(item) -> str:
    """An annotated-types constraint (``Gt(0)``, ``Ge(0)``, ``Lt(1)``, ...) in words."""
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "multiple_of": "a multiple of",
             "min_length": "at least this long:", "max_length": "at most this long:"}
    for attr, word in words.items():
        if getattr(item, attr, None) is not None:
            return f"must be {word} {getattr(item, attr)}"
    return ""


def _builder_section(name: str, registered, settings: dict, kind: str) -> Section:
    """A method's or a task's section: its builder's keyword arguments (the registry validates against them)."""
    builder = registered.builder
    try:
        hints = typing.get_type_hints(builder, include_extras=True)
    except Exception:  # an annotation that cannot be resolved: shown as written
        hints = {}
    args = _args_of(inspect.getdoc(builder) or "")
    out = []
    for key, param in settings.items():
        kind_ = hints.get(key, param.annotation)
        meaning = "; ".join(x for x in [args.get(key, ""), _rule_of_hint(kind_)] if x)
        out.append(Setting(f"{name}.{key}", _type_name(kind_), _show(param.default), meaning, name))
    summary = getattr(registered, "summary", None) or _first_paragraph(inspect.getdoc(builder))
    doc = f"The `{name}` {kind}'s settings (used when `{kind}: {name}`): {summary}"
    return Section(name, doc, out)


# ------------------------------------------------------------------- reading docs and comments


def _first_paragraph(doc: str | None) -> str:
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())


def _field_comments(cls) -> dict[str, str]:
    """``{field: its trailing comment}`` from the class source (the meaning written next to each field)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out, line_field = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out


def _args_of(doc: str) -> dict[str, str]:
    """The ``Args:`` section of a Google-style docstring as ``{name: text}``."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return out
    current, indent = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        found = re.match(r"\s*(\w+(?:, \w+)*)(?: \(.*?\))?:\s*(.*)", line) if width == indent else None
        if found:
            current = [name.strip() for name in found.group(1).split(",")]
            for name in current:
                out[name] = found.group(2)
        elif current:
            for name in current:
                out[name] += " " + line.strip()
    return out


def _choices_of(check) -> tuple | None:
    """The choices a ``_one_of(...)`` check accepts (read from its closure), else None."""
    closure = getattr(check, "__closure__", None) or ()
    for cell in closure:
        if isinstance(cell.cell_contents, tuple):
            return cell.cell_contents
    return None


def _rule_of(check) -> str | None:
    """What a value check requires, in its own words: the message it gives for an out-of-range probe."""
    for probe in (-(10**9), -1, 0, 1.5, 10**9):
        try:
            problem = check(probe)
        except Exception:  # a check that does not take numbers
            return None
        if problem:
            return problem
    return None


def _clean(text: str) -> str:
    """Docstring markup as markdown: ``x`` -> `x`, :class:`y` -> `y`."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _type_name(hint: Any) -> str:
    if hint is inspect.Parameter.empty:
        return "any"
    if isinstance(hint, str):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return "callable"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (types.UnionType, typing.Union):
        return " \\| ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _show(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if dataclasses.is_dataclass(value):
        return "(section)"
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)


# ------------------------------------------------------------------- the page


def accepted_keys(sections: list[Section] | None = None) -> set[str]:
    """The dotted keys of every setting (what the page lists)."""
    return {s.key for section in (sections or config_declarations()) for s in section.settings}


def render(sections: list[Section] | None = None) -> str:
    """The config reference page as markdown."""
    sections = sections or config_declarations()
    out = [
        "# Config reference",
        "",
        "Every key `python -m train` accepts, with its type, default and meaning. This page is generated "
        "when the docs are built, from the same declarations that validate a run config (the program's "
        "sections and each registered method's and task's builder signature), so it lists exactly what the "
        "validator accepts. Keys are written as in YAML (`train: {steps: 40}`) or as overrides on the command line "
        "(`train.steps=40`).",
        "",
    ]
    for section in sections:
        anchor = "top-level" if section.name == "top level" else section.name
        out += [f"## `{section.name}` {{ #{anchor} }}" if section.name != "top level" else "## Top level { #top-level }",
                "", _clean(section.doc), "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for s in section.settings:
            meaning = _clean(" ".join(s.meaning.split())).replace("|", "\\|")
            default = s.default.replace("|", "\\|")
            out.append(f"| `{s.key}` | {s.type} | `{default}` | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
