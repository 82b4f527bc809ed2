"""Batched generation for seq2seq models: many prompts per `generate()` call, never one at a time."""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from train.config import GenerationSettings


def generation_kwargs(settings: GenerationSettings, rng: Optional[random.Random] = None) -> dict:
    """`generate()` keyword arguments from settings. Sampling knobs are passed only when sampling, so greedy
    decoding is not mixed with top_k/top_p (transformers warns about that)."""
    max_new_tokens = settings.max_new_tokens
    if settings.max_new_tokens_min is not None:  # the original notebook's LengthSampler(min, max)
        max_new_tokens = (rng or random).randrange(settings.max_new_tokens_min, settings.max_new_tokens)
    kwargs = dict(max_new_tokens=max_new_tokens, min_length=settings.min_length, num_beams=settings.num_beams)
    if settings.do_sample:
        kwargs.update(do_sample=True, top_k=settings.top_k, top_p=settings.top_p, temperature=settings.temperature)
    else:
        kwargs.update(do_sample=False)
    return kwargs


@torch.inference_mode()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    settings: GenerationSettings,
    max_prompt_tokens: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Summaries for `prompts`, in order, generated `settings.batch_size` at a time with attention masks."""
    outputs: list[str] = []
    batches = range(0, len(prompts), settings.batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        batch = list(prompts[start : start + settings.batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens).to(device)
        ids = model.generate(**enc, **generation_kwargs(settings))
        outputs.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
    return [o.strip() for o in outputs]
