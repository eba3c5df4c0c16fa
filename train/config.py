"""Run configuration: a tree of frozen dataclasses, validated at the edge.

A run is described by a YAML file plus ``key=value`` overrides
(``train.steps=20 lora.rank=4``). :func:`load_config` turns both into a
:class:`RunConfig` or raises :class:`ConfigError` with one message that names
the offending key and says how to fix it. Nothing is loaded or written before
the configuration is valid.

The program's own sections (``model``, ``data``, ``train``, ...) are dataclasses here.
Methods are not: ``method:`` names any method in :mod:`jpeft.methods.registry`, and a
top-level section with a method's name holds that builder's keyword arguments
(``lora: {rank: 8}``), validated against the builder's signature and its own checks.

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
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from jpeft import attention
from jpeft.methods import registry
from jpeft.models import stack

MODEL_SOURCES = ("smollm2", "minilm")  # minilm: all-MiniLM-L6-v2 (BERT), for task: classify
SCHEDULES = ("cosine", "linear", "slanted_triangular")  # slanted_triangular: ULMFiT's, warmup_steps = its rise
DTYPES = ("float32", "bfloat16")
QUANT_FORMATS = ("nf4", "int4", "int8")  # model.quantize: the frozen base on load (QLoRA)
# headlines: a decoder writes the headline after the article (train/run.py); seq2seq: an encoder-decoder
# (T5) reads the article and writes the headline (train/seq2seq.py); classify: BBC News categories with an
# encoder (train/classify.py)
TASKS = ("headlines", "seq2seq", "classify")
CLASSIFIER_INPUTS = ("pooler", "cls", "mean")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


# ---------------------------------------------------------------- value checks


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _fraction(value) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def _one_of(*choices):
    def check(value) -> str | None:
        if value in choices:
            return None
        return f"must be one of {', '.join(map(repr, choices))}"

    return check


def _check(fn, default=dataclasses.MISSING, **kwargs):
    """A dataclass field whose value is checked by ``fn`` (returns an error or None)."""
    return field(default=default, metadata={"check": fn}, **kwargs)


# ---------------------------------------------------------------- the tree


@dataclass(frozen=True)
class ModelConfig:
    """Where the base model comes from: at most one of the three (none: smollm2)."""

    source: str | None = _check(_one_of(*MODEL_SOURCES), default=None)
    gguf: str | None = None
    hf_folder: str | None = None
    dtype: str = _check(_one_of(*DTYPES), default="float32")
    scan_layers: bool = True
    quantize: str | None = _check(_one_of(*QUANT_FORMATS), default=None)  # nf4 + method lora = QLoRA
    quant_block_size: int = _check(_positive, default=64)  # weights per absmax scale (must divide the in-dim)
    remat: str = _check(_one_of(*stack.REMAT_POLICIES), default="none")  # what each layer keeps for the backward pass
    attention: str = _check(_one_of(*attention.IMPLEMENTATIONS), default="auto")  # auto: by backend and sequence length


class MethodSection(dict):
    """A method's settings (its builder's keyword arguments), read-only, with attribute access.

    Attributes that were not set read the builder's default, so ``cfg.lora.rank`` always answers.

    Example:
        >>> section = MethodSection("lora", {"rank": 4})
        >>> section.rank, section.alpha
        (4, 16.0)
    """

    def __init__(self, method: str, settings: dict):
        super().__init__(settings)
        object.__setattr__(self, "_method", method)

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        defaults = registry.defaults(self._method)
        if name in defaults:
            return defaults[name]
        raise AttributeError(f"{self._method} has no setting {name!r}")

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to {self._method}.{name}")

    def _readonly(self, *args, **kwargs):
        raise TypeError("method sections are read-only; use apply_overrides")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = _readonly

    def __hash__(self):  # noqa: D105
        return hash((self._method, tuple(sorted((k, repr(v)) for k, v in self.items()))))


@dataclass(frozen=True)
class DataConfig:
    """The BBC News headline task: split, prompt truncation, padding buckets."""

    dir: str | None = None  # None: the offline corpus from jpeft.assets
    split_seed: int = 0
    val_fraction: float = _check(_fraction, default=0.05)
    test_fraction: float = _check(_fraction, default=0.10)
    max_article_tokens: int = _check(_positive, default=128)
    max_headline_tokens: int = _check(_positive, default=24)
    bucket_size: int = _check(_positive, default=64)
    max_train_articles: int | None = _check(_positive, default=None)
    source_prefix: str = ""  # task: seq2seq: text before each article (e.g. "summarize: " for FLAN-T5)


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and loop settings."""

    steps: int = _check(_positive, default=100)
    batch_size: int = _check(_positive, default=8)
    lr: float = _check(_positive, default=1e-3)
    schedule: str = _check(_one_of(*SCHEDULES), default="cosine")
    warmup_steps: int = _check(_non_negative, default=10)
    weight_decay: float = _check(_non_negative, default=0.0)
    grad_clip: float = _check(_positive, default=1.0)
    eval_every: int = _check(_positive, default=50)
    val_batches: int = _check(_positive, default=4)
    seed: int = 0
    max_bad_steps: int = _check(_non_negative, default=0)  # steps with a non-finite loss skipped before stopping
    loss_chunk: int | None = _check(_positive, default=None)  # answer rows projected onto the vocabulary at a time
    offload_optimizer: bool = False  # optimizer state in host memory between steps (memory kinds)


