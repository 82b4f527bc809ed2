"""Batched generation for seq2seq models: many prompts per `generate()` call, never one at a time."""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from train.config import GenerationSettings


class InverseCdfSampler:
    """A logits processor that draws the next token itself, from the same distribution as transformers' sampling
    (temperature, then top-k, then top-p, as it applies them), and leaves only that token selectable, so that
    `generate(do_sample=False)` takes it.

    transformers samples with `torch.multinomial`, which on a CPU draws one exponential variate per vocabulary entry,
    row and step: a quarter of a small model's decoding time. The inverse of the cumulative distribution needs one
    uniform variate per row and step. Same distribution, other random stream: a seed gives other samples than
    transformers' sampling would. (generate's `output_scores` then holds this processor's 0/-inf mask.)
    """

    def __init__(self, top_k: int, top_p: float, temperature: float) -> None:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        # float64: past half the mass float32 steps are 6e-8, which would zero (or double) the chance of rare tokens.
        cdf = probs.double().cumsum(dim=-1)
        total = cdf[:, -1:]
        # As torch.multinomial does, refuse rows that are no distribution (NaN logits, every token filtered out),
        # without waiting for the device.
        torch._assert_async(torch.isfinite(total).all() & (total > 0).all(),
                            "the next-token probabilities contain NaN or no mass at all: the model's logits are broken")
        # u in [0, total): the first index whose cumulative mass exceeds u; a zero-probability token is never taken.
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * total
        tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
        tokens = torch.where(probs.gather(1, tokens) > 0, tokens, probs.argmax(dim=-1, keepdim=True))
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def generation_kwargs(settings: GenerationSettings, rng: Optional[random.Random] = None) -> dict:
    """`generate()` keyword arguments from settings. Sampling knobs are passed only when sampling, so greedy
    decoding is not mixed with top_k/top_p (transformers warns about that)."""
    max_new_tokens = settings.max_new_tokens
    if settings.max_new_tokens_min is not None:  # the original notebook's LengthSampler(min, max)
        max_new_tokens = (rng or random).randrange(settings.max_new_tokens_min, settings.max_new_tokens)
    kwargs = dict(max_new_tokens=max_new_tokens, min_length=settings.min_length, num_beams=settings.num_beams)
    if settings.do_sample and settings.sampler == "inverse_cdf" and settings.num_beams == 1:
        from transformers import LogitsProcessorList

        sampler = InverseCdfSampler(settings.top_k, settings.top_p, settings.temperature)
        kwargs.update(do_sample=False, logits_processor=LogitsProcessorList([sampler]))
    elif settings.do_sample:
        kwargs.update(do_sample=True, top_k=settings.top_k, top_p=settings.top_p, temperature=settings.temperature)
    else:
        kwargs.update(do_sample=False)
    return kwargs


def compiled_decoding_kwargs(max_new_tokens: int) -> dict:
    """`generate()` keyword arguments for a static KV cache and a compiled decoder step. The self-attention cache is
    sized for the longest allowed summary (the start token plus `max_new_tokens`), so that calls with any sampled
    length have the same shapes and reuse one compiled graph."""
    from transformers import CompileConfig

    # No CUDA graphs (transformers' default mode): generate() builds a new static cache per call, whose new addresses
    # would make them re-record on every call, each recording kept for the rest of the run.
    config = CompileConfig(dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told; asked for is asked for
    return dict(cache_implementation="static", max_cache_len=max_new_tokens + 1, compile_config=config)


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
