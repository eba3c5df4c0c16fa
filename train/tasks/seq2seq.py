"""``task: seq2seq``: source -> target on an encoder-decoder model (T5).

The BBC article -> headline task as a seq2seq job: the source is an optional instruction
(``data.source_prefix``, e.g. ``"summarize: "`` for FLAN-T5) plus the article truncated to
``data.max_article_tokens`` and the end token; the target is the headline and the end token.
Training is teacher forcing: the decoder reads ``decoder_start_token_id`` then the target
shifted right, and the loss is the cross-entropy of every target token (padding excluded).
Evaluation generates from the source with the model's cache (:class:`train.tasks.headlines.Generation`) and scores ROUGE.

A ``Seq2SeqBatch`` names the source ``tokens_BxT`` / ``attention_mask_BxT`` as a causal
batch names its input, so placement, token counts and the training loop take either.

Example:
    >>> batch = seq2seq_batch([data.Encoded([5, 6, 1], [7, 1])], pad_id=0, decoder_start_id=0,
    ...                       bucket_size=4, max_len=8, max_answer=3)
    >>> batch.tokens_BxT.tolist(), batch.decoder_tokens_BxT.tolist(), batch.targets_BxT.tolist()
    ([[5, 6, 1, 0]], [[0, 7, 0]], [[7, 1, 0]])
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jpeft import losses
from jpeft.models.capabilities import EncoderDecoder, offers
from train import data
from train.errors import ConfigError
from train.tasks.headlines import Generation, check_tokenizer


class Seq2SeqFormat:
    """Articles as seq2seq sources and headline targets (the interface of :class:`train.data.PromptFormat`)."""

    def __init__(self, tokenizer, *, max_article_tokens: int, max_headline_tokens: int, source_prefix: str = ""):
        self.tokenizer = tokenizer
        self.max_article_tokens = max_article_tokens
        self.max_headline_tokens = max_headline_tokens
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConfigError("the tokenizer has no end token (eos_token) to end the source and the headline with; "
                              "use the model's own tokenizer (its tokenizer files in model.hf_folder)")
        self._prefix_ids = self._ids(source_prefix) if source_prefix else []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def max_prompt_len(self) -> int:
        """Longest source."""
        return len(self._prefix_ids) + self.max_article_tokens + 1

    @property
    def max_len(self) -> int:
        """Longest source + target (for the run's summary line)."""
        return self.max_prompt_len + self.max_headline_tokens + 1

    def prompts(self, articles: Sequence[data.Article]) -> list[list[int]]:
        """The sources: prefix + truncated article + end token."""
        cut = [a.body[: 12 * self.max_article_tokens] for a in articles]
        ids = self.tokenizer(cut, add_special_tokens=False)["input_ids"] if cut else []
        return [self._prefix_ids + i[: self.max_article_tokens] + [self.eos_id] for i in ids]

    def answer(self, article: data.Article) -> list[int]:
        return self._ids(article.headline)[: self.max_headline_tokens] + [self.eos_id]

    def encode(self, articles: Sequence[data.Article]) -> list[data.Encoded]:
        return [data.Encoded(p, self.answer(a)) for p, a in zip(self.prompts(articles), articles)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class Seq2SeqBatch(NamedTuple):
    """A teacher-forcing batch: right-padded sources, decoder inputs (target shifted right) and targets."""

    tokens_BxT: np.ndarray          # source ids
    attention_mask_BxT: np.ndarray  # 1 on real source tokens
    decoder_tokens_BxT: np.ndarray  # decoder_start_id, then the target shifted right
    targets_BxT: np.ndarray
    loss_mask_BxT: np.ndarray       # 1 on real target tokens


def seq2seq_batch(examples: Sequence[data.Encoded], *, pad_id: int, decoder_start_id: int, bucket_size: int,
                  max_len: int, max_answer: int) -> Seq2SeqBatch:
    """Sources padded to a bucket length (at most ``max_len``), targets to ``max_answer`` (cut to it)."""
    s = data.bucket_length(max(len(e.prompt) for e in examples), bucket_size=bucket_size, max_len=max_len)
    b = len(examples)
    source = np.full((b, s), pad_id, np.int32)
    source_mask = np.zeros((b, s), np.int32)
    decoder = np.full((b, max_answer), pad_id, np.int32)
    targets = np.full((b, max_answer), pad_id, np.int32)
    loss_mask = np.zeros((b, max_answer), np.float32)
    for i, e in enumerate(examples):
        src, tgt = e.prompt[:s], e.answer[:max_answer]
        source[i, :len(src)], source_mask[i, :len(src)] = src, 1
        targets[i, :len(tgt)], loss_mask[i, :len(tgt)] = tgt, 1.0
        decoder[i, :len(tgt)] = [decoder_start_id, *tgt[:-1]]
    return Seq2SeqBatch(source, source_mask, decoder, targets, loss_mask)


def target_xent(params: Any, model: Any, batch: Seq2SeqBatch):
    """``(sum of target-token cross-entropies, number of target tokens)`` with teacher forcing."""
    logits_BxTxV, _ = model.forward(params, batch.tokens_BxT, attention_mask_BxT=batch.attention_mask_BxT,
                                    decoder_tokens_BxT=batch.decoder_tokens_BxT,
                                    decoder_mask_BxT=batch.loss_mask_BxT > 0)
    b, t, v = logits_BxTxV.shape
    losses_BxT = losses.token_xent(logits_BxTxV.reshape(b * t, v), batch.targets_BxT.reshape(-1)).reshape(b, t)
    return jnp.sum(losses_BxT * batch.loss_mask_BxT), jnp.sum(batch.loss_mask_BxT)


def seq2seq(*, run, loaded) -> Generation:
    """An encoder-decoder (T5) reads the article (after ``data.source_prefix``) and writes the headline.

    Raises:
        ConfigError: the model is not an encoder-decoder, or the tokenizer does not fit its vocabulary.

    Example (the refusal, before any data is read):
        >>> from types import SimpleNamespace
        >>> from jpeft.models import llama
        >>> m = llama.model(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
        ...                                   num_heads=2))
        >>> seq2seq(run=None, loaded=SimpleNamespace(model=m, tokenizer=None))
        Traceback (most recent call last):
        ...
        train.errors.ConfigError: task: seq2seq needs an encoder-decoder model (T5), but the model is a 'llama' decoder; use task: headlines, or point model.hf_folder at a T5 folder
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    if not offers(model, EncoderDecoder):
        raise ConfigError(f"task: seq2seq needs an encoder-decoder model (T5), but the model is a {model.name!r} "
                          "decoder; use task: headlines, or point model.hf_folder at a T5 folder")
    check_tokenizer(tokenizer, model)
    dc = run.data
    fmt = Seq2SeqFormat(tokenizer, max_article_tokens=dc.max_article_tokens,
                        max_headline_tokens=dc.max_headline_tokens, source_prefix=dc.source_prefix)
    return Generation(run, loaded, fmt, loss_sums=target_xent, make_batch=seq2seq_batch,
                      decoder_start_id=getattr(model.config, "decoder_start_token_id", 0),
                      max_len=fmt.max_prompt_len)
