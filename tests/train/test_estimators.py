"""The critic-free advantage estimators (train/ppo_core.py): RLOO and group-relative (GRPO) advantages on
hand-computed tensors, the KL as a reward penalty or as the k3 loss term, and the clipped loss reducing to
REINFORCE with a baseline when the ratio is 1."""

from __future__ import annotations

import math

import pytest
import torch

from train.errors import ConfigError
from train.ppo_core import (
    GROUP_STD_EPS, Trajectory, group_advantages, make_estimator, ppo_loss, rloo_advantages, sequence_rewards,
)


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_other_samples():
    # Two prompts, k = 3: [1, 2, 4] and [0.5, 0.5, 2].
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 2.0], dtype=torch.float64)
    expected = torch.tensor([1 - (2 + 4) / 2, 2 - (1 + 4) / 2, 4 - (1 + 2) / 2,
                             0.5 - (0.5 + 2) / 2, 0.5 - (0.5 + 2) / 2, 2 - (0.5 + 0.5) / 2], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(rewards, 3), expected)
    # k = 2: each sample's baseline is the other one.
    torch.testing.assert_close(rloo_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))


def test_group_advantage_is_the_reward_standardised_within_its_prompt():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=torch.float64)
    # Group 1: mean 2, unbiased std 1. Group 2: mean 2, unbiased std sqrt((4 + 4 + 16) / 2) = sqrt(12).
    std2 = math.sqrt(12)
    expected = torch.tensor([-1 / (1 + GROUP_STD_EPS), 0.0, 1 / (1 + GROUP_STD_EPS),
                             -2 / (std2 + GROUP_STD_EPS), -2 / (std2 + GROUP_STD_EPS), 4 / (std2 + GROUP_STD_EPS)],
                            dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, 3), expected)


@pytest.mark.parametrize("advantages", [rloo_advantages, group_advantages])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage_and_no_nan(advantages):
    # 0.1 three times: a mean would round (0.1 + 0.1 + 0.1) / 3 != 0.1; differences do not.
    rewards = torch.tensor([0.1, 0.1, 0.1, -7.3, 2.0, 5.0], dtype=torch.float64)
    out = advantages(rewards, 3)
    assert torch.isfinite(out).all()
    assert out[:3].tolist() == [0.0, 0.0, 0.0]
    assert out[3:].abs().min() > 0.1


@pytest.mark.parametrize("advantages", [rloo_advantages, group_advantages])
def test_rows_that_do_not_make_whole_groups_are_refused(advantages):
    with pytest.raises(ValueError, match="groups of k = 3"):
        advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="k = 1"):
        advantages(torch.zeros(4), 1)


def test_sequence_rewards_subtract_the_summed_kl_of_the_response_tokens():
    scores = torch.tensor([1.0, -2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 2's last position is padding: its KL does not count
    rewards, non_score, kls = sequence_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.5)
    # Row 1: KL per token 0.5, -1, 0 -> sum -0.5. Row 2: 0.5, 1 -> sum 1.5.
    torch.testing.assert_close(rewards, torch.tensor([1.0 - 0.5 * -0.5, -2.0 - 0.5 * 1.5]))
    torch.testing.assert_close(kls, logprobs - ref_logprobs)
    torch.testing.assert_close(non_score, -0.5 * (logprobs - ref_logprobs))


def _trajectory(scores, logprobs, ref_logprobs, mask) -> Trajectory:
    b, t = logprobs.shape
    ids = torch.zeros(b, t + 1, dtype=torch.long)
    return Trajectory(ids, torch.ones_like(ids), ids, torch.ones_like(ids), scores, logprobs, ref_logprobs, None, mask)


@pytest.mark.parametrize("name,kl_penalty,in_loss", [("rloo", "auto", False), ("group", "auto", True),
                                                     ("rloo", "loss", True), ("group", "reward", False)])
def test_the_estimator_broadcasts_the_summary_advantage_over_its_tokens(name, kl_penalty, in_loss):
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-2.0, -2.0], [-1.0, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0], [-1.0, -2.0], [-2.0, -2.0], [-1.0, -2.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    estimator = make_estimator(name, kl_penalty, 2, gamma=1.0, lam=0.95, whiten_rewards=False)
    assert not estimator.uses_value_head and estimator.kl_in_loss == in_loss
    out = estimator.advantages(_trajectory(scores, logprobs, ref_logprobs, mask), scores, 0.5)
    assert out.values is None and out.returns is None
    # Summed masked KL per row: 0.5, 0, 0, -1; in the reward with coefficient 0.5 unless the KL is in the loss.
    rewards = scores - (0 if in_loss else 0.5) * torch.tensor([0.5, 0.0, 0.0, -1.0])
    grouped = rewards.view(2, 2)
    if name == "rloo":
        per_row = (grouped - grouped.flip(1)).flatten()
    else:
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        per_row = (centred / (grouped.std(dim=1, keepdim=True) + GROUP_STD_EPS)).flatten()
    torch.testing.assert_close(out.advantages, per_row[:, None] * mask)
    torch.testing.assert_close(out.kls, logprobs - ref_logprobs)


def test_estimator_choices_are_checked():
    gae = make_estimator("gae", "auto", 1, gamma=1.0, lam=0.95, whiten_rewards=False)
    assert gae.uses_value_head and not gae.kl_in_loss
    with pytest.raises(ConfigError, match="samples_per_prompt to 2 or more"):
        make_estimator("rloo", "auto", 1, gamma=1.0, lam=0.95, whiten_rewards=False)
    with pytest.raises(ConfigError, match="gae, rloo, group"):
        make_estimator("reinforce", "auto", 2, gamma=1.0, lam=0.95, whiten_rewards=False)


def _loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, kl_coef=0.0):
    logits = torch.zeros(*logprobs.shape, 5)
    return ppo_loss(old_logprobs, None, logprobs, None, logits, mask, advantages, None, cliprange=0.2,
                    cliprange_value=0.2, vf_coef=0.1, ratio_threshold=10.0, ref_logprobs=ref_logprobs, kl_coef=kl_coef)


