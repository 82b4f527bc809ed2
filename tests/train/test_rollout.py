"""Experience making for PPO (train/rollout.py): prompt sharding and order, batched generation with padding after the
first eos, score checks, and the forward passes that make a trajectory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rewards.errors import RewardError
from rewards.scorer import RewardScores
from train.config import PPOConfig, load_config
from train.errors import ConfigError
from train.ppo_core import kl_penalized_rewards
from train.generation import decode_compiled
from train.rollout import PromptStream, generate_responses, score_responses
from helpers import generated_rollout, rollout_trajectory, tiny_ppo_policy


def test_prompt_stream_shards_disjointly_and_resumes_where_it_stopped():
    streams = [PromptStream(50, 8, seed=3, process_index=p, num_processes=2) for p in range(2)]
    seen = []
    for _ in range(6):  # 6 x 8 = 48 of 50 prompts: one epoch
        rows = [s.next_rows() for s in streams]
        assert len(rows[0]) == len(rows[1]) == 4 and not set(rows[0]) & set(rows[1])
        seen += rows[0] + rows[1]
    assert len(set(seen)) == 48  # no prompt repeats within an epoch
    state = streams[0].state_dict()
    after = [streams[0].next_rows() for _ in range(3)]  # crosses into epoch 1 (2 prompts left over)
    assert streams[0].epoch == 1
    resumed = PromptStream(50, 8, seed=3, process_index=0, num_processes=2)
    resumed.load_state_dict(state)
    assert [resumed.next_rows() for _ in range(3)] == after
    with pytest.raises(ConfigError, match="same data and seed"):
        PromptStream(50, 8, seed=4).load_state_dict(state)


class _ScriptedModel:
    """A stand-in for `generate`: returns fixed decoder ids for a batch, recording what it was given."""

    def __init__(self, outputs: list[torch.Tensor]):
        self.outputs, self.calls = list(outputs), []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids, attention_mask, kwargs))
        return self.outputs.pop(0)


class _Tok:
    pad_token_id, eos_token_id = 0, 1


def test_generate_responses_batches_with_masks_and_pads_after_first_eos():
    settings = load_config(None).rollout
    settings = dataclasses.replace(settings, batch_size=2, max_new_tokens=6, max_new_tokens_min=None)
    # Three prompts -> two generate() calls; pad (0) may be sampled mid-sequence and must then stay real.
    model = _ScriptedModel([
        torch.tensor([[0, 5, 1, 7, 8], [0, 6, 0, 9, 1]]),  # row 0: tokens after its eos become padding
        torch.tensor([[0, 4, 4, 4, 4, 4, 4]]),  # no eos: real to the end
    ])
    queries = [[11, 12, 13, 1], [21, 1], [31, 32, 1]]
    q_ids, q_mask, r_ids, r_mask = generate_responses(model, _Tok(), queries, settings, "cpu")

    assert len(model.calls) == 2 and model.calls[0][0].shape == (2, 4)
    assert model.calls[0][1].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # right-padded with an attention mask
    assert model.calls[0][2]["max_new_tokens"] == 6 and model.calls[0][2]["min_length"] == settings.min_length
    assert q_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert r_ids.tolist() == [[0, 5, 1, 0, 0, 0, 0], [0, 6, 0, 9, 1, 0, 0], [0, 4, 4, 4, 4, 4, 4]]
    assert r_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1] * 7]


def test_rollout_compile_leaves_a_generation_config_only_generate_applies_to_generate(monkeypatch, caplog):
    """A model whose generation_config asks for what our decoding loop does not do (a repetition penalty) decodes
    with transformers' generate() around the compiled step, with one warning per run that says so."""
    import logging

    from transformers import GenerationConfig

    from train import rollout

    class Penalized(_ScriptedModel):
        generation_config = GenerationConfig(decoder_start_token_id=0, repetition_penalty=1.3)

    monkeypatch.setattr(rollout, "_WARNED_EXTRAS", set())
    settings = dataclasses.replace(load_config(None).rollout, batch_size=1, max_new_tokens=6, max_new_tokens_min=None)
    model = Penalized([torch.tensor([[0, 5, 1]]), torch.tensor([[0, 4, 1]])])
    with caplog.at_level(logging.WARNING, logger="train.ppo"):
        for _ in range(2):
            generate_responses(model, _Tok(), [[11, 1]], settings, "cpu", compiled_width=4)
    assert [call[2]["cache_implementation"] for call in model.calls] == ["static", "static"]
    assert model.calls[0][0].shape == (1, 4)  # padded to the compiled width
    warnings = [r.getMessage() for r in caplog.records if "rollout.compile" in r.getMessage()]
    assert len(warnings) == 1 and "repetition_penalty" in warnings[0]


