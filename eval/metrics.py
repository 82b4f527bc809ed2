"""Evaluation metrics. ROUGE lives in `train.rouge` (SFT validation uses it too; train never imports eval)."""

from train.rouge import ROUGE_TYPES, RougeResult, compute_rouge, format_rouge_table, rouge_per_example, split_sentences

__all__ = ["ROUGE_TYPES", "RougeResult", "compute_rouge", "format_rouge_table", "rouge_per_example", "split_sentences"]
