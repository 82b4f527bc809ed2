"""train/attention.py: T5's position-bias mask built once per stack and forward pass gives transformers' own SDPA
results bit for bit (forward, cached decoding, gradients, bf16), and the loaders switch models to it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from train import attention
from train.attention import NAME, combined_mask, use_shared_mask_attention

VOCAB, PAD, EOS = 64, 0, 1


def _t5(layers: int = 3, dtype: torch.dtype = torch.float32):
    """A small random T5 on transformers' stock "sdpa" attention (several layers: they share the mask)."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    model = AutoModelForSeq2SeqLM.from_config(config).to(dtype)
    with torch.no_grad():  # T5 initialises the relative bias small; make it matter
        for module in model.modules():
            if getattr(module, "has_relative_attention_bias", False):
                module.relative_attention_bias.weight.normal_(0, 3)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vocab_size == VOCAB
    return model


def _batch():
    """Right-padded prompts of three lengths (one row all but one token padding) and padded decoder inputs."""
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    ids[mask == 0] = PAD
    decoder = torch.randint(2, VOCAB, (3, 7))
    decoder[:, 0] = PAD
    decoder_mask = torch.ones_like(decoder)
    decoder_mask[0, 4:] = 0
    return ids, mask, decoder, decoder_mask


def _both(dtype: torch.dtype = torch.float32):
    stock = _t5(dtype=dtype)
    shared = use_shared_mask_attention(copy.deepcopy(stock))
    assert shared.config._attn_implementation == NAME
    return stock, shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_encoder_output_equal_the_stock_attention_bit_for_bit(dtype, one_torch_thread):
    stock, shared = _both(dtype)
    ids, mask, decoder, decoder_mask = _batch()
    with torch.no_grad():
        outputs = [m(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder,
                     decoder_attention_mask=decoder_mask) for m in (stock, shared)]
    assert torch.equal(outputs[0].encoder_last_hidden_state, outputs[1].encoder_last_hidden_state)
    assert torch.equal(outputs[0].logits, outputs[1].logits)
    assert outputs[0].logits.abs().sum() > 0


def test_cached_decoding_equals_the_stock_attention(one_torch_thread):
    stock, shared = _both()
    ids, mask, _, _ = _batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain, ours = (m.generate(**kwargs) for m in (stock, shared))
    assert torch.equal(plain.sequences, ours.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, ours.scores))


def test_gradients_equal_the_stock_attention(one_torch_thread):
    stock, shared = _both()
    ids, mask, decoder, decoder_mask = _batch()
    grads = []
    for model in (stock, shared):
        model.train()
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder,
                       decoder_attention_mask=decoder_mask).logits
        logits.log_softmax(-1)[..., 3].sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    # The relative bias's gradient sums the layers' contributions in another order (LoRA training freezes it).
    biases = [name for name in grads[0] if "relative_attention_bias" in name]
    assert len(biases) == 2
    for name in biases:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
        assert grads[1][name].abs().sum() > 0.1  # the shared mask carries the bias's gradient from every layer
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0] if name not in biases)


def test_each_stack_builds_its_mask_once_per_forward_pass(monkeypatch, one_torch_thread):
    """Three layers, three attentions (encoder self, decoder self, cross): three masks per forward pass, not nine."""
    _, shared = _both()
    ids, mask, decoder, decoder_mask = _batch()
    built = []

    def counting_combined(position_bias, attention_mask, dtype):
        cache_size = len(position_bias.__dict__.get("_shared_masks", []))
        result = combined_mask(position_bias, attention_mask, dtype)
        if len(position_bias.__dict__["_shared_masks"]) > cache_size:
            built.append(tuple(result.shape))
        return result

    monkeypatch.setattr(attention, "combined_mask", counting_combined)
    with torch.no_grad():
        shared(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, decoder_attention_mask=decoder_mask)
    assert sorted(built) == sorted([(3, 4, 11, 11), (3, 4, 7, 7), (3, 4, 7, 11)])


def test_combined_mask_is_keyed_by_both_tensors():
    """One bias with two different masks gives two masks; the same pair gives the same tensor back; contiguous,
    which SDPA would otherwise copy it into."""
    bias = torch.randn(3, 3, 2).permute(2, 0, 1).unsqueeze(0)  # (1, H, Q, K) as T5's compute_bias returns it
    first, second = torch.tensor([True, True, False]), torch.tensor([True, False, False])
    first, second = (m.view(1, 1, 1, 3).expand(2, 1, 3, 3) for m in (first, second))
    a, b = combined_mask(bias, first, torch.float32), combined_mask(bias, second, torch.float32)
    assert combined_mask(bias, first, torch.float32) is a
    minimum = torch.finfo(torch.float32).min
    assert torch.equal(a, torch.where(first, bias, minimum)) and torch.equal(b, torch.where(second, bias, minimum))
    assert a.is_contiguous() and a.shape == (2, 2, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combined_mask_is_the_stock_where_in_every_dtype(dtype):
    """Large negative and positive biases next to masked positions: finfo.min exactly where masked (float16's sum
    would overflow to -inf below a bias of -16), the bias where not."""
    bias = torch.tensor([-40.0, -16.5, 0.0, 3.0, 1e4]).to(dtype).view(1, 1, 1, 5).expand(1, 2, 5, 5)
    mask = torch.tensor([[True, False, True, False, False], [False, True, False, True, True]]).view(2, 1, 1, 5)
    mask = mask.expand(2, 1, 5, 5)
    combined = combined_mask(bias, mask, dtype)
    assert torch.equal(combined, torch.where(mask, bias, torch.finfo(dtype).min))
    assert torch.isfinite(combined).all()


def test_the_loaders_switch_t5_to_it_and_saved_configs_do_not_name_it(tiny_artifacts, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from train.config import ModelConfig
    from train.models import build_from_architecture, load_base_model

    loaded = load_base_model(ModelConfig(name_or_path=str(tiny_artifacts.t5)))
    built = build_from_architecture("google/flan-t5-small", device="meta")
    assert loaded.config._attn_implementation == NAME and built.config._attn_implementation == NAME
    loaded.save_pretrained(tmp_path)
    assert not [key for key in json.loads((tmp_path / "config.json").read_text()) if "attn" in key]
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_a_model_on_another_attention_is_left_alone():
    model = _t5(layers=1)
    model.set_attn_implementation("eager")
    assert use_shared_mask_attention(model).config._attn_implementation == "eager"