@dataclass(frozen=True)
class EvalConfig:
    """ROUGE on held-out test articles, greedy decoding with the KV cache."""

    test_articles: int = _check(_non_negative, default=64)  # 0: no ROUGE evaluation
    batch_size: int = _check(_positive, default=32)
    max_new_tokens: int = _check(_positive, default=24)
    base_model: bool = True  # also score the base model


@dataclass(frozen=True)
class ClassifyConfig:
    """The classification job (``task: classify``): the head's input and the weights trained whole."""

    classifier_input: str = _check(_one_of(*CLASSIFIER_INPUTS), default="pooler")  # pooler, [CLS] or mean
    modules_to_save: str | None = "classifier/.*"  # trained whole besides the method (PEFT's modules_to_save)


@dataclass(frozen=True)
class CheckpointConfig:
    """Training checkpoints in ``<run_dir>/checkpoints``: adapter, optimizer state, step, RNG key."""

    every: int = _check(_non_negative, default=100)  # steps between saves; 0: only the last step
    keep: int = _check(_positive, default=2)  # the newest ``keep`` are kept
    async_save: bool = True  # write in the background while training goes on
    resume: bool = True  # continue from the latest checkpoint when the run folder holds one


def _mesh_size(value) -> str | None:
    return None if value >= 1 or value == -1 else "must be >= 1, or -1 (the rest of the devices)"


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (one may be -1: the rest); the default is one device."""

    data: int = _check(_mesh_size, default=1)
    fsdp: int = _check(_mesh_size, default=1)
    tensor: int = _check(_mesh_size, default=1)


@dataclass(frozen=True)
class ShardingConfig:
    """Logical-axis rules: ``default`` (FSDP x tensor), ``fsdp``, or a YAML file path."""

    rules: str = "default"


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs; unset keys fall back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""

    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = _check(_positive, default=None)
    process_id: int | None = _check(_non_negative, default=None)


@dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    name: str = "run"
    method: str = "lora"  # a name in jpeft.methods.registry
    task: str = _check(_one_of(*TASKS), default="headlines")
    out_dir: str = "runs"
    run_dir: str | None = None  # None: <out_dir>/<name>-<timestamp>
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    methods: dict = field(default_factory=dict)  # {method name: MethodSection}, the sections given

    def __getattr__(self, name: str):
        # cfg.lora, cfg.prompt_tuning, ...: the section of a registered method (empty if not given).
        if name.startswith("_") or name not in registry.names():
            raise AttributeError(name)
        return self.methods.get(name) or MethodSection(name, {})

    @property
    def method_settings(self) -> MethodSection:
        """The settings of the method this run trains."""
        return getattr(self, self.method)


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
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys, not {type(raw).__name__}")
    return apply_overrides(from_dict(raw), overrides)


def from_dict(raw: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain nested dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of keys, not {raw!r}")
    known = registry.names()
    sections = {k: v for k, v in raw.items() if k in known}
    rest = {k: v for k, v in raw.items() if k not in known}
    config = _build(RunConfig, rest, prefix="", extra_keys=known)
    if config.method not in known:
        close = difflib.get_close_matches(config.method, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"bad value for 'method': {config.method!r} must be one of "
                          f"{', '.join(map(repr, known))}{hint}")
    methods = {name: MethodSection(name, _method_section(name, value)) for name, value in sections.items()}
    config = dataclasses.replace(config, methods=methods)
    _check_whole(config)
    return config


def _method_section(name: str, value) -> dict:
    """A method section validated against its builder (names, types, the builder's own value checks)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name!r} must be a mapping of keys, not {value!r}")
    try:
        return registry.validate(name, value)
    except registry.SettingsError as err:
        if err.setting is None:
            message = str(err).replace("unknown setting '", f"unknown key '{name}.", 1)
            raise ConfigError(message.replace(f"({name}'s settings:", "(valid keys here:")) from None
        raise ConfigError(f"bad value for '{name}.{err.setting}': {err}") from None


def to_dict(config) -> dict:
    """A config (or a section of one) as a plain nested dict: method sections as top-level keys."""
    if not isinstance(config, RunConfig):
        return dataclasses.asdict(config)
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "methods"}
    out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
    out.update({name: dict(section) for name, section in config.methods.items()})
    return out


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``dotted.key=value`` strings; values are parsed as YAML scalars."""
    raw = to_dict(config)
    for name in registry.names():
        raw.setdefault(name, {})  # any method's section can be overridden, given or not
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
        method_section = len(parents) == 1 and parents[0] in registry.names()
        if leaf not in node and not method_section:
            raise ConfigError(f"unknown key {key!r} in override {item!r}{_suggest(leaf, node)}")
        try:
            node[leaf] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            node[leaf] = text
    return from_dict({k: v for k, v in raw.items() if v != {} or k not in registry.names()})


def _build(cls, raw, prefix: str, extra_keys=()):
    """Check ``raw`` against dataclass ``cls`` (keys, types, values), recursively."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where!r} must be a mapping of keys, not {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "methods"}
    for key in raw:
        if key not in fields:
            options = {**fields, **dict.fromkeys(extra_keys)}
            raise ConfigError(f"unknown key {prefix + str(key)!r}{_suggest(str(key), options)}")
    values = {}
    for name, value in raw.items():
        f = fields[name]
        key = prefix + name
        kind = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value or {}, prefix=key + ".")
            continue
        value = _coerce(key, value, kind)
        check = f.metadata.get("check")
        problem = check(value) if check and value is not None else None
        if problem:
            raise ConfigError(f"bad value for {key!r}: {value!r} {problem}")
        values[name] = value
    return cls(**values)


def _coerce(key: str, value, kind):
    """Return ``value`` as type ``kind`` or raise a ConfigError naming ``key``."""
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if optional else kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"bad value for {key!r}: it needs a {base.__name__}, not null")
    if base is float and isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads 1e-3 as a string
        except ValueError:
            pass
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"bad value for {key!r}: {value!r} is not a finite number")
        return float(value)
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"bad value for {key!r}: {value!r} is a {type(value).__name__}, it needs a {base.__name__}")


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
    if config.data.val_fraction + config.data.test_fraction >= 1.0:
        raise ConfigError("'data.val_fraction' + 'data.test_fraction' must be < 1 to leave training articles")
    if config.data.dir is not None and not os.path.isdir(config.data.dir):
        raise ConfigError(f"data.dir={config.data.dir!r} is not a folder; point it at the BBC News folder "
                          "(<category>/<nnn>.txt files), or leave it out for the offline corpus")
    from jpeft.sharding import ShardingError
    from train.placement import load_rules

    try:
        load_rules(config.sharding.rules)
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
