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
