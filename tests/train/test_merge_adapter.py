"""train/merge_adapter.py: the merged model computes what the base model with the SFT adapter computes; the adapter
is the config key model.adapter."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from train.config import load_config
from train.errors import ConfigError
from train.merge_adapter import main
from train.models import apply_lora, load_base_model


def test_merged_model_matches_base_plus_adapter(tiny_artifacts, repo_root, trained, tmp_path):
    adapter = str(trained / "sft/adapter")
    overrides = ["--model.name_or_path", str(tiny_artifacts.t5), "--model.adapter", adapter]
    cfg = load_config(repo_root / "configs/tiny.yaml", overrides)
    out = main(["--config", str(repo_root / "configs/tiny.yaml"), *overrides, "--out", str(tmp_path / "merged")])

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


def test_the_adapter_is_the_config_key_model_adapter(repo_root, tmp_path):
    recipe = ["--config", str(repo_root / "configs/tiny.yaml"), "--out", str(tmp_path / "merged")]
    with pytest.raises(ConfigError, match=r"^model.adapter is null: set --model.adapter DIR"):
        main(recipe)
    with pytest.raises(ConfigError, match=r"^--adapter was replaced: use --model.adapter$"):
        main([*recipe, "--adapter", str(tmp_path / "adapter")])
    assert not (tmp_path / "merged").exists()
