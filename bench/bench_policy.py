"""The policy a benchmark times: the configured tiny one, or flan-t5-base-sized random weights (bench scripts import
this from their own folder)."""

from __future__ import annotations


def load_bench_policy(cfg, model_size: str, device):
    """(policy, tokenizer): `load_policy(cfg)` for "tiny"; for "base" the shipped flan-t5-base architecture with
    random weights in `cfg.model.dtype`, a fresh `cfg.lora` adapter and a value head, with the tokenizer of
    `cfg.model` (the tiny one: its ids are valid flan-t5 ids)."""
    from train.models import Seq2SeqPolicy, ValueHead, apply_lora, build_from_architecture, load_policy, load_tokenizer
    from train.models import torch_dtype

    if model_size == "tiny":
        policy, tokenizer = load_policy(cfg)
        return policy.to(device), tokenizer
    base = build_from_architecture("google/flan-t5-base", device=device).to(torch_dtype(cfg.model.dtype))
    policy = Seq2SeqPolicy(apply_lora(base, cfg.lora), ValueHead(base.config.d_model).to(device))
    return policy, load_tokenizer(cfg.model)
