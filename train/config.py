"""Run configuration: a tree of frozen dataclasses, validated at the edge.

A run is described by a YAML file plus ``key=value`` overrides
(``train.steps=20 lora.rank=4``). :func:`load_config` turns both into a
:class:`RunConfig` or raises :class:`ConfigError` with one message that names
the offending key and says how to fix it. Nothing is loaded or written before
the configuration is valid.

The program's own sections (``model``, ``data``, ``train``, ...) are dataclasses
(:mod:`train.sections`). Methods and tasks are not: ``method:`` names any method in
:mod:`jpeft.methods.registry` and ``task:`` any task in :mod:`train.tasks`, and a
top-level section with such a name holds that builder's keyword arguments
(``lora: {rank: 8}``, ``classify: {classifier_input: cls}``), validated against the
builder's signature and its own checks. A section the run does not use is an error.

Example:
    >>> cfg = from_dict({"name": "demo", "train": {"steps": 50}})
    >>> cfg.train.steps, cfg.method
    (50, 'lora')
    >>> apply_overrides(cfg, ["lora.rank=4"]).lora.rank
    4
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from jpeft.methods import registry
from jpeft.sharding import ShardingError
from train import tasks
from train.placement import rules_from_setting
from train.errors import ConfigError  # noqa: F401  (re-exported: the config's errors)
from train.sections import (  # noqa: F401  (re-exported: the run config's sections)
    CheckpointConfig, DataConfig, DistributedConfig, EvalConfig, MeshConfig, ModelConfig, ShardingConfig,
    TrainConfig)

class Section(dict):
    """A method's or a task's settings (its builder's keyword arguments), read-only, with attribute access.

    Attributes that were not set read the builder's default, so ``cfg.lora.rank`` always answers.

    Example:
        >>> section = Section("lora", {"rank": 4}, registry.defaults("lora"))
        >>> section.rank, section.alpha
        (4, 16.0)
    """

    def __init__(self, name: str, settings: dict, defaults: dict):
        super().__init__(settings)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_defaults", dict(defaults))

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        if name in self._defaults:
            return self._defaults[name]
        raise AttributeError(f"{self._name} has no setting {name!r}")

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to {self._name}.{name}")

    def _readonly(self, *args, **kwargs):
        raise TypeError("config sections are read-only; use apply_overrides")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = _readonly

    def __hash__(self):  # noqa: D105
        return hash((self._name, tuple(sorted((k, repr(v)) for k, v in self.items()))))


class Builders(typing.NamedTuple):
    """A kind of builder with a config section per name: the methods, the tasks."""

    kind: str  # the top-level key that picks one: "method", "task"
    names: typing.Callable[[], list[str]]
    check: typing.Callable[[str, dict], dict]  # validates a section; raises registry.SettingsMappingError
    defaults: typing.Callable[[str], dict]


def _builders() -> tuple[Builders, ...]:
    return (Builders("method", registry.names, registry.validate, registry.defaults),
            Builders("task", tasks.names, tasks.check_settings, tasks.defaults))


def _section_names() -> dict[str, Builders]:
    """Every name that may be a top-level section, and the kind of builder it configures."""
    return {name: builders for builders in _builders() for name in builders.names()}


@dataclass(frozen=True)
class RunConfig:
    """A whole training run: the program's sections, plus the sections of the run's method and task."""

    name: str = "run"
    method: str = "lora"  # a name in jpeft.methods.registry
    task: str = "headlines"  # a name in train.tasks
    out_dir: str = "runs"
    run_dir: str | None = None  # None: <out_dir>/<name>-<timestamp>
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sections: dict = field(default_factory=dict)  # {method or task name: Section}, the sections given

    def __getattr__(self, name: str):
        # cfg.lora, cfg.classify, ...: the section of a registered method or task (its defaults if not given).
        builders = None if name.startswith("_") else _section_names().get(name)
        if builders is None:
            raise AttributeError(name)
        return self.sections.get(name) or Section(name, {}, builders.defaults(name))

    @property
    def method_settings(self) -> Section:
        """The settings of the method this run trains."""
        return getattr(self, self.method)

    @property
    def task_settings(self) -> Section:
        """The settings of the run's task."""
        return getattr(self, self.task)


# ---------------------------------------------------------------- building


def load_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file, apply ``key=value`` overrides, validate everything."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist; pass --config configs/<name>.yaml") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a folder; pass a YAML file, e.g. --config "
                          "configs/smollm2_bbc_lora.yaml") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not a text file (not UTF-8); pass a YAML file") from None
    except PermissionError:
        raise ConfigError(f"config file {path!r} cannot be read (permission denied)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if raw is None or raw == {}:
        raise ConfigError(f"config file {path!r} is empty; a run needs at least its name, model and method (start "
                          "from one of configs/*.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys, not {type(raw).__name__}")
    return apply_overrides(from_dict(raw), overrides)


def from_dict(raw: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain nested dict.

    A top-level key that names a registered method or task is that builder's section; a
    section the run does not use (another method's, another task's) is refused like an
    unknown key, so a setting never goes unread.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of keys, not {raw!r}")
    known = _section_names()
    given = {k: v for k, v in raw.items() if k in known and v not in (None, {})}
    rest = {k: v for k, v in raw.items() if k not in known}
    config = _build(RunConfig, rest, prefix="", extra_keys=list(known))
    for builders in _builders():
        chosen, names = getattr(config, builders.kind), builders.names()
        if chosen not in names:
            close = difflib.get_close_matches(chosen, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"bad value for {builders.kind!r}: {chosen!r} must be one of "
                              f"{', '.join(map(repr, names))}{hint}")
    sections = {name: Section(name, _section(name, value, known[name]), known[name].defaults(name))
                for name, value in given.items()}  # bad values first: they name the key
    for name in given:
        kind = known[name].kind
        if getattr(config, kind) != name:
            raise ConfigError(f"unknown key {name!r} for this run: it is the section of the {kind} {name!r}, but the "
                              f"run's {kind} is {getattr(config, kind)!r}; remove the section, or set {kind}: {name}")
    config = dataclasses.replace(config, sections=sections)
    _check_whole(config)
    return config


def _section(name: str, value, builders: Builders) -> dict:
    """A method's or task's section validated against its builder (names, types, the builder's own value checks)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name!r} must be a mapping of keys, not {value!r}")
    try:
        return builders.check(name, value)
    except registry.SettingsMappingError as err:
        if err.setting is None:
            message = str(err).replace("unknown setting '", f"unknown key '{name}.", 1)
            raise ConfigError(message.replace(f"({name}'s settings:", "(valid keys here:")) from None
        raise ConfigError(f"bad value for '{name}.{err.setting}': {err}") from None


def to_dict(config) -> dict:
    """A config (or a section of one) as a plain nested dict: method sections as top-level keys."""
    if not isinstance(config, RunConfig):
        return dataclasses.asdict(config)
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "sections"}
    out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
    out.update({name: dict(section) for name, section in config.sections.items()})
    return out


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``dotted.key=value`` strings; values are parsed as YAML scalars."""
    raw = to_dict(config)
    known = _section_names()
    for name in known:
        raw.setdefault(name, {})  # any method's or task's section can be overridden, given or not
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=20)")
        *parents, leaf = key.strip().split(".")
        node = raw
        for i, part in enumerate(parents):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"unknown key {where!r} in override {item!r}{_suggest(part, node)}")
            node = child
        builder_section = len(parents) == 1 and parents[0] in known
        if leaf not in node and not builder_section:
            raise ConfigError(f"unknown key {key!r} in override {item!r}{_suggest(leaf, node)}")
        try:
            node[leaf] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            node[leaf] = text
    return from_dict({k: v for k, v in raw.items() if v != {} or k not in known})


