"""Batched generation for seq2seq models: many prompts per `generate()` call, never one at a time."""

from __future__ import annotations

import functools
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
        tokens = self.draw(input_ids, scores)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)

    def draw(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The next token (B, 1) of each row, for next-token scores (B, V)."""
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
        return torch.where(probs.gather(1, tokens) > 0, tokens, probs.argmax(dim=-1, keepdim=True))


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


def decoding_compile_config():
    """transformers' `CompileConfig` for the compiled decoder step (rollout.compile)."""
    from transformers import CompileConfig

    # No CUDA graphs (transformers' default mode): each call builds a new static cache, whose new addresses would make
    # them re-record on every call, each recording kept for the rest of the run.
    config = CompileConfig(dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told; asked for is asked for
    return config


def compiled_decoding_kwargs(max_new_tokens: int) -> dict:
    """`generate()` keyword arguments for a static KV cache and a compiled decoder step. The self-attention cache is
    sized for the longest allowed summary (the start token plus `max_new_tokens`), so that calls with any sampled
    length have the same shapes and reuse one compiled graph."""
    return dict(cache_implementation="static", max_cache_len=max_new_tokens + 1,
                compile_config=decoding_compile_config())


# generation_config entries that change nothing `decode_compiled` does differently from generate(): special tokens,
# the settings `generation_kwargs` passes (which override the model's; top_k/top_p/temperature only when sampling with
# multinomial, and generate() ignores them otherwise), and what generate() returns besides the tokens or whether it
# caches (a model built from a config copies use_cache and output_* into its own).
_PLAIN_GENERATION_CONFIG = {
    "decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
    "_from_model_config", "max_length", "max_new_tokens", "min_length", "num_beams", "do_sample", "top_k", "top_p",
    "temperature", "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate",
}


def generation_config_extras(model) -> list[str]:
    """The entries of `model`'s generation_config that would make generate() do more than `decode_compiled` does
    (a repetition penalty, suppressed tokens, ...): empty for FLAN-T5's."""
    return sorted(set(model.generation_config.to_diff_dict()) - _PLAIN_GENERATION_CONFIG)


def attention_window(length: int, cache_len: int) -> int:
    """The self-attention cache slots a decoding step reads when `length` tokens are in it: the next power of two
    (64 at least), at most the whole cache. Reading every slot of a cache sized for 400 tokens made self-attention
    most of a small model's step; a few windows keep the compiled graphs few (one per window)."""
    return min(cache_len, max(64, 1 << (length - 1).bit_length()))


@functools.lru_cache(maxsize=None)  # one class: compiled graphs guard on the cache layers' type
def _windowed_static_layer():
    from transformers.cache_utils import StaticLayer

    class WindowedStaticLayer(StaticLayer):
        """A static cache layer whose attention reads only its first `window` slots (the rest hold no token yet).
        For one-token decoding steps only: the mask it asks for is one query row over `window` keys."""

        window: int

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return keys[:, :, : self.window], values[:, :, : self.window]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.window, 0

    return WindowedStaticLayer


@torch.no_grad()
def decode_compiled(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    pad_token_id: int,
    eos_token_id: int,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    rng: Optional[random.Random] = None,
) -> torch.Tensor:
    """What `model.generate(input_ids, attention_mask, **generation_kwargs(settings, rng),
    **compiled_decoding_kwargs(settings.max_new_tokens))` returns (B, 1 + steps), token for token and from the same
    random numbers (on CPU and CUDA; on Apple's MPS generate() draws for one step more), but decoded by a loop of our
    own around transformers' compiled model call.

    generate() spends, per decoding step, about as long in its own Python (inputs and masks rebuilt, signature
    inspection, the logits-processor list) as a small model spends computing; here a step is the compiled call, the
    min-length rule and the token draw, and self-attention reads only the cache slots of an `attention_window` rather
    than all of a cache sized for the longest summary (same results: the slots past it are masked out, adding exact
    zeros; tested in float32 on a CPU). `model`: a transformers seq2seq LM or a wrapper with `get_base_model()` (peft,
    `Seq2SeqPolicy`); its generation_config must have no `generation_config_extras`. `encoder_hidden_states` (B, Q, d):
    the encoder's output for the prompts, if computed already. Sampling with top-k/top-p/temperature as
    `generation_kwargs` asks for it: `InverseCdfSampler`, transformers' warpers and multinomial draw, or greedy.
    """
    from transformers.cache_utils import EncoderDecoderCache, StaticCache
    from transformers.modeling_outputs import BaseModelOutput

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if settings.num_beams != 1:
        raise ValueError("decode_compiled samples or decodes greedily: beam search is generate()'s")
    kwargs = generation_kwargs(settings, rng)  # draws the sampled length as generate_responses' generate() would
    max_new_tokens, min_length = kwargs["max_new_tokens"], kwargs["min_length"]
    processors = kwargs.get("logits_processor")
    sampler = processors[0] if processors else None
    warpers = None
    if kwargs["do_sample"]:  # transformers' own sampling: its warpers, in the order generate() applies them
        warpers = InverseCdfSampler(settings.top_k, settings.top_p, settings.temperature).warpers

    batch = input_ids.shape[0]
    device = input_ids.device
    if encoder_hidden_states is None:
        encoder_hidden_states = lm.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden_states)
    decoder_config = lm.config.get_text_config(decoder=True)
    # The self-attention cache sized for the longest allowed summary, as compiled_decoding_kwargs sizes generate()'s:
    # every call, whatever its sampled length, reuses the same few compiled graphs (one per `attention_window`).
    cache_len = settings.max_new_tokens + 1
    self_cache = StaticCache(config=decoder_config, max_cache_len=cache_len)
    layer_class = _windowed_static_layer()
    self_cache.layers = [layer_class(max_cache_len=cache_len) for _ in self_cache.layers]
    if encoder_hidden_states.shape[1] != attention_mask.shape[1]:
        raise ValueError(f"encoder output for {encoder_hidden_states.shape[1]} prompt positions, attention mask for "
                         f"{attention_mask.shape[1]}: pass the states of exactly these prompts")
    cache = EncoderDecoderCache(self_cache, StaticCache(config=decoder_config,
                                                        max_cache_len=encoder_hidden_states.shape[1]))
    start = lm.generation_config.decoder_start_token_id  # as generate(): else the bos token
    if start is None:
        start = lm.generation_config.bos_token_id
    if start is None:
        raise ValueError("the model's generation_config has neither decoder_start_token_id nor bos_token_id: set "
                         "one (FLAN-T5's is 0)")
    ids = torch.full((batch, max_new_tokens + 1), pad_token_id, dtype=torch.long, device=device)
    ids[:, 0] = start
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    # The first step fills the cross-attention cache from the prompts: uncompiled, as generate() runs it.
    forward, compiled = lm, lm.get_compiled_call(decoding_compile_config())
    tokens = ids[:, :1].clone()
    # A graph per attention window and batch size (a smaller last batch), each compiled the first time a rollout
    # reaches that window: 8 for 400 new tokens, dynamo's default limit, past which it would fall back to eager.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        for length in range(1, max_new_tokens + 1):  # `length` tokens decoded so far, the start token included
            window = attention_window(length, cache_len)
            for layer in self_cache.layers:
                layer.window = window
            out = forward(decoder_input_ids=tokens, encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                          cache=cache, use_cache=True, return_dict=True)
            forward = compiled
            scores = out.logits[:, -1].to(copy=True, dtype=torch.float32)
            del out
            if length < min_length:  # transformers' MinLengthLogitsProcessor
                scores[:, eos_token_id] = float("-inf")
            if sampler is not None:
                tokens = sampler.draw(ids[:, :length], scores)
            elif warpers is not None:  # transformers' sampling
                tokens = torch.multinomial(torch.softmax(warpers(ids[:, :length], scores), dim=-1), num_samples=1)
            else:
                tokens = scores.argmax(dim=-1, keepdim=True)
            # A finished row gets padding, as in generate().
            tokens = torch.where(unfinished[:, None], tokens, pad_token_id)
            ids[:, length] = tokens[:, 0]
            unfinished &= tokens[:, 0] != eos_token_id
            if not unfinished.any():
                return ids[:, : length + 1]
    return ids


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
