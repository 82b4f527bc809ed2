"""T5 attention with its additive mask built once per forward pass instead of once per layer.

transformers' SDPA path for T5 turns the relative position bias (1, H, Q, K) and the boolean padding/causal mask
(B, 1, Q, K) into one float mask (B, H, Q, K) inside every attention layer (`torch.where`, then a copy, because
the bias is a permuted view). Every layer of a stack receives the same two tensor objects, so here the first layer
builds the combined mask and the others reuse it: one (B, H, Q, K) tensor per stack and forward pass instead of one
per layer (12 per pass for flan-t5-base, 24 for flan-t5-xxl), and autograd saves that one tensor for the backward
instead of one per layer. Outputs are bit-for-bit the stock ones: position_bias + 0 is position_bias, and
finfo.min + bias rounds to finfo.min, as `torch.where` writes it (in float32 and bfloat16 for any bias smaller than
2^100 in magnitude; float16, whose finfo.min is near its overflow, is clamped back to finfo.min). Only
a trainable relative bias (not LoRA's case: the base is frozen) gets its gradient summed over the layers in another
order, equal up to float rounding.

`use_shared_mask_attention(model)` switches a loaded model to it; anything other than (position bias + boolean
mask), and compiled code (where inductor fuses the stock mask anyway), goes to transformers' own SDPA function.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "sdpa_shared_mask"


def combined_mask(position_bias: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive (B, H, Q, K) mask of `position_bias` (1 or B, H, Q, K) where `attention_mask` (B, 1, Q, K),
    boolean, is True, and finfo(dtype).min elsewhere; cached on `position_bias` for the other layers that pass
    the same two tensors. The cache lives and dies with the bias tensor (the stack's forward pass)."""
    cache = position_bias.__dict__.setdefault("_shared_masks", [])
    for mask, combined in cache:
        if mask is attention_mask:
            return combined
    padding = torch.zeros(attention_mask.shape, dtype=position_bias.dtype, device=position_bias.device)
    padding.masked_fill_(~attention_mask, torch.finfo(dtype).min)
    # A contiguous bias makes the sum contiguous, which SDPA's kernels would otherwise copy it into.
    combined = position_bias.contiguous() + padding
    if dtype == torch.float16:
        # float16's finfo.min is only 32 ulps from infinity: a bias below -16 would overflow it to -inf.
        combined.clamp_(min=torch.finfo(dtype).min)
    cache.append((attention_mask, combined))
    return combined


def shared_mask_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, position_bias=None, **kwargs):
    """transformers' SDPA attention function, with the position-bias mask from `combined_mask`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (position_bias is None or attention_mask is None or attention_mask.dtype != torch.bool
            or torch.compiler.is_compiling()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=position_bias,
                                      **kwargs)
    mask = combined_mask(position_bias, attention_mask, key.dtype)
    return sdpa_attention_forward(module, query, key, value, mask, position_bias=None, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, shared_mask_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks as "sdpa"


def use_shared_mask_attention(model: nn.Module) -> nn.Module:
    """Switch `model` (a transformers model) from "sdpa" attention to `shared_mask_sdpa`; a model on any other
    attention implementation (eager, flash, a user's choice) is left as it is. Returns `model`."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return model
    _register()
    model.set_attn_implementation(NAME)
    return model
