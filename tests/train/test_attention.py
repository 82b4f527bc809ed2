"""train/attention.py: T5's position-bias mask built once per stack and forward pass gives transformers' own SDPA
results bit for bit (forward, cached decoding, gradients, bf16), and the loaders switch models to it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from train import attention
from train.attention import NAME, stack_mask, use_shared_mask_attention

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


def test_a_static_cache_prefill_equals_the_stock_attention(one_torch_thread):
    """A decoder prefix of several tokens into an (uncompiled) static cache: transformers crops the keys to the
    queries before it builds the causal mask; left to it."""
    stock, shared = _both()
    ids, mask, _, _ = _batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([[PAD, 5, 9]] * 3),
                  max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static",
                  disable_compile=True, output_scores=True, return_dict_in_generate=True)
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


@pytest.mark.parametrize("padded", [True, False])
def test_each_stack_builds_its_mask_once_per_forward_pass(padded, monkeypatch, one_torch_thread):
    """Three layers, three attentions (encoder self, decoder self, cross): three masks per forward pass, not nine;
    per row for a padded batch, shared by the rows without padding (where transformers passes no boolean mask)."""
    stock, shared = _both()
    ids, mask, decoder, decoder_mask = _batch()
    if not padded:
        mask, decoder_mask = torch.ones_like(mask), torch.ones_like(decoder_mask)
    built = []

    def counting(position_bias, attention_mask, is_causal, query, key):
        cache_size = len(position_bias.__dict__.get("_shared_masks", []))
        result = stack_mask(position_bias, attention_mask, is_causal, query, key)
        if len(position_bias.__dict__.get("_shared_masks", [])) > cache_size:
            built.append(tuple(result.shape))
        return result

    monkeypatch.setattr(attention, "stack_mask", counting)
    with torch.no_grad():
        outputs = [m(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder,
                     decoder_attention_mask=decoder_mask).logits for m in (stock, shared)]
    # Without padding the cross-attention's (zero) bias is its own mask: nothing to build or cache.
    expected = [(3, 4, 11, 11), (3, 4, 7, 7), (3, 4, 7, 11)] if padded else [(1, 4, 11, 11), (1, 4, 7, 7)]
    assert sorted(built) == sorted(expected)
    assert torch.equal(outputs[0], outputs[1])


def test_masks_die_with_their_forward_pass_without_the_garbage_collector(one_torch_thread):
    """No reference cycle (a bias caching itself as its own mask): reference counting alone frees every cached mask,
    padded batch or not, forward pass or generate()."""
    import gc

    _, shared = _both()
    ids, mask, decoder, decoder_mask = _batch()
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            for ones in (False, True):
                m, d = (torch.ones_like(mask), torch.ones_like(decoder_mask)) if ones else (mask, decoder_mask)
                shared(input_ids=ids, attention_mask=m, decoder_input_ids=decoder, decoder_attention_mask=d)
                shared.generate(input_ids=ids, attention_mask=m, max_new_tokens=4, do_sample=False)
        alive = [o for o in gc.get_objects() if type(o) is torch.Tensor and "_shared_masks" in o.__dict__]
    finally:
        gc.enable()
    assert alive == []


def _query_key(dtype: torch.dtype = torch.float32):
    return torch.zeros(2, 2, 3, 4, dtype=dtype), torch.zeros(2, 2, 5, 4, dtype=dtype)


def test_the_mask_is_cached_per_boolean_mask_and_causality():
    """One bias with two masks, or with none (causal or not), gives one mask each; the same pair gives the same
    tensor back; contiguous, which SDPA would otherwise copy it into."""
    bias = torch.randn(3, 5, 2).permute(2, 0, 1).unsqueeze(0)  # (1, H, Q, K) as T5's compute_bias returns it
    first, second = torch.tensor([True, True, False, True, True]), torch.tensor([True, False, False, True, False])
    first, second = (m.view(1, 1, 1, 5).expand(2, 1, 3, 5) for m in (first, second))
    q, k = _query_key()
    a, b = stack_mask(bias, first, False, q, k), stack_mask(bias, second, False, q, k)
    plain, causal = stack_mask(bias, None, False, q, k), stack_mask(bias, None, True, q, k)
    assert stack_mask(bias, first, False, q, k) is a and stack_mask(bias, None, True, q, k) is causal
    minimum = torch.finfo(torch.float32).min
    assert torch.equal(a, torch.where(first, bias, minimum)) and torch.equal(b, torch.where(second, bias, minimum))
    assert torch.equal(plain, bias)
    assert torch.equal(causal, torch.where(torch.ones(3, 5, dtype=torch.bool).tril(), bias, minimum))
    assert a.is_contiguous() and a.shape == (2, 2, 3, 5) and plain.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_mask_is_the_stock_one_in_every_dtype(dtype):
    """Large negative and positive biases next to masked positions: finfo.min exactly where masked, the bias where
    not (an addition would overflow float16 or round finfo.min up next to a large bias)."""
    bias = torch.tensor([-40.0, -16.5, 0.0, 3.0, 1e4]).to(dtype).view(1, 1, 1, 5).expand(1, 2, 3, 5)
    mask = torch.tensor([[True, False, True, False, False], [False, True, False, True, True]]).view(2, 1, 1, 5)
    combined = stack_mask(bias, mask.expand(2, 1, 3, 5), False, *_query_key(dtype))
    assert torch.equal(combined, torch.where(mask, bias, torch.finfo(dtype).min))


@pytest.mark.parametrize("reentrant", [False, True])
def test_training_with_gradient_checkpointing_leaves_no_mask_alive(reentrant, one_torch_thread):
    """Under gradient checkpointing in training T5's zero cross-attention bias, and a reentrant checkpoint's inputs,
    are leaves that require grad: a mask cached on them would form a cycle gc cannot free, one per step and layer."""
    import gc

    model = use_shared_mask_attention(_t5())
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".q.weight"))  # a frozen base with trainable parts, as LoRA's
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    ids, mask, decoder, decoder_mask = _batch()

    def cached_masks() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and "_shared_masks" in o.__dict__)

    before = cached_masks()
    for _ in range(2):
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, decoder_attention_mask=decoder_mask)
        out.logits.logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)
        del out
        assert cached_masks() == before


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