def test_score_responses_rejects_missing_or_non_finite_scores():
    def reward_fn(values):
        return lambda prompts, summaries: RewardScores(torch.tensor(values), torch.zeros(len(values)), torch.zeros(len(values), 2))

    ok = score_responses(reward_fn([1.0, -2.0]), ["p", "q"], ["a", "b"])
    assert ok.rewards.tolist() == [1.0, -2.0]
    with pytest.raises(RewardError, match="non-finite"):
        score_responses(reward_fn([1.0, float("nan")]), ["p", "q"], ["a", "b"])
    with pytest.raises(RewardError, match="1 scores for 2"):
        score_responses(reward_fn([1.0]), ["p", "q"], ["a", "b"])


@pytest.mark.usefixtures("one_torch_thread")
def test_forward_trajectory_default_mask_keeps_the_first_generated_token(tiny_artifacts):
    policy, tokenizer, cfg = tiny_ppo_policy(tiny_artifacts, batch_size=4, mini_batch_size=4)
    rollout = generated_rollout(policy, tokenizer, rows=4)
    ours = rollout_trajectory(policy, rollout, cfg, chunk_size=2)
    trl = rollout_trajectory(policy, rollout, PPOConfig(batch_size=4, mini_batch_size=4, trl_first_token_mask=True), 4)
    assert torch.equal(ours.masks[:, 0], torch.ones(4, dtype=ours.masks.dtype))
    assert torch.equal(trl.masks[:, 0], torch.zeros(4, dtype=trl.masks.dtype))
    torch.testing.assert_close(ours.masks[:, 1:], trl.masks[:, 1:])
    # Chunking does not change the forward pass results.
    torch.testing.assert_close(ours.logprobs, trl.logprobs, atol=1e-5, rtol=0)
    _, _, kls = kl_penalized_rewards(ours.scores, ours.logprobs, ours.ref_logprobs, ours.masks, 0.2)
    assert kls[:, 0].abs().max() > 0  # the first token now carries a KL penalty


# ----------------------------------------------------------------------------------------------------
# Generating with the adapter merged (ppo.merge_adapter_for_rollout)


def _snapshot(policy) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in policy.state_dict().items()}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_merged_adapter_restores_every_weight_bit_for_bit(tiny_artifacts, dtype):
    from peft.tuners.lora import LoraLayer

    from train.models import adapter_merged

    policy, _, _ = tiny_ppo_policy(tiny_artifacts)
    policy.to(dtype)
    before = _snapshot(policy)
    layers = [m for m in policy.peft_model.modules() if isinstance(m, LoraLayer)]
    with adapter_merged(policy.peft_model):
        assert all(layer.merged for layer in layers)
        changed = [n for n, t in policy.state_dict().items() if not torch.equal(t, before[n])]
        assert changed and all("base_layer.weight" in n for n in changed)  # the merge really changed the base
    assert not any(layer.merged for layer in layers)
    after = policy.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())
    # An error inside leaves the weights as they were too.
    with pytest.raises(RuntimeError, match="inside"):
        with adapter_merged(policy.peft_model):
            raise RuntimeError("inside")
    assert all(torch.equal(policy.state_dict()[n], t) for n, t in before.items())
    if dtype == torch.bfloat16:  # what the copies are for: peft's own merge + unmerge leaves the base changed
        for layer in layers:
            layer.merge()
            layer.unmerge()
        assert any(not torch.equal(policy.state_dict()[n], t) for n, t in before.items())


