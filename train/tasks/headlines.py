"""``task: headlines``: a decoder writes the BBC News headline after the article; ROUGE on the test split.

The prompt is the article (cut to ``data.max_article_tokens``) and the answer its headline;
the loss is the cross-entropy of the answer tokens only (:func:`answer_xent`). Evaluation
generates greedily with the KV cache and scores ROUGE (:mod:`train.evaluate`); the base
model is scored too when ``eval.base_model`` is on. :mod:`train.tasks.seq2seq` is the same
job for an encoder-decoder.

    python -m train --config configs/smollm2_bbc_lora.yaml
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import losses
from jpeft.methods.base import Method
from jpeft.models.capabilities import CausalLM, EncoderDecoder, offers
from train import data, evaluate
from train.errors import ConfigError


def answer_xent(params, model, batch: data.TrainBatch, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``(sum of answer-token cross-entropies, number of answer tokens)``.

    Only the hidden states at answer positions are projected onto the
    vocabulary: ``B x A`` rows instead of ``B x T``; ``chunk`` of them at a time when
    given (:func:`jpeft.losses.xent_sums`: no ``rows x vocabulary`` logits kept for the backward pass).
    """
    hidden_BxTxD, _ = model.forward(params, batch.tokens_BxT, attention_mask_BxT=batch.attention_mask_BxT,
                                    return_hidden=True)
    valid_BxA = batch.answer_positions_BxA >= 0
    positions_BxA = jnp.maximum(batch.answer_positions_BxA, 0)
    hidden_BxAxD = jnp.take_along_axis(hidden_BxTxD, positions_BxA[:, :, None], axis=1)
    targets_BxA = jnp.take_along_axis(batch.targets_BxT, positions_BxA, axis=1)
    hidden_NxD = hidden_BxAxD.reshape(-1, hidden_BxAxD.shape[-1])
    return losses.xent_sums(lambda h_NxD: model.head(params, h_NxD), hidden_NxD, targets_BxA.reshape(-1),
                            valid_BxA.reshape(-1), chunk=chunk)


def check_tokenizer(tokenizer, model) -> None:
    """A :class:`ConfigError` when the tokenizer makes ids the model's vocabulary does not have."""
    vocab = getattr(model.config, "vocab_size", None)
    if hasattr(tokenizer, "__len__") and vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab} rows: "
                          "ids past the table would be read as garbage. Use the model's own tokenizer (put its "
                          "tokenizer files in model.hf_folder)")


class Generation:
    """A text-generation task over the BBC News split: fixed batches, ROUGE of generated headlines.

    ``fmt`` turns articles into prompts and answers, ``make_batch`` examples into training
    batches, ``loss_sums`` is the loss; :func:`headlines` and :func:`train.tasks.seq2seq.seq2seq`
    build it for a decoder and an encoder-decoder.
    """

    metrics = "rouge"
    scores_base = True

    def __init__(self, run, loaded, fmt, *, loss_sums, make_batch=data.train_batch, **shape: Any):
        dc, bs = run.data, run.train.batch_size
        _, self.split = data.configured_split(dc)
        self.run, self.loaded, self.fmt, self.loss_sums = run, loaded, fmt, loss_sums
        tokenizer = loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.eos_id
        train_articles = self.split.train[: dc.max_train_articles]
        if len(train_articles) < bs:
            raise ConfigError(f"train.batch_size={bs} is larger than the {len(train_articles)} training articles "
                              "(data.max_train_articles and the split decide them); lower train.batch_size")
        if len(self.split.val) < bs:
            raise ConfigError(f"the validation split has {len(self.split.val)} articles, fewer than one batch of "
                              f"train.batch_size={bs}: there would be no validation loss. Raise data.val_fraction "
                              "or lower train.batch_size")
        self.train = fmt.encode(train_articles)
        val = fmt.encode(self.split.val[: run.train.val_batches * bs])
        self.shape = dict(pad_id=self.pad_id, bucket_size=dc.bucket_size, max_answer=dc.max_headline_tokens + 1,
                          **shape)
        self.make_batch = make_batch
        self.val_batches = [make_batch(val[i:i + bs], **self.shape) for i in range(0, len(val) - bs + 1, bs)]
        self.test = self.split.test[: run.eval.test_articles]

    def describe(self) -> str:
        return (f"data: {len(self.split.train)} train / {len(self.split.val)} val / {len(self.split.test)} test "
                f"articles; training on {len(self.train)}, ROUGE on {len(self.test)}; max sequence "
                f"{self.fmt.max_len} tokens")

    def with_method(self, method: Method) -> Method:
        return method

    def batches_from(self, start: int):
        return data.train_batches(self.train, batch_size=self.run.train.batch_size, seed=self.run.train.seed,
                                  start=start, make=self.make_batch, **self.shape)

    def label(self, method: Method, adapter: Any) -> str:
        quant = self.run.model.quantize
        return method.describe() + (f" ({quant} base)" if quant else "")

    def evaluate(self, label: str, params, run_dir: str, *, trainable: int, percent: float) -> dict | None:
        """Generate headlines for the test articles and ROUGE them; predictions go to a JSONL file."""
        if not self.test:  # eval.test_articles=0: no ROUGE
            return None
        t = time.perf_counter()
        ev = self.run.eval
        predictions = evaluate.generate_headlines(
            params, self.loaded.model, self.fmt, self.test, batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens, bucket_size=self.run.data.bucket_size, pad_id=self.pad_id)
        references = [a.headline for a in self.test]
        scores = evaluate.rouge(predictions, references)
        name = "base" if label == "base" else "tuned"
        with open(os.path.join(run_dir, f"predictions_{name}.jsonl"), "w", encoding="utf-8") as f:
            for a, p in zip(self.test, predictions):
                f.write(json.dumps({"key": a.key, "reference": a.headline, "prediction": p}) + "\n")
        seconds = time.perf_counter() - t
        print(f"{label}: ROUGE-1 {scores['rouge1']:.2f}  ({len(predictions)} articles, {seconds:.1f}s)"
              f"  e.g. {predictions[0]!r} for {references[0]!r}")
        return {"model": label, "trainable": trainable, "percent": percent, **scores, "seconds": seconds}

    def metadata(self) -> dict:
        return {}

    def summary(self, rows: list[dict]) -> dict:
        return {"rouge": rows}

    def table(self, rows: list[dict]) -> str:
        return evaluate.rouge_table(rows)


def headlines(*, run, loaded) -> Generation:
    """A decoder with a language-model head writes the headline after the article (no settings of its own).

    Raises:
        ConfigError: the model is an encoder (no language-model head) or an encoder-decoder,
            or the tokenizer does not fit its vocabulary.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    if offers(model, EncoderDecoder):
        raise ConfigError(f"the model is a {model.name!r} encoder-decoder, which reads a source and writes a target: "
                          "set task: seq2seq (task: headlines is for decoder-only models)")
    if not offers(model, CausalLM):
        raise ConfigError(f"task: headlines generates text, but the {model.name!r} model is an encoder without a "
                          "language-model head; use task: classify with it, or a decoder (model.source: smollm2)")
    check_tokenizer(tokenizer, model)
    dc = run.data
    fmt = data.PromptFormat(tokenizer, max_article_tokens=dc.max_article_tokens,
                            max_headline_tokens=dc.max_headline_tokens)
    chunk = run.train.loss_chunk
    sums = answer_xent if chunk is None else functools.partial(answer_xent, chunk=chunk)
    return Generation(run, loaded, fmt, loss_sums=sums, max_len=fmt.max_len - 1)
