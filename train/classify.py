"""The classification job (``task: classify``): BBC News category from the article, with an encoder.

The same corpus and the same seeded split as the headline job (:mod:`train.data`); the
input is the headline and the article (the tokenizer's ``[CLS] ... [SEP]``, cut to
``data.max_article_tokens``), the label one of the five categories (sorted by name).
The model must have a classification head (``model.classify``, an encoder such as BERT);
a base model without one gets a fresh head of five classes. The head is trained whole
next to the method (``classify.modules_to_save``, PEFT's ``modules_to_save``) unless the
method trains it itself (full fine-tuning). Accuracy and macro-F1 on the test split go
to ``summary.json``.

    python -m train --config configs/minilm_bbc_lora.yaml
"""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft import tree
from jpeft.checkpoint import save_adapter
from jpeft.methods.heads import with_modules_to_save
from jpeft.models import spec
from train import checkpointing, data, distributed, model, report, run_folder, trainer
from train.config import ConfigError, RunConfig, describe, to_dict


class ClassifyBatch(NamedTuple):
    """Right-padded token ids and one label per row."""

    tokens_BxT: np.ndarray
    attention_mask_BxT: np.ndarray
    labels_B: np.ndarray


def class_sums(params, model_, batch: ClassifyBatch):
    """``(sum of the rows' cross-entropies, number of rows)``: the job's loss for :func:`train.trainer.train_loop`."""
    hidden_BxTxD, _ = model_.forward(params, batch.tokens_BxT, attention_mask_BxT=batch.attention_mask_BxT)
    logits_BxC = model_.classify(params, hidden_BxTxD, batch.attention_mask_BxT)
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch.labels_B)
    return jnp.sum(losses_B), jnp.asarray(losses_B.shape[0], jnp.float32)


