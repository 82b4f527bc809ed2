"""train/generation.py: the inverse-CDF sampler draws from the distribution transformers' sampling draws from
(temperature, top-k, top-p applied as transformers applies them), and generate() takes the token it draws."""

from __future__ import annotations

import math

import pytest
import torch

from train.config import GenerationSettings
from train.generation import InverseCdfSampler, generation_kwargs

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]])  # the last token can never be drawn
DRAWS = 40_000


def frequencies(sampler: InverseCdfSampler) -> torch.Tensor:
    torch.manual_seed(0)
    scores = sampler(torch.zeros(DRAWS, 1, dtype=torch.long), LOGITS.expand(DRAWS, -1).clone())
    assert torch.all(torch.isfinite(scores).sum(dim=1) == 1)  # exactly one selectable token per row
    return torch.bincount(scores.argmax(dim=1), minlength=LOGITS.shape[1]).double() / DRAWS


def expected(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=-1)[0]


@pytest.mark.parametrize("top_k, top_p, temperature, reference", [
    (0, 1.0, 1.0, LOGITS),
    (0, 1.0, 0.5, LOGITS / 0.5),
    (2, 1.0, 1.0, torch.tensor([[2.0, 1.0] + [float("-inf")] * 4])),
    # top-p 0.8 keeps the smallest set of most likely tokens whose mass reaches 0.8: 0.55 + 0.20 + 0.12 = 0.87
    (0, 0.8, 1.0, torch.tensor([[2.0, 1.0, 0.5] + [float("-inf")] * 3])),
])
def test_draws_follow_the_warped_softmax(top_k, top_p, temperature, reference):
    got = frequencies(InverseCdfSampler(top_k, top_p, temperature))
    want = expected(reference)
    sigma = torch.sqrt(want * (1 - want) / DRAWS)
    assert torch.all((got - want).abs() <= 5 * sigma + 1e-12), (got, want)
    assert got[-1] == 0 and torch.all(got[want == 0] == 0)  # never a token of zero probability
    chi2 = float((((got - want) ** 2) / want.clamp_min(1e-12))[want > 0].sum() * DRAWS)
    assert chi2 < 30.0  # 5 degrees of freedom at most: p < 1e-5 beyond this


def test_generate_takes_the_drawn_token_and_respects_min_length(tiny_artifacts):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_artifacts.t5))
    model = T5ForConditionalGeneration.from_pretrained(str(tiny_artifacts.t5)).eval()
    assert len(tokenizer) == model.config.vocab_size == 1811
    enc = tokenizer(["#Person1#: hello there. #Person2#: hi."] * 8, return_tensors="pt")
    settings = GenerationSettings(max_new_tokens=10, min_length=6)
    kwargs = generation_kwargs(settings)
    assert kwargs["do_sample"] is False and isinstance(kwargs["logits_processor"][0], InverseCdfSampler)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        with torch.no_grad():
            runs.append(model.generate(**enc, **generation_kwargs(settings)))
    assert torch.equal(runs[0], runs[1])  # seeded
    assert len({tuple(row.tolist()) for row in runs[0]}) > 1  # sampled: rows differ although the prompts are equal
    eos = tokenizer.eos_token_id
    assert all(eos not in row[1:6].tolist() for row in runs[0])  # min_length 6 counts the start token
    # The slower multinomial path and beams stay transformers' own.
    assert generation_kwargs(GenerationSettings(sampler="multinomial"))["do_sample"] is True
    assert generation_kwargs(GenerationSettings(num_beams=2))["do_sample"] is True
    assert "logits_processor" not in generation_kwargs(GenerationSettings(do_sample=False))
    assert math.isclose(generation_kwargs(GenerationSettings(sampler="multinomial"))["top_p"], 1.0)


def test_rare_tokens_keep_their_chance_and_broken_rows_are_refused(monkeypatch):
    sampler = InverseCdfSampler(0, 1.0, 1.0)
    # Token 1 holds 1e-9 of the mass after 0.6 of it: in a float32 CDF 0.6 and 0.6 + 1e-9 are one number and it could
    # never be drawn; u just inside its interval must draw it.
    probs = torch.tensor([[0.6, 1e-9, 0.4 - 1e-9]], dtype=torch.float64)
    logits = probs.log().float()
    mass = torch.softmax(logits.float(), dim=-1).double().cumsum(dim=-1)
    u = (mass[0, 0] + (mass[0, 1] - mass[0, 0]) / 2) / mass[0, -1]
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, float(u), dtype=kw.get("dtype")))
    assert sampler(torch.zeros(1, 1, dtype=torch.long), logits.clone()).argmax().item() == 1
    monkeypatch.undo()
    for broken in ([[1.0, float("nan"), 0.0]], [[float("-inf")] * 3]):
        with pytest.raises(RuntimeError, match="NaN or no mass"):
            sampler(torch.zeros(1, 1, dtype=torch.long), torch.tensor(broken))


