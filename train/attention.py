"""T5 attention with its additive mask built once per forward pass of a stack instead of once per layer.

transformers' SDPA path for T5 combines the relative position bias (1, H, Q, K) with the boolean padding/causal
mask (B, 1, Q, K) into one float mask (B, H, Q, K) inside every attention layer (`create_position_bias_mask`:
`torch.where`, then a copy, the bias being a permuted view). Every layer of a stack receives the same two tensor
objects, so here the first layer builds that mask, with transformers' own function, and the others reuse it: one
mask per stack and attention kind (encoder, decoder self, cross) and forward pass instead of one per layer (12 per
pass for flan-t5-base, 24 for flan-t5-xxl), and autograd keeps that one for the backward instead of one per layer.
Outputs and gradients are transformers' own, bit for bit, except that a trainable relative bias (not LoRA's case:
the base is frozen) gets its gradient summed over the layers in another order, equal up to float rounding.

`use_shared_mask_attention(model)` switches a loaded model to it. Compiled code (where inductor fuses the stock mask
anyway), a float mask and a static cache's prefill (whose keys transformers crops first) go to transformers' own
SDPA function unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

NAME = "sdpa_shared_mask"


def stack_mask(position_bias: torch.Tensor, attention_mask: Optional[torch.Tensor], is_causal: bool,
               query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """transformers' additive SDPA mask for `position_bias` (1 or B, H, Q, K) and the boolean `attention_mask`
    (B, 1, Q, K; None: no padding, then causal or not), cached on `position_bias` for the other layers that pass the
    same tensors; the cache lives and dies with the bias tensor (one forward pass of the stack)."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    def build() -> torch.Tensor:
        # A contiguous bias makes the result contiguous at once, instead of a permuted result copied afterwards.
        return create_position_bias_mask(position_bias.contiguous(), attention_mask, is_causal, query, key)

    if position_bias.requires_grad and position_bias.grad_fn is None:
        # A leaf that requires grad (T5's zero cross-attention bias in training under gradient checkpointing, a
        # reentrant checkpoint's detached input): the mask's autograd graph would hold the bias that holds the mask,
        # a cycle through C++ that Python's gc cannot free.
        return build()
    cache = position_bias.__dict__.get("_shared_masks", [])
    for mask, causal, combined in cache:
        if mask is attention_mask and causal == is_causal:
            return combined
    combined = build()
    if combined is not position_bias:  # no mask to add (a contiguous bias is its own mask): caching it is a cycle
        position_bias.__dict__["_shared_masks"] = [*cache, (attention_mask, is_causal, combined)]
    return combined


def shared_mask_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], position_bias: Optional[torch.Tensor] = None, **kwargs):
    """transformers' SDPA attention function, with the position-bias mask from `stack_mask`."""
    from transformers.integrations import sdpa_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def stock():
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=position_bias,
                                      **kwargs)

    if (position_bias is None or torch.compiler.is_compiling() or sdpa_attention._is_torch_npu_available
            or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return stock()  # (transformers turns float masks into boolean ones on Ascend NPUs: no bias in there)
    is_causal = False
    if attention_mask is None:  # as sdpa_attention_forward decides it
        is_causal = kwargs.get("is_causal")
        is_causal = bool(query.shape[2] > 1 and (getattr(module, "is_causal", True) if is_causal is None
                                                 else is_causal))
        if is_causal and key.shape[2] > query.shape[2]:
            return stock()  # a static cache's prefill: transformers crops the keys to the queries first
    mask = stack_mask(position_bias, attention_mask, is_causal, query, key)
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