@pytest.mark.usefixtures("one_torch_thread")
def test_a_rollout_with_the_merged_adapter_equals_the_plain_one(tiny_artifacts):
    from train.models import adapter_merged
    from train.config import GenerationSettings

    policy, tokenizer, ppo = tiny_ppo_policy(tiny_artifacts)
    policy.eval()
    prompts = [tokenizer(f"#Person1#: hello number {i}. #Person2#: hi, how are you?").input_ids for i in range(6)]
    enc = tokenizer([f"#Person1#: hello number {i}." for i in range(6)], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain_logits = policy(enc.input_ids, enc.attention_mask, enc.input_ids[:, :5])[0]
        with adapter_merged(policy.peft_model):
            merged_logits = policy(enc.input_ids, enc.attention_mask, enc.input_ids[:, :5])[0]
    torch.testing.assert_close(merged_logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert (plain_logits - policy.reference_logits(enc.input_ids, enc.attention_mask, enc.input_ids[:, :5])).abs().max() > 1e-3

    for settings in (GenerationSettings(batch_size=4, do_sample=False, max_new_tokens=12),
                     GenerationSettings(batch_size=4, max_new_tokens=12, min_length=5)):
        torch.manual_seed(7)
        plain = generate_responses(policy, tokenizer, prompts, settings, "cpu")
        torch.manual_seed(7)
        with adapter_merged(policy.peft_model):
            merged = generate_responses(policy, tokenizer, prompts, settings, "cpu")
        for a, b in zip(plain, merged):
            assert torch.equal(a, b)
        rollout = dict(query_ids=plain[0], query_mask=plain[1], response_ids=plain[2], response_mask=plain[3],
                       scores=torch.zeros(6))
        trajectory = rollout_trajectory(policy, rollout, ppo)  # after the merge: the plain adapter again
        again = rollout_trajectory(policy, {**rollout, "response_ids": merged[2]}, ppo)
        torch.testing.assert_close(trajectory.logprobs, again.logprobs, atol=0, rtol=0)


def test_make_experience_merges_a_float32_base_by_default_and_never_a_quantized_one(tiny_artifacts, monkeypatch):
    import train.rollout as rollout

    calls = []

    class Stop(Exception):
        pass

    def fake_generate(model, *args, **kwargs):
        from peft.tuners.lora import LoraLayer

        calls.append(any(m.merged for m in model.peft_model.modules() if isinstance(m, LoraLayer)))
        raise Stop

    monkeypatch.setattr(rollout, "generate_responses", fake_generate)
    policy, tokenizer, _ = tiny_ppo_policy(tiny_artifacts)
    prompts = {"input_ids": [[5, 6, 1]], "query": ["q"], "id": ["x"]}
    for overrides, merged in (
        (["--model.dtype", "float32"], True),
        (["--model.dtype", "bfloat16"], False),  # "auto": the merged bf16 weights would sample another policy
        (["--model.dtype", "bfloat16", "--ppo.merge_adapter_for_rollout", "always"], True),
        (["--model.dtype", "float32", "--ppo.merge_adapter_for_rollout", "never"], False),
        (["--model.quantization", "4bit", "--ppo.merge_adapter_for_rollout", "always"], False),
    ):
        cfg = load_config(None, overrides)
        with pytest.raises(Stop):
            rollout.make_experience(policy, tokenizer, prompts, None, cfg)
        assert calls[-1] is merged, overrides


def test_a_head_tied_to_the_embeddings_keeps_its_adapter_path():
    """Merging a LoRA on an lm_head that shares its matrix with the embeddings would change the embeddings too."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    from train.models import adapter_merged

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, num_layers=1,
                                               d_ff=32, tie_word_embeddings=True, decoder_start_token_id=0))
    assert base.lm_head.weight is base.shared.weight
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q", "v", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.eval()
    ids = torch.randint(2, 64, (3, 7))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        plain = model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        with adapter_merged(model):
            merged = model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
            head = model.base_model.model.lm_head
            assert not head.merged and model.base_model.model.encoder.block[0].layer[0].SelfAttention.q.merged
    torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_encode_prompts_encodes_by_length_and_returns_each_prompt_in_its_row():
    """Prompts go to the encoder shortest first, half a generation batch per call, each call padded to its own
    longest prompt only; every row of the result is its own prompt's output, zeros past the call's width."""
    from train.rollout import encode_prompts

    calls = []

    def encode(ids, mask):  # a stand-in encoder whose output spells its input: (b, q, 2) = (id, mask)
        calls.append(mask.sum(dim=1).tolist())
        return torch.stack([ids.float(), mask.float()], dim=-1)

    lengths = [5, 2, 9, 3, 7, 4, 8]
    prompts = [[10 * i + j + 1 for j in range(n)] for i, n in enumerate(lengths)]
    states = encode_prompts(encode, prompts, 4, 0, "cpu")
    assert calls == [[2, 3], [4, 5], [7, 8], [9]]  # by length, 4 / 2 prompts per call
    assert states.shape == (7, 9, 2)
    for row, prompt in enumerate(prompts):
        assert states[row, : len(prompt), 0].tolist() == prompt and states[row, : len(prompt), 1].eq(1).all()
        call_width = next(max(c) for c in calls if len(prompt) in c)
        assert states[row, call_width:].eq(0).all() and states[row, len(prompt) : call_width, 1].eq(0).all()


@pytest.mark.usefixtures("one_torch_thread")
def test_the_encoded_prompts_give_the_plain_rollout_and_trajectory(tiny_artifacts):
    """make_experience encodes the prompts once: generate() and the policy's old log-probs and values reuse it."""
    from train.config import GenerationSettings
    from train.rollout import encode_prompts, forward_trajectory

    policy, tokenizer, ppo = tiny_ppo_policy(tiny_artifacts)
    policy.eval()
    # Prompts of different lengths, so generation batches and forward chunks are each padded to their own width.
    prompts = [tokenizer(f"#Person1#: hello number {i}. " + "#Person2#: hi, how are you? " * (i % 4)).input_ids
               for i in range(7)]
    encoded = encode_prompts(policy.encode, prompts, 3, tokenizer.pad_token_id, "cpu")
    assert encoded.shape == (7, max(len(p) for p in prompts), policy.config.d_model)
    for settings in (GenerationSettings(batch_size=3, do_sample=False, max_new_tokens=12),
                     GenerationSettings(batch_size=3, max_new_tokens=12, min_length=5)):
        torch.manual_seed(7)
        plain = generate_responses(policy, tokenizer, prompts, settings, "cpu")
        torch.manual_seed(7)
        reused = generate_responses(policy, tokenizer, prompts, settings, "cpu", encoder_hidden_states=encoded)
        for a, b in zip(plain, reused):
            assert torch.equal(a, b)
        rollout = dict(query_ids=plain[0], query_mask=plain[1], response_ids=plain[2], response_mask=plain[3],
                       scores=torch.zeros(7))
        expected = rollout_trajectory(policy, rollout, ppo, chunk_size=2)
        got = forward_trajectory(policy, **rollout, chunk_size=2, encoder_hidden_states=encoded)
        for key in ("logprobs", "ref_logprobs", "values", "masks"):
            torch.testing.assert_close(getattr(got, key), getattr(expected, key), atol=1e-5, rtol=1e-5)
    # The encoder output really is what the policy decodes from: another one gives other log-probs.
    other = forward_trajectory(policy, **rollout, chunk_size=2, encoder_hidden_states=encoded.roll(1, dims=0))
    assert (other.logprobs - expected.logprobs).abs().max() > 1e-3


@pytest.mark.usefixtures("one_torch_thread")
def test_k_samples_of_a_prompt_are_its_consecutive_rows(tiny_artifacts):
    """rollout.samples_per_prompt k: prompt i's samples are rows i k ... i k + k - 1, decoded from its own encoder
    output (greedy decoding makes every sample of a prompt its single greedy summary; sampling makes them differ)."""
    from train.config import GenerationSettings
    from train.rollout import encode_prompts, forward_trajectory

    policy, tokenizer, ppo = tiny_ppo_policy(tiny_artifacts)
    policy.eval()
    prompts = [tokenizer(f"#Person1#: hello number {i}. " + "#Person2#: hi, how are you? " * (i % 4)).input_ids
               for i in range(5)]
    encoded = encode_prompts(policy.encode, prompts, 2, tokenizer.pad_token_id, "cpu")
    greedy = GenerationSettings(batch_size=2, do_sample=False, max_new_tokens=12)
    single = generate_responses(policy, tokenizer, prompts, greedy, "cpu")
    query_ids, query_mask, response_ids, response_mask = generate_responses(
        policy, tokenizer, prompts, greedy, "cpu", encoder_hidden_states=encoded, samples_per_prompt=3)
    assert len(query_ids) == len(response_ids) == 15
    for i in range(5):
        for row in range(3 * i, 3 * i + 3):
            assert torch.equal(query_ids[row], single[0][i]) and torch.equal(query_mask[row], single[1][i])
            width = int(response_mask[row].sum())
            assert width == int(single[3][i].sum())
            assert torch.equal(response_ids[row, :width], single[2][i, :width])
    torch.manual_seed(3)
    sampled = generate_responses(policy, tokenizer, prompts, GenerationSettings(batch_size=2, max_new_tokens=12),
                                 "cpu", encoder_hidden_states=encoded, samples_per_prompt=3)
    assert any(not torch.equal(sampled[2][3 * i], sampled[2][3 * i + 1]) for i in range(5))

    # The forward passes on the 15 rows from the 5 prompts' encoder outputs (the policy's, and the adapter-off
    # reference's: each encoder once per prompt) equal the plain per-row passes; chunks of 4 rows cut across prompts.
    rollout = dict(zip(("query_ids", "query_mask", "response_ids", "response_mask"), sampled), scores=torch.zeros(15))
    expected = rollout_trajectory(policy, rollout, ppo, chunk_size=4)
    reference = encode_prompts(policy.reference_encode, prompts, 2, tokenizer.pad_token_id, "cpu")
    got = forward_trajectory(policy, **rollout, chunk_size=4, encoder_hidden_states=encoded,
                             reference_hidden_states=reference, samples_per_prompt=3)
    for key in ("logprobs", "ref_logprobs", "values", "masks"):
        torch.testing.assert_close(getattr(got, key), getattr(expected, key), atol=1e-5, rtol=1e-5)
    # The reference's own encoder output matters: the policy's in its place gives other reference log-probs.
    other = forward_trajectory(policy, **rollout, chunk_size=4, encoder_hidden_states=encoded,
                               reference_hidden_states=encoded, samples_per_prompt=3)
    assert (other.ref_logprobs - expected.ref_logprobs).abs().max() > 1e-3


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("reference", ["base", "initial_adapter"])
def test_make_experience_with_k_samples_gives_the_plain_passes_for_either_reference(tiny_artifacts, tmp_path,
                                                                                      reference):
    """k = 2 summaries per prompt: each encoder runs once per prompt (the adapter-off reference's too; a frozen
    reference adapter runs its own per row), and the trajectory equals the plain per-row forward passes."""
    from rewards.scorer import RewardScores
    from train.models import add_reference_adapter, save_policy
    from train.rollout import make_experience

    policy, tokenizer, _ = tiny_ppo_policy(tiny_artifacts)
    if reference == "initial_adapter":
        add_reference_adapter(policy, str(save_policy(policy, tmp_path / "start")))
        with torch.no_grad():  # the trained adapter moves away from the frozen starting copy
            for name, param in policy.peft_model.named_parameters():
                if "lora_B" in name and param.requires_grad:
                    param.add_(0.05)
    cfg = load_config(None, ["--model.dtype", "float32", "--rollout.samples_per_prompt", "2", "--rollout.batch_size",
                             "2", "--rollout.max_new_tokens", "8", "--ppo.forward_batch_size", "3"])
    texts = [f"#Person1#: hello number {i}. " + "#Person2#: hi, how are you? " * i for i in range(3)]
    prompts = {"input_ids": [tokenizer(t).input_ids for t in texts], "query": texts, "id": ["a", "b", "c"]}

    def reward_fn(queries, summaries):
        assert queries == [t for t in texts for _ in range(2)]  # each summary is scored with its own prompt
        n = len(summaries)
        return RewardScores(torch.arange(n, dtype=torch.float32), torch.zeros(n), torch.zeros(n, 2))

    torch.manual_seed(0)
    trajectory, info = make_experience(policy, tokenizer, prompts, reward_fn, cfg)
    assert info.prompt_ids == ["a", "a", "b", "b", "c", "c"] and len(trajectory) == 6
    assert torch.equal(trajectory.query_ids[0], trajectory.query_ids[1])
    rollout = {key: getattr(trajectory, key) for key in ("query_ids", "query_mask", "response_ids", "response_mask",
                                                         "scores")}
    expected = rollout_trajectory(policy, rollout, cfg.ppo, chunk_size=3)
    for key in ("logprobs", "ref_logprobs", "values", "masks"):
        torch.testing.assert_close(getattr(trajectory, key), getattr(expected, key), atol=1e-5, rtol=1e-5)
    assert (trajectory.logprobs - trajectory.ref_logprobs).abs().max() > 1e-3  # policy and reference differ


@pytest.mark.usefixtures("one_torch_thread")
def test_compiled_decoding_with_a_static_cache_gives_the_plain_rollout_and_compiles_once(tiny_artifacts,
                                                                                       compiled_decoding):
    """rollout.compile: a static KV cache sized for max_new_tokens, prompts padded to one width, a compiled decoder
    step. Same summaries (greedy, and sampled with the same seed and sampled lengths), same log-probs; one compiled
    graph serves every call whatever its prompt width or sampled length."""
    import random

    from train.config import GenerationSettings
    from train.rollout import encode_prompts, forward_trajectory

    policy, tokenizer, ppo = tiny_ppo_policy(tiny_artifacts)
    policy.eval()
    # The two batches of 4 have different widths: each would be another shape without the padding to `width`.
    prompts = [tokenizer(f"#Person1#: hello number {i}. " + "#Person2#: hi, how are you? " * (i // 2)).input_ids
               for i in range(8)]
    width = 48
    assert max(len(p) for p in prompts) < width
    encoded = encode_prompts(policy.encode, prompts, 4, tokenizer.pad_token_id, "cpu")
    compiled_graphs = []
    # One run's settings: a cache for max_new_tokens 16 from the first call on, whose sampled length (4 to 15) is
    # shorter than the greedy call's 16 after it.
    for settings in (GenerationSettings(batch_size=4, max_new_tokens=16, max_new_tokens_min=4, min_length=5),
                     GenerationSettings(batch_size=4, do_sample=False, max_new_tokens=16)):
        torch.manual_seed(7)
        plain = generate_responses(policy, tokenizer, prompts, settings, "cpu", random.Random(1), encoded)
        torch.manual_seed(7)
        fast = generate_responses(policy, tokenizer, prompts, settings, "cpu", random.Random(1), encoded,
                                  compiled_width=width)
        compiled_graphs.append(compiled_decoding["stats"]["unique_graphs"])
        for a, b in zip(plain, fast):
            assert torch.equal(a, b)
        rollout = dict(query_ids=plain[0], query_mask=plain[1], response_ids=plain[2], response_mask=plain[3],
                       scores=torch.zeros(8))
        expected = rollout_trajectory(policy, rollout, ppo, chunk_size=4)
        got = forward_trajectory(policy, **{**rollout, "response_ids": fast[2]}, chunk_size=4,
                                 encoder_hidden_states=encoded)
        torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=1e-5)
    # One graph for the four compiled calls: two prompt widths, a sampled length, then the longest.
    assert compiled_graphs == [1, 1], f"compiled graphs after each setting: {compiled_graphs} (one was expected)"


@pytest.mark.usefixtures("one_torch_thread")
def test_make_experience_with_rollout_compile_gives_the_plain_trajectory_step_after_step(tiny_artifacts,
                                                                                         compiled_decoding,
                                                                                         monkeypatch):
    """As in a run (float32: the adapter merged for each rollout): two rollouts with a trained adapter between
    them, sampled lengths, k = 2 and a smaller last batch: the same trajectory as without rollout.compile, so the
    compiled step reads each rollout's weights (none baked in); our decoding loop is the one that ran."""
    import random

    from rewards.scorer import RewardScores
    from train import rollout
    from train.rollout import make_experience

    own_loop_calls = []
    monkeypatch.setattr(rollout, "decode_compiled",
                        lambda *args, **kwargs: own_loop_calls.append(1) or decode_compiled(*args, **kwargs))

    policy, tokenizer, _ = tiny_ppo_policy(tiny_artifacts)
    texts = [f"#Person1#: hello number {i}. " + "#Person2#: hi, how are you? " * (i % 3) for i in range(3)]
    prompts = {"input_ids": [tokenizer(t).input_ids for t in texts], "query": texts, "id": ["a", "b", "c"]}

    def reward_fn(queries, summaries):
        n = len(summaries)
        return RewardScores(torch.zeros(n), torch.zeros(n), torch.zeros(n, 2))

    options = ["--model.dtype", "float32", "--rollout.samples_per_prompt", "2", "--rollout.batch_size", "2",
               "--rollout.max_new_tokens", "12", "--rollout.max_new_tokens_min", "4", "--data.max_prompt_tokens", "40"]
    trajectories = {}
    for compiled in (False, True):
        cfg = load_config(None, options + ["--rollout.compile", str(compiled).lower()])
        start = {name: param.detach().clone() for name, param in policy.peft_model.named_parameters()}
        runs = []
        for step in range(2):
            torch.manual_seed(step)
            runs.append(make_experience(policy, tokenizer, prompts, reward_fn, cfg, rng=random.Random(step))[0])
            with torch.no_grad():  # a PPO update in between
                for name, param in policy.peft_model.named_parameters():
                    if "lora_B" in name and param.requires_grad:
                        param.add_(0.1 * (step + 1))
        with torch.no_grad():  # the same starting policy for the other mode
            for name, param in policy.peft_model.named_parameters():
                param.copy_(start[name])
        trajectories[compiled] = runs
    assert compiled_decoding["stats"]["unique_graphs"] >= 1  # it did compile
    assert len(own_loop_calls) == 4  # two rollouts of two decoding calls (batches of 2 prompts, then 1)
    assert not torch.equal(trajectories[False][0].response_ids, trajectories[False][1].response_ids)
    for plain, fast in zip(trajectories[False], trajectories[True]):
        assert torch.equal(plain.response_ids, fast.response_ids)
        torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=0, rtol=0)