@pytest.mark.usefixtures("one_torch_thread")
def test_decode_compiled_returns_what_generate_returns(tiny_artifacts, compiled_decoding):
    """rollout.compile's own decoding loop against transformers' generate() with the same static cache and compiled
    step: the same ids, shape included (both stop once every row has ended), from the same random numbers, for
    greedy decoding, our sampler with min_length and sampled lengths, and transformers' multinomial sampling with
    top-k, top-p and temperature; from the prompts or from their encoder output."""
    import random

    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from train.generation import attention_window, compiled_decoding_kwargs, decode_compiled, generation_config_extras

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_artifacts.t5))
    model = T5ForConditionalGeneration.from_pretrained(str(tiny_artifacts.t5)).eval()
    assert len(tokenizer) == model.config.vocab_size == 1811
    assert generation_config_extras(model) == []
    texts = [f"#Person1#: hello number {i}. " + "#Person2#: hi, how are you? " * (i % 3) for i in range(6)]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def both(settings, seed, hidden=None):
        torch.manual_seed(seed)
        with torch.no_grad():
            expected = model.generate(**enc, **special, **generation_kwargs(settings, random.Random(seed)),
                                      **compiled_decoding_kwargs(settings.max_new_tokens))
        torch.manual_seed(seed)
        got = decode_compiled(model, enc.input_ids, enc.attention_mask, settings, **special,
                              encoder_hidden_states=hidden, rng=random.Random(seed))
        return expected, got

    # Past 64 tokens a step reads a wider window of the self-attention cache (here all of its 81 slots): the
    # untouched model never ends a summary, so all 80 tokens are decoded.
    assert [attention_window(n, 81) for n in (1, 64, 65, 80)] == [64, 64, 81, 81]
    for settings in (GenerationSettings(do_sample=False, max_new_tokens=80),
                     GenerationSettings(max_new_tokens=80, min_length=3)):
        expected, got = both(settings, 0)
        assert got.shape == (6, 81) and torch.equal(got, expected)
    with torch.no_grad():  # an eos about as likely as a frequent token: rows end at different steps, calls stop early
        model.lm_head.weight[tokenizer.eos_token_id] = 3 * model.lm_head.weight[751]
    with torch.no_grad():
        hidden = model.get_encoder()(**enc).last_hidden_state
    cases = [GenerationSettings(do_sample=False, max_new_tokens=24),
             GenerationSettings(max_new_tokens=24, max_new_tokens_min=4, min_length=6),
             GenerationSettings(sampler="multinomial", top_k=20, top_p=0.9, temperature=0.7, max_new_tokens=24,
                                min_length=3)]
    padded_after_eos = stopped_early = False
    for settings in cases:
        for seed in range(3):
            expected, got = both(settings, seed, hidden if seed else None)
            assert torch.equal(got, expected), (settings, seed)
            eos_at = [row[1:].tolist().index(tokenizer.eos_token_id) + 1 for row in got
                      if tokenizer.eos_token_id in row[1:].tolist()]
            assert all(position >= settings.min_length - 1 for position in eos_at)
            padded_after_eos |= any(position < got.shape[1] - 1 for position in eos_at)
            stopped_early |= settings.max_new_tokens_min is None and got.shape[1] < 1 + settings.max_new_tokens
    assert padded_after_eos and stopped_early  # both ways of ending were compared


def test_generation_config_extras_name_what_only_generate_applies():
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    from train.generation import generation_config_extras

    class Model:
        generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, max_length=200)

    assert generation_config_extras(Model()) == []
    # A model built from a config (bench/ppo_vs_trl.py --model-size, train.models.build_from_architecture).
    Model.generation_config = T5ForConditionalGeneration(T5Config(d_model=8, d_ff=8, d_kv=4, num_layers=1, num_heads=2,
                                                                  vocab_size=16)).generation_config
    assert "use_cache" in Model.generation_config.to_diff_dict() and generation_config_extras(Model()) == []
    Model.generation_config = GenerationConfig(decoder_start_token_id=0, repetition_penalty=1.2, suppress_tokens=[5])
    assert generation_config_extras(Model()) == ["repetition_penalty", "suppress_tokens"]


def test_decode_compiled_refuses_mismatched_states_and_a_model_without_a_start_token(tiny_artifacts):
    from transformers import T5ForConditionalGeneration

    from train.generation import decode_compiled

    model = T5ForConditionalGeneration.from_pretrained(str(tiny_artifacts.t5)).eval()
    ids, mask = torch.tensor([[5, 6, 7, 1]]), torch.ones(1, 4, dtype=torch.long)
    settings = GenerationSettings(do_sample=False, max_new_tokens=4)
    with pytest.raises(ValueError, match="encoder output for 6 prompt positions, attention mask for 4"):
        decode_compiled(model, ids, mask, settings, 0, 1, encoder_hidden_states=torch.zeros(1, 6, model.config.d_model))
    model.generation_config.decoder_start_token_id = model.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match="neither decoder_start_token_id nor bos_token_id"):
        decode_compiled(model, ids, mask, settings, 0, 1)
