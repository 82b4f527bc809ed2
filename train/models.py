"""Model factory: the seq2seq policy (base + LoRA + value head) and model-size reports."""

from __future__ import annotations

import torch
from torch import nn


def untie_lm_head(model: nn.Module) -> nn.Module:
    """Give a T5 built from a config its own LM head, as FLAN-T5 checkpoints have.

    transformers 5.x forces `tie_word_embeddings=True` for every T5Config, so a model built from a config
    shares `lm_head.weight` with the embeddings and has 32128 x d_model fewer parameters than the real
    checkpoint. (Loading a real checkpoint is fine: both tensors are present and differ, so they stay untied.)
    """
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
    return model