def macro_f1(labels, predictions, num_classes: int) -> float:
    """The unweighted mean over classes of F1 (a class never predicted nor present scores 0, as scikit-learn).

    Example:
        >>> round(macro_f1([0, 0, 1, 2], [0, 1, 1, 2], 3), 4)   # F1s 2/3, 2/3, 1
        0.7778
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    scores = []
    for c in range(num_classes):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


class Task:
    """Encoded articles, labels and fixed batches for one classification run."""

    def __init__(self, cfg: RunConfig, tokenizer):
        dc = cfg.data
        articles, self.split = data.configured_split(dc)
        self.categories = sorted({a.category for a in articles})
        self.tokenizer, self.max_len, self.bucket = tokenizer, dc.max_article_tokens, dc.bucket_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bs = cfg.train.batch_size
        self.train_articles = self.split.train[: dc.max_train_articles]
        if len(self.train_articles) < bs or len(self.split.val) < bs:
            raise ConfigError(f"train.batch_size={bs} is larger than the {len(self.train_articles)} training or "
                              f"{len(self.split.val)} validation articles; lower train.batch_size")
        self.val_articles = self.split.val[: cfg.train.val_batches * bs]
        self.test, self.test_count = self.split.test[: cfg.eval.test_articles], cfg.eval.test_articles
        self.seed, self.batch_size = cfg.train.seed, bs
        self.train, self.val_batches = [], []

    def tokenize(self) -> "Task":
        """Encode the training and validation articles (after the cheap checks have passed)."""
        self.train = self.encode(self.train_articles)
        self.val_batches = self.batches(self.encode(self.val_articles), self.batch_size, drop=True)
        return self

    def encode(self, articles) -> list[tuple[list[int], int]]:
        texts = [f"{a.headline}\n{a.body[: 12 * self.max_len]}" for a in articles]
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_len)["input_ids"] if texts else []
        return [(i, self.categories.index(a.category)) for i, a in zip(ids, articles)]

    def batch(self, examples) -> ClassifyBatch:
        t = data.bucket_length(max(len(i) for i, _ in examples), bucket_size=self.bucket, max_len=self.max_len)
        tokens = np.full((len(examples), t), self.pad_id, np.int32)
        mask = np.zeros((len(examples), t), np.int32)
        for b, (ids, _) in enumerate(examples):
            tokens[b, : len(ids)], mask[b, : len(ids)] = ids, 1
        return ClassifyBatch(tokens, mask, np.array([label for _, label in examples], np.int32))

    def batches(self, examples, batch_size: int, drop: bool = False) -> list[ClassifyBatch]:
        stop = len(examples) - batch_size + 1 if drop else len(examples)
        return [self.batch(examples[i: i + batch_size]) for i in range(0, max(stop, 0), batch_size)]

    def batches_from(self, start: int):
        """Endless shuffled training batches from batch ``start`` on (a pure function of the seed and ``start``)."""
        rng = np.random.default_rng(self.seed)
        per_epoch = len(self.train) // self.batch_size
        epoch, offset = divmod(start, per_epoch)
        for _ in range(epoch):
            rng.permutation(len(self.train))
        while True:
            order = rng.permutation(len(self.train))
            for b in range(offset, per_epoch):
                yield self.batch([self.train[i] for i in order[b * self.batch_size: (b + 1) * self.batch_size]])
            offset = 0


def check_split(task: Task) -> None:
    """A :class:`ConfigError` when the split cannot teach or measure a classifier (checked before the run
    folder is written): fewer than two categories among the training articles (the model would learn one
    answer and score a perfect 1.0), or no test articles (accuracy would be nan)."""
    seen = sorted({a.category for a in task.train_articles})
    if len(seen) < 2:
        raise ConfigError(f"task: classify needs articles of at least two categories to train on, but the "
                          f"{len(task.train_articles)} training articles are all {seen[0]!r} (the corpus has "
                          f"{len(task.categories)} categor{'y' if len(task.categories) == 1 else 'ies'}): point "
                          "data.dir at a corpus with several <category>/ folders, or raise data.max_train_articles")
    if not task.test:
        raise ConfigError("task: classify scores accuracy and macro-F1 on test articles, but there are none ("
                          f"eval.test_articles is {task.test_count}, the test split has {len(task.split.test)}): "
                          "set eval.test_articles to at least 1 (and data.test_fraction above 0)")


def with_head(loaded: model.Loaded, num_labels: int, cfg: RunConfig, key: jax.Array) -> model.Loaded:
    """``loaded`` with a classification head of ``num_labels`` classes: the model's own, checked, or a fresh one.

    Raises:
        ConfigError: the model has no classification head (a decoder-only language model), or
            its head (restored from the folder) has another number of classes than the task.
    """
    model_ = loaded.model
    if model_.family.classify is None:
        raise ConfigError(f"task: classify needs an encoder with a classification head, but the {model_.name!r} "
                          "model is a decoder-only language model; set model.source: minilm (or model.hf_folder: a BERT folder, "
                          "e.g. all-MiniLM-L6-v2), or use task: headlines with this model")
    settings = {"classifier_input": cfg.classify.classifier_input}
    have = getattr(model_.config, "num_labels", 0)
    if have and have != num_labels:
        raise ConfigError(f"the model's classification head (restored from {cfg.model.hf_folder or cfg.model.source}) has {have} classes, "
                          f"but the BBC News task has {num_labels}; use the encoder without its head (a BertModel "
                          "folder), or a head of that many classes")
    if have:
        return loaded._replace(model=model_.replace(**settings))
    new_model = model_.replace(num_labels=num_labels, **settings)
    old = set(tree.flatten(model_.abstract_params()))
    new = jax.tree_util.tree_flatten_with_path(new_model.specs(), is_leaf=spec.is_spec)[0]
    head_specs = {tree.path_to_str(k): s for k, s in new if tree.path_to_str(k) not in old}
    head = spec.init_params(head_specs, key, getattr(new_model.config, "param_dtype", "float32"))
    return loaded._replace(model=new_model, params=tree.unflatten({**tree.flatten(loaded.params), **head}))


def check_inputs(tokenizer, model_, cfg: RunConfig) -> None:
    """A :class:`ConfigError` when the tokenizer makes ids the model's embedding table does not have, or the
    inputs are longer than the model's positions."""
    size, rows = len(tokenizer), getattr(model_.config, "vocab_size", None)
    if rows is not None and size > rows:
        raise ConfigError(f"the tokenizer has {size} tokens but the model's embedding table has {rows} rows (ids "
                          f"{rows}..{size - 1} have no embedding); use the tokenizer of the model's own folder")
    longest = model_.max_positions
    if longest is not None and cfg.data.max_article_tokens > longest:
        raise ConfigError(f"bad value for 'data.max_article_tokens': {cfg.data.max_article_tokens} is more than the "
                          f"model's {longest} positions; lower it to at most {longest}")


def make_method(cfg: RunConfig, loaded: model.Loaded, params):
    """The configured method, plus the head trained whole unless the method already trains it."""
    from train.run import make_method as build

    method = build(cfg, loaded.model, loaded.tokenizer)
    if cfg.classify.modules_to_save is None:
        return method
    adapter = jax.eval_shape(lambda p: method.init(jax.random.key(0), p), params)
    head = set(tree.flatten(tree.split(params, cfg.classify.modules_to_save)[0]))
    if head <= set(tree.flatten(adapter)):  # full fine-tuning (of the head): nothing to add
        return method
    try:
        return with_modules_to_save(method, cfg.classify.modules_to_save)
    except ValueError as err:
        raise ConfigError(f"classify.modules_to_save: {err}; the classification head must train whole beside the "
                          f"method, so use a method without those (lora, ia3, prompt_tuning...), or a model folder "
                          "whose head is already trained with classify.modules_to_save: null") from None