def test_at_ratio_one_the_critic_free_loss_is_reinforce_with_a_baseline():
    torch.manual_seed(0)
    old = -torch.rand(3, 4) * 3
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    advantages = torch.tensor([1.5, -0.5, 2.0])[:, None] * mask
    logprobs = old.clone().requires_grad_(True)
    loss, stats = _loss(logprobs, old, advantages, mask)
    loss.backward()
    # REINFORCE with a baseline: -(advantage * log-prob), token mean; its gradient is -advantage / tokens.
    logprobs_ref = old.clone().requires_grad_(True)
    reinforce = -(advantages * logprobs_ref * mask).sum() / mask.sum()
    reinforce.backward()
    torch.testing.assert_close(logprobs.grad, logprobs_ref.grad)
    torch.testing.assert_close(loss, -(advantages * mask).sum() / mask.sum())
    assert "loss/value" not in stats and not any(key.startswith("val/") for key in stats)
    assert stats["policy/ratio_mean"].item() == pytest.approx(1.0)
    assert stats["loss/total"].item() == pytest.approx(stats["loss/policy"].item())


def test_the_k3_kl_term_is_zero_at_the_reference_and_pulls_towards_it():
    mask = torch.ones(1, 3, dtype=torch.long)
    ref = torch.tensor([[-1.0, -2.0, -0.5]])
    old = torch.tensor([[-1.2, -1.5, -0.5]])
    zero_advantage = torch.zeros(1, 3)
    logprobs = old.clone().requires_grad_(True)
    loss, stats = _loss(logprobs, old, zero_advantage, mask, ref_logprobs=ref, kl_coef=0.5)
    r = ref - old
    k3 = torch.exp(r) - r - 1  # per token: 0.0187.., 0.1065.., 0
    torch.testing.assert_close(stats["loss/kl"], k3.mean())
    torch.testing.assert_close(loss.detach(), 0.5 * k3.mean())
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): the gradient step (minus the gradient) moves logp towards ref.
    torch.testing.assert_close(logprobs.grad, 0.5 * (1 - torch.exp(r)) / 3)
    assert (-logprobs.grad * (ref - old)).ge(0).all()
    at_reference, stats = _loss(ref.clone().requires_grad_(True), ref, zero_advantage, mask, ref_logprobs=ref,
                                kl_coef=0.5)
    assert at_reference.item() == 0.0 and stats["loss/kl"].item() == 0.0


def test_the_k3_term_gives_finite_gradients_where_a_padded_position_would_overflow():
    # Padding: ref_logprobs is 0 there, and a policy that all but rules out the pad token after eos has log p = -100:
    # exp(0 - (-100)) overflows float32. The position is masked out, so its gradient must be 0, not NaN.
    mask = torch.tensor([[1, 1, 0]])
    ref = torch.tensor([[-1.0, -2.0, 0.0]])
    old = torch.tensor([[-1.2, -1.5, -100.0]])
    logprobs = old.clone().requires_grad_(True)
    loss, stats = _loss(logprobs, old, torch.tensor([[0.5, 0.5, 0.0]]), mask, ref_logprobs=ref, kl_coef=0.5)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 2] == 0.0
    assert torch.isfinite(stats["loss/kl"])


def test_gae_can_take_the_kl_as_a_loss_term_instead_of_a_reward_penalty():
    scores = torch.tensor([1.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    ref_logprobs = torch.tensor([[-2.0, -2.0], [-1.5, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.long)
    trajectory = _trajectory(scores, logprobs, ref_logprobs, mask)
    trajectory.values = torch.zeros(2, 2)
    in_reward = make_estimator("gae", "auto", 1, gamma=1.0, lam=1.0, whiten_rewards=False)
    in_loss = make_estimator("gae", "loss", 1, gamma=1.0, lam=1.0, whiten_rewards=False)
    assert in_loss.uses_value_head and in_loss.kl_in_loss and not in_reward.kl_in_loss
    # With the KL in the loss the returns are the scores alone (gamma = lambda = 1, zero values); in the reward they
    # also carry -kl_coef * the KL still to come.
    torch.testing.assert_close(in_loss.advantages(trajectory, scores, 0.5).returns, torch.tensor([[1.0, 1.0],
                                                                                                 [-1.0, -1.0]]))
    torch.testing.assert_close(in_reward.advantages(trajectory, scores, 0.5).returns,
                               torch.tensor([[1.0 - 0.5, 1.0], [-1.0 - 0.25, -1.0]]))


def test_rows_that_are_not_a_prompts_consecutive_samples_are_refused():
    estimator = make_estimator("group", "auto", 2, gamma=1.0, lam=0.95, whiten_rewards=False)
    grouped = torch.tensor([[5, 6, 1], [5, 6, 1], [7, 1, 0], [7, 1, 0]])
    estimator.check_groups(grouped)
    with pytest.raises(ValueError, match="not 2 consecutive samples of one prompt each"):
        estimator.check_groups(grouped[[0, 2, 1, 3]])
    with pytest.raises(ValueError, match="not whole groups"):
        estimator.check_groups(grouped[:3])
