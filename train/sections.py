"""The training program's own config sections: frozen dataclasses whose fields carry their checks.

A method's section is its builder's keyword arguments (:mod:`jpeft.methods.registry`) and a
task's its builder's (:mod:`train.tasks`); the sections here are the program's: where the
model comes from, the data split, the optimizer and loop, evaluation, checkpoints, the
mesh. :mod:`train.config` assembles them into the run config and validates them.

Example:
    >>> TrainConfig().steps, ModelConfig().dtype
    (100, 'float32')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODEL_SOURCES = ("smollm2", "minilm")  # minilm: all-MiniLM-L6-v2 (BERT), for task: classify
SCHEDULES = ("cosine", "linear", "slanted_triangular")  # slanted_triangular: ULMFiT's, warmup_steps = its rise
DTYPES = ("float32", "bfloat16")
QUANT_FORMATS = ("nf4", "int4", "int8")  # model.quantize: the frozen base on load (QLoRA)
CLASSIFIER_INPUTS = ("pooler", "cls", "mean")

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


@dataclass(frozen=True)
class EvalConfig:
    """ROUGE on held-out test articles, greedy decoding with the KV cache."""

    test_articles: int = _check(_non_negative, default=64)  # 0: no ROUGE evaluation
    batch_size: int = _check(_positive, default=32)
    max_new_tokens: int = _check(_positive, default=24)
    base_model: bool = True  # also score the base model


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


