"""Headline generation and ROUGE scoring on held-out articles.

Generation is greedy with the KV cache (:func:`jpeft.models.generation.generate`),
batched over left-padded prompts of a few bucket lengths. Scores are
``rouge_score`` F-measures with stemming, averaged and reported in percent.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from rouge_score import rouge_scorer

from jpeft.models import generation
from train import data

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def generate_headlines(
    params: Any,
    model: Any,
    fmt: data.PromptFormat,
    articles: Sequence[data.Article],
    *,
    batch_size: int,
    max_new_tokens: int,
    bucket_size: int,
    pad_id: int,
) -> list[str]:
    """Greedy headlines for ``articles`` (batches padded to ``batch_size`` rows)."""
    prompts = fmt.prompts(articles)
    headlines = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        # Pad the last batch with copies so every call has the same shape.
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        batch = data.prompt_batch(padded, pad_id=pad_id, bucket_size=bucket_size, max_len=fmt.max_prompt_len)
        new_BxN = generation.generate(
            model,
            params,
            batch.prompt_BxT,
            batch.prompt_mask_BxT,
            max_new_tokens=max_new_tokens,
            eos_id=fmt.eos_id,
            pad_id=pad_id,
        )
        new_BxN = np.asarray(new_BxN)
        headlines.extend(fmt.decode(row) for row in new_BxN[: len(chunk)])
    return headlines


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure in percent (stemming on)."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = {t: 0.0 for t in ROUGE_TYPES}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    n = max(len(references), 1)
    return {t: 100.0 * v / n for t, v in totals.items()}


def rouge_table(rows: Sequence[dict]) -> str:
    """A text table; each row has model, trainable, percent and the ROUGE keys."""
    header = f"{'model':<22}{'trainable':>14}{'% params':>10}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<22}{r['trainable']:>14,}{r['percent']:>10.3f}"
            f"{r['rouge1']:>9.2f}{r['rouge2']:>9.2f}{r['rougeL']:>9.2f}"
        )
    return "\n".join(lines)
