"""ROUGE with `rouge_score` (stemming on), against one or several human summaries per example.

`evaluate.load("rouge")` needs the hub, so we call `rouge_score` directly. With several human summaries
per example (DialogSum's test split has three) each metric takes the best-matching one, as
`RougeScorer.score_multi` does. ROUGE-Lsum treats newlines as sentence boundaries; summaries rarely contain
newlines, so we put one after each sentence (a regex splitter: nltk's punkt data is not available offline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


@dataclass(frozen=True)
class RougeResult:
    per_example: list[dict[str, float]]  # F-measure of each ROUGE type, per example
    mean: dict[str, float]  # average over examples
    num_examples: int


def rouge_per_example(predictions: Sequence[str], targets: Sequence[Sequence[str] | str]) -> list[dict[str, float]]:
    """ROUGE F-measures for each prediction against its target summary (or summaries)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} target sets")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = []
    for prediction, refs in zip(predictions, targets):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("an example has no target summary")
        scores = scorer.score_multi([split_sentences(r) for r in refs], split_sentences(prediction))
        rows.append({k: scores[k].fmeasure for k in ROUGE_TYPES})
    return rows


def compute_rouge(predictions: Sequence[str], targets: Sequence[Sequence[str] | str]) -> RougeResult:
    rows = rouge_per_example(predictions, targets)
    n = len(rows)
    mean = {k: (sum(r[k] for r in rows) / n if n else float("nan")) for k in ROUGE_TYPES}
    return RougeResult(per_example=rows, mean=mean, num_examples=n)

