"""train/merge_adapter.py: the merged model computes what the base model with the SFT adapter computes."""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from train.config import load_config
from train.merge_adapter import merge_adapter
from train.models import apply_lora, load_base_model


def test_merged_model_matches_base_plus_adapter(tiny_artifacts, repo_root, trained, tmp_path):
    cfg = load_config(repo_root / "configs/tiny.yaml", ["--model.name_or_path", str(tiny_artifacts.t5)])
    adapter = str(trained / "sft/adapter")
    out = merge_adapter(cfg, adapter, tmp_path / "merged")

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(str(tiny_artifacts.t5)))
    batch = tokenizer(["#Person1#: Hello, how are you?\n#Person2#: Fine, thanks."], return_tensors="pt")
    decoder_input_ids = torch.tensor([[0, 5, 9, 17]])
    merged = AutoModelForSeq2SeqLM.from_pretrained(str(out), use_safetensors=True).eval()
    with_adapter = apply_lora(load_base_model(cfg.model), cfg.lora, adapter=adapter, trainable=False).eval()
    with torch.no_grad():
        merged_logits = merged(**batch, decoder_input_ids=decoder_input_ids).logits
        adapter_logits = with_adapter(**batch, decoder_input_ids=decoder_input_ids).logits
        with with_adapter.disable_adapter():
            base_logits = with_adapter(**batch, decoder_input_ids=decoder_input_ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter matters, so the match below is not vacuous
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())