def _build(cls, raw, prefix: str, extra_keys=()):
    """Check ``raw`` against dataclass ``cls`` (keys, types, values), recursively.

    A dataclass's fields are checked as a builder's keyword arguments are
    (:func:`jpeft.methods.registry.check_arguments`): one validator for every section.
    """
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where!r} must be a mapping of keys, not {raw!r}")
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "sections"}
    for key in raw:
        if key not in fields:
            options = {**dict.fromkeys(fields), **dict.fromkeys(extra_keys)}
            raise ConfigError(f"unknown key {prefix + str(key)!r}{_suggest(str(key), options)}")
    hints = typing.get_type_hints(cls)
    nested = {name: _build(hints[name], value or {}, prefix=prefix + name + ".")
              for name, value in raw.items() if dataclasses.is_dataclass(hints[name])}
    try:
        values = registry.check_arguments(cls, {k: v for k, v in raw.items() if k not in nested}, what=where,
                                          context=("sections",))
    except registry.SettingsMappingError as err:
        raise ConfigError(f"bad value for {prefix + str(err.setting)!r}: {err}") from None
    return cls(**values, **nested)


def _check_whole(config: RunConfig) -> None:
    """Checks that involve more than one key."""
    m = config.model
    given = [k for k in ("source", "gguf", "hf_folder") if getattr(m, k) is not None]
    if len(given) > 1:
        raise ConfigError(
            f"set only one of 'model.source', 'model.gguf' or 'model.hf_folder' (got {', '.join(given)});"
            " leave the others out (or null)"
        )
    if config.train.warmup_steps >= config.train.steps:
        raise ConfigError(
            f"bad value for 'train.warmup_steps': {config.train.warmup_steps} must be < train.steps"
            f" ({config.train.steps}); lower it too, e.g. train.warmup_steps=0"
        )
    if config.train.batch_size % config.train.micro_batches:
        raise ConfigError(
            f"bad value for 'train.micro_batches': {config.train.micro_batches} must divide train.batch_size"
            f" ({config.train.batch_size}); e.g. train.micro_batches=1 (no accumulation)"
        )
    if config.data.val_fraction + config.data.test_fraction >= 1.0:
        raise ConfigError("'data.val_fraction' + 'data.test_fraction' must be < 1 to leave training articles")
    if config.data.dir is not None and not os.path.isdir(config.data.dir):
        raise ConfigError(f"data.dir={config.data.dir!r} is not a folder; point it at the BBC News folder "
                          "(<category>/<nnn>.txt files), or leave it out for the offline corpus")
    try:
        rules_from_setting(config.sharding.rules)
    except ShardingError as err:
        raise ConfigError(f"bad value for 'sharding.rules': {err}") from None


def _suggest(key: str, options) -> str:
    """'; valid keys: ...' plus a close match when there is one."""
    names = sorted(map(str, options)) if isinstance(options, dict) else []
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid keys here: {', '.join(names)})" if names else hint


def describe(config) -> Any:
    """A YAML rendering of the config (for printing at the start of a run, and the run's record)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
