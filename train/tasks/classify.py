"""The classification job (``task: classify``): BBC News category from the article, with an encoder.

The same corpus and the same seeded split as the headline job (:mod:`train.data`); the
input is the headline and the article (the tokenizer's ``[CLS] ... [SEP]``, cut to
``data.max_article_tokens``), the label one of the five categories (sorted by name).
The model must have a classification head (``model.classify``, an encoder such as BERT);
a base model without one gets a fresh head of five classes. The head is trained whole
next to the method (``classify.modules_to_save``, PEFT's ``modules_to_save``) unless the
method trains it itself (full fine-tuning). The section's keys are :func:`classify`'s arguments. Accuracy and macro-F1 on the test split go
to ``summary.json``.

    python -m train --config configs/minilm_bbc_lora.yaml
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import tree
from jpeft.methods.base import Method
from jpeft.methods.heads import with_modules_to_save
from jpeft.models import spec
from jpeft.models.capabilities import Classifier, offers
from train import data
from train.errors import ConfigError


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


class Classification:
    """Encoded articles, labels and fixed batches of one classification run (a :class:`train.tasks.base.Task`)."""

    metrics = "classification"
    scores_base = False

    def __init__(self, run, loaded, *, modules_to_save: str | None):
        dc, bs = run.data, run.train.batch_size
        articles, self.split = data.configured_split(dc)
        self.run, self.loaded, self.modules_to_save = run, loaded, modules_to_save
        self.categories = sorted({a.category for a in articles})
        tokenizer = loaded.tokenizer
        self.tokenizer, self.max_len, self.bucket = tokenizer, dc.max_article_tokens, dc.bucket_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.train_articles = self.split.train[: dc.max_train_articles]
        if len(self.train_articles) < bs or len(self.split.val) < bs:
            raise ConfigError(f"train.batch_size={bs} is larger than the {len(self.train_articles)} training or "
                              f"{len(self.split.val)} validation articles; lower train.batch_size")
        self.val_articles = self.split.val[: run.train.val_batches * bs]
        self.test, self.test_count = self.split.test[: run.eval.test_articles], run.eval.test_articles
        self.seed, self.batch_size = run.train.seed, bs
        self.train, self.val_batches = [], []

    def tokenize(self) -> "Classification":
        """Encode the training and validation articles (after the cheap checks have passed)."""
        self.train = self.encode(self.train_articles)
        self.val_batches = self.batches(self.encode(self.val_articles), self.batch_size, drop=True)
        return self

    def describe(self) -> str:
        return (f"data: {len(self.train)} train / {len(self.split.val)} val / {len(self.test)} test articles, "
                f"{len(self.categories)} classes; at most {self.max_len} tokens")

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

    def loss_sums(self, params, model_, batch: ClassifyBatch):
        return class_sums(params, model_, batch)

    def with_method(self, method: Method) -> Method:
        """The method plus the head trained whole (``modules_to_save``) unless the method already trains it.

        Raises:
            ValueError: the method cannot train modules besides its own adapter (see
                :func:`jpeft.methods.heads.with_modules_to_save`).
        """
        if self.modules_to_save is None:
            return method
        params = self.loaded.params
        adapter = jax.eval_shape(lambda p: method.init(jax.random.key(0), p), params)
        head = set(tree.flatten(tree.split(params, self.modules_to_save)[0]))
        if head <= set(tree.flatten(adapter)):  # full fine-tuning (of the head): nothing to add
            return method
        return with_modules_to_save(method, self.modules_to_save)

    def label(self, method: Method, adapter: Any) -> str:
        head = set(tree.flatten(tree.split(self.loaded.params, self.modules_to_save or "classifier/.*")[0]))
        return "frozen encoder + trained head" if set(tree.flatten(adapter)) <= head else method.describe()

    def predict(self, params, articles, batch_size: int) -> tuple[list[int], list[int]]:
        """``(labels, predicted labels)`` of ``articles``."""
        model_ = self.loaded.model
        examples = self.encode(articles)
        run = jax.jit(lambda p, b: jnp.argmax(model_.classify(
            p, model_.forward(p, b.tokens_BxT, attention_mask_BxT=b.attention_mask_BxT)[0], b.attention_mask_BxT),
            axis=-1))
        predictions = []
        for batch in self.batches(examples, batch_size):
            predictions.extend(int(x) for x in run(params, batch))
        return [label for _, label in examples], predictions

    def evaluate(self, label: str, params, run_dir: str, *, trainable: int, percent: float) -> dict:
        labels, predictions = self.predict(params, self.test, self.run.eval.batch_size)
        row = {"model": label, "trainable": trainable, "percent": percent,
               "accuracy": float(np.mean(np.array(labels) == np.array(predictions))),
               "macro_f1": macro_f1(labels, predictions, len(self.categories)), "test_articles": len(labels)}
        with open(os.path.join(run_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for article, p in zip(self.test, predictions):
                f.write(json.dumps({"key": article.key, "label": article.category,
                                    "prediction": self.categories[p]}) + "\n")
        return row

    def metadata(self) -> dict:
        return {"task": "classify", "labels": self.categories}

    def summary(self, rows: list[dict]) -> dict:
        return {"classification": rows[-1]}

    def table(self, rows: list[dict]) -> str:
        row = rows[-1]
        return (f"{row['model']}: accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f} "
                f"({row['test_articles']} test articles; {row['trainable']:,} trainable parameters)")


def check_split(task: "Classification") -> None:
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


def with_head(loaded, num_labels: int, classifier_input: str, origin: str, key: jax.Array):
    """``loaded`` with a classification head of ``num_labels`` classes: the model's own, checked, or a fresh one.

    ``origin``: where the model came from, for messages.

    Raises:
        ConfigError: the model has no classification head (a decoder-only language model), or
            its head (restored from the folder) has another number of classes than the task.
    """
    model_ = loaded.model
    if not offers(model_, Classifier):
        raise ConfigError(f"task: classify needs an encoder with a classification head, but the {model_.name!r} "
                          "model is a decoder-only language model; set model.source: minilm (or model.hf_folder: a "
                          "BERT folder, e.g. all-MiniLM-L6-v2), or use task: headlines with this model")
    settings = {"classifier_input": classifier_input}
    have = getattr(model_.config, "num_labels", 0)
    if have and have != num_labels:
        raise ConfigError(f"the model's classification head (restored from {origin}) has {have} classes, "
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


def check_inputs(tokenizer, model_, max_article_tokens: int) -> None:
    """A :class:`ConfigError` when the tokenizer makes ids the model's embedding table does not have, or the
    inputs are longer than the model's positions."""
    size, rows = len(tokenizer), getattr(model_.config, "vocab_size", None)
    if rows is not None and size > rows:
        raise ConfigError(f"the tokenizer has {size} tokens but the model's embedding table has {rows} rows (ids "
                          f"{rows}..{size - 1} have no embedding); use the tokenizer of the model's own folder")
    longest = model_.max_positions
    if longest is not None and max_article_tokens > longest:
        raise ConfigError(f"bad value for 'data.max_article_tokens': {max_article_tokens} is more than the "
                          f"model's {longest} positions; lower it to at most {longest}")


def classify(classifier_input: Literal["pooler", "cls", "mean"] = "pooler",
             modules_to_save: str | None = "classifier/.*", *, run, loaded) -> Classification:
    """BBC News category from the headline and article, with an encoder and its classification head.

    Args:
        classifier_input: what the head reads: the pooler's output, the ``[CLS]`` state, or the mean
            over the tokens.
        modules_to_save: a regex of the parameters trained whole besides the method (PEFT's
            ``modules_to_save``; the head); ``None``: only the method's adapter trains.
        run, loaded: the run config and the loaded model (filled by the runner).
    """
    origin = run.model.hf_folder or run.model.source
    task = Classification(run, loaded, modules_to_save=modules_to_save)
    check_split(task)
    task.loaded = with_head(loaded, len(task.categories), classifier_input, origin,
                            jax.random.key(run.train.seed + 1))
    check_inputs(task.loaded.tokenizer, task.loaded.model, run.data.max_article_tokens)
    return task.tokenize()
