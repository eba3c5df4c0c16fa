"""The training program's own config sections: frozen dataclasses whose fields carry their checks.

Each field's annotation is its rule (``Annotated[int, Gt(0)]``, ``Literal[...]``), checked by the
same validator as a method's or a task's settings (:func:`jpeft.methods.registry.check_arguments`).
A method's section is its builder's keyword arguments (:mod:`jpeft.methods.registry`) and a
task's its builder's (:mod:`train.tasks`); the sections here are the program's: where the
model comes from, the data split, the optimizer and loop, evaluation, checkpoints, the
mesh. :mod:`train.config` assembles them into the run config and validates them.

Example:
    >>> TrainConfig().steps, ModelConfig().dtype
    (100, 'float32')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Lt
from pydantic import AfterValidator

from jpeft import attention
from jpeft.methods.registry import Says
from jpeft import stack

Positive = Annotated[int, Gt(0)]
NonNegative = Annotated[int, Ge(0)]
Fraction = Annotated[float, Ge(0.0), Lt(1.0), Says("must be in [0, 1)")]


def _mesh_size(value: int) -> int:
    if value >= 1 or value == -1:
        return value
    raise ValueError("not >= 1 and not -1")


MeshSize = Annotated[int, AfterValidator(_mesh_size), Says("must be >= 1, or -1 (the rest of the devices)")]
# minilm: all-MiniLM-L6-v2 (BERT), for task: classify
ModelSource = Literal["smollm2", "minilm"]
# slanted_triangular: ULMFiT's, warmup_steps = its rise
Schedule = Literal["cosine", "linear", "slanted_triangular"]
QuantFormat = Literal["nf4", "int4", "int8"]  # model.quantize: the frozen base on load (QLoRA)
RematPolicy = Literal[stack.REMAT_POLICIES]  # what each layer keeps for the backward pass
AttentionImplementation = Literal[attention.IMPLEMENTATIONS]  # auto: by backend and sequence length


@dataclass(frozen=True)
class ModelConfig:
    """Where the base model comes from: at most one of the three (none: smollm2)."""

    source: ModelSource | None = None
    gguf: str | None = None
    hf_folder: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    quantize: QuantFormat | None = None  # nf4 + method lora = QLoRA
    quant_block_size: Positive = 64  # weights per absmax scale (must divide the in-dim)
    # dots: less memory than none and, on CPU, a faster scanned step (smaller residual stacks to fill and read)
    remat: RematPolicy = "dots"  # what each layer keeps for the backward pass; dots: the matmul outputs
    attention: AttentionImplementation = "auto"  # auto: by backend and sequence length


@dataclass(frozen=True)
class DataConfig:
    """The BBC News headline task: split, prompt truncation, padding buckets."""

    dir: str | None = None  # None: the offline corpus from jpeft.assets
    split_seed: int = 0
    val_fraction: Fraction = 0.05
    test_fraction: Fraction = 0.10
    max_article_tokens: Positive = 128
    max_headline_tokens: Positive = 24
    bucket_size: Positive = 64
    max_train_articles: Positive | None = None
    source_prefix: str = ""  # task: seq2seq: text before each article (e.g. "summarize: " for FLAN-T5)


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and loop settings."""

    steps: Positive = 100
    batch_size: Positive = 8
    micro_batches: Positive = 1  # gradient accumulation: the batch in this many parts, one update (divides batch_size)
    lr: Annotated[float, Gt(0)] = 1e-3
    schedule: Schedule = "cosine"
    warmup_steps: NonNegative = 10
    weight_decay: Annotated[float, Ge(0)] = 0.0
    grad_clip: Annotated[float, Gt(0)] = 1.0
    eval_every: Positive = 50
    val_batches: Positive = 4
    seed: int = 0
    max_bad_steps: NonNegative = 0  # steps with a non-finite loss skipped before stopping
    loss_chunk: Positive | None = None  # answer rows projected onto the vocabulary at a time
    offload_optimizer: bool = False  # optimizer state in host memory between steps (memory kinds)
    offload_frozen: bool = False  # the frozen base in host memory; each layer's weights come in as it runs


@dataclass(frozen=True)
class EvalConfig:
    """ROUGE on held-out test articles, greedy decoding with the KV cache."""

    test_articles: NonNegative = 64  # 0: no evaluation
    batch_size: Positive = 32
    max_new_tokens: Positive = 24
    base_model: bool = True  # also score the base model


@dataclass(frozen=True)
class CheckpointConfig:
    """Training checkpoints in ``<run_dir>/checkpoints``: adapter, optimizer state, step, RNG key."""

    every: NonNegative = 100  # steps between saves; 0: only the last step
    keep: Positive = 2  # the newest ``keep`` are kept
    async_save: bool = True  # write in the background while training goes on
    resume: bool = True  # continue from the latest checkpoint when the run folder holds one


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (one may be -1: the rest); the default is one device."""

    data: MeshSize = 1
    fsdp: MeshSize = 1
    tensor: MeshSize = 1


@dataclass(frozen=True)
class ShardingConfig:
    """Logical-axis rules: ``default`` (FSDP x tensor), ``fsdp``, or a YAML file path."""

    rules: str = "default"


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs; unset keys fall back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""

    coordinator: str | None = None  # host:port of process 0
    num_processes: Positive | None = None
    process_id: NonNegative | None = None