def evaluate(params, model_, task: Task, articles, batch_size: int) -> tuple[list[int], list[int]]:
    """``(labels, predicted labels)`` of ``articles``."""
    examples = task.encode(articles)
    run = jax.jit(lambda p, b: jnp.argmax(model_.classify(p, model_.forward(p, b.tokens_BxT,
                                                                            attention_mask_BxT=b.attention_mask_BxT)[0],
                                                          b.attention_mask_BxT), axis=-1))
    predictions = []
    for batch in task.batches(examples, batch_size):
        predictions.extend(int(x) for x in run(params, batch))
    return [label for _, label in examples], predictions


def run(cfg: RunConfig, *, loaded: model.Loaded | None = None) -> dict:
    """The classification job, start to finish (see the module docstring); returns its summary."""
    from train.run import Timer, method_settings, resume_point

    timer = Timer()
    folder = run_folder.plan(run_dir=cfg.run_dir, out_dir=cfg.out_dir, name=cfg.name)
    model.resolve(cfg.model)
    with timer("load_model"):
        loaded = model.load(cfg.model) if loaded is None else loaded
    with timer("data"):
        task = Task(cfg, loaded.tokenizer)
        check_split(task)
        loaded = with_head(loaded, len(task.categories), cfg, jax.random.key(cfg.train.seed + 1))
        check_inputs(loaded.tokenizer, loaded.model, cfg)
        task.tokenize()
    params, model_ = loaded.params, loaded.model
    print(f"data: {len(task.train)} train / {len(task.split.val)} val / {len(task.test)} test articles, "
          f"{len(task.categories)} classes; at most {task.max_len} tokens")
    method = make_method(cfg, loaded, params)
    try:
        adapter = method.init(jax.random.key(cfg.train.seed), params)
    except ValueError as err:
        raise ConfigError(f"the {cfg.method!r} settings do not fit the model: {err}") from None
    frozen = trainer.frozen_part(params, adapter)
    checkpoints, resumed, corrupt = resume_point(cfg, folder, method, adapter, params)

    run_folder.create(folder, method=cfg.method, config_yaml=describe(cfg), main=distributed.is_main())
    run_dir = folder.path
    print(f"run folder: {run_dir}")
    if checkpoints is None:
        checkpoints = checkpointing.for_run(run_dir, cfg)
    checkpoints.set_aside(corrupt)
    log = report.MetricsLog(os.path.join(run_dir, "metrics.jsonl") if distributed.is_main() else os.devnull,
                            resume_step=resumed.step if resumed is not None else None)
    counts = jpeft.param_report(params, adapter)
    print(counts)
    log({"kind": "params", "trainable": counts.trainable, "total": counts.total, "percent": counts.percent})

    with timer("train"):
        adapter = trainer.train_loop(
            cfg=cfg.train, method=method, model=model_, adapter=adapter, frozen=frozen,
            batches=task.batches_from, val_batches=task.val_batches, log=log, progress=cfg.progress,
            mesh=distributed.build_mesh(cfg.mesh), rules=cfg.sharding.rules, checkpoints=checkpoints,
            resumed=resumed, sums=class_sums)

    with timer("eval_test"):
        tuned = jpeft.for_inference(method, frozen, trainer.on_device_of(adapter, params))
        labels, predictions = evaluate(tuned, model_, task, task.test, cfg.eval.batch_size)
        del tuned
    head = set(tree.flatten(tree.split(params, cfg.classify.modules_to_save or "classifier/.*")[0]))
    label = "frozen encoder + trained head" if set(tree.flatten(adapter)) <= head else method.describe()
    row = {"model": label, "trainable": counts.trainable, "percent": counts.percent,
           "accuracy": float(np.mean(np.array(labels) == np.array(predictions))),
           "macro_f1": macro_f1(labels, predictions, len(task.categories)), "test_articles": len(labels)}
    log({"kind": "classification", **row})
    with open(os.path.join(run_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for article, p in zip(task.test, predictions):
            f.write(json.dumps({"key": article.key, "label": article.category,
                                "prediction": task.categories[p]}) + "\n")

    with timer("save"):
        metadata = {**method_settings(cfg), "steps": cfg.train.steps, "model": to_dict(cfg.model),
                    "task": "classify", "labels": task.categories}
        save_adapter(os.path.join(run_dir, "adapter"), method.saved_form(adapter), metadata=metadata)

    steps = [r for r in log.records if r["kind"] == "train"]
    summary = {"kind": "summary", "run_dir": run_dir, "classification": row,
               "timings_s": {**timer.phases, "median_step": float(np.median([r["seconds"] for r in steps[1:] or steps]))},
               "elapsed_s": timer.elapsed}
    log(summary)
    if distributed.is_main():
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    print(f"\n{row['model']}: accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f} "
          f"({row['test_articles']} test articles; {counts.trainable:,} trainable parameters)")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings_s"].items()))
    print(f"elapsed: {timer.elapsed:.1f}s  (run folder {run_dir})")
    return summary
