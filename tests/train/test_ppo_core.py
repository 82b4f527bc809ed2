"""Unit tests of the PPO math in train/ppo_core.py on hand-computed tensors. `train.ppo.ppo_step`, which puts it
together, is tested in test_ppo.py (one process), test_ppo_distributed.py (several) and test_ppo_core_vs_trl.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from train.errors import ConfigError
from train.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    check_batch_sizes,
    ScoreShaper,
    clip_by_value,
    entropy_from_logits,
    gae_advantages,
    kl_penalized_rewards,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
    response_loss_mask,
    response_mask_from_ids,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------
# Tensor helpers


def test_logprobs_from_logits_picks_the_label_log_softmax():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # probabilities [1/4, 3/4] and [1/2, 1/2]
    labels = torch.tensor([[1, 0]])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), torch.tensor([[math.log(0.75), math.log(0.5)]]))


def test_entropy_from_logits_uniform_and_peaked():
    logits = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [100.0, 0.0, 0.0, 0.0]]])
    entropy = entropy_from_logits(logits)
    assert entropy[0, 0].item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_masked_mean_var_ignore_masked_values():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # Bessel-corrected: (1 + 0 + 1) / 2
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, torch.tensor([[1, 0, 0, 0]]))


def test_masked_whiten_normalises_unmasked_values():
    values = torch.tensor([[1.0, 2.0, 6.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    whitened = masked_whiten(values, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-6)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(3.0, abs=1e-6)


def test_clip_by_value_uses_elementwise_bounds():
    x = torch.tensor([0.0, 5.0, -5.0])
    low, high = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([2.0, 4.0, 1.0])
    torch.testing.assert_close(clip_by_value(x, low, high), torch.tensor([1.0, 4.0, -1.0]))


def test_response_mask_from_ids_stops_after_first_eos():
    eos = 1
    ids = torch.tensor([[0, 5, 6, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 5, 6, 7, 8, 9], [0, 5, 1, 7, 1, 0]])
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(response_mask_from_ids(ids, eos), expected)


def test_response_loss_mask_counts_predicted_tokens_and_trl_drops_the_first():
    response_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])  # [start, t1, t2, eos, pad], [start, eos, ...]
    torch.testing.assert_close(response_loss_mask(response_mask), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]))
    torch.testing.assert_close(
        response_loss_mask(response_mask, trl_first_token_mask=True), torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    )


# ----------------------------------------------------------------------------------------------------
# Rewards, advantages, loss


def test_kl_penalized_rewards_adds_score_on_last_unmasked_position():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, non_score, kls = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.5)
    torch.testing.assert_close(kls, torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(non_score, torch.tensor([[-0.25, 0.0, 0.5], [0.0, -0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, 2.0, 0.5], [-1.0, -0.5, 0.0]]))


def test_kl_penalized_rewards_rejects_a_row_without_response_tokens():
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        kl_penalized_rewards(torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1, 0], [0, 0]]), 0.1)


def test_gae_advantages_match_a_hand_computation():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    # gamma 1, lambda 0.5: deltas (backwards) 1-3 = -2, 0+3-2 = 1, 0+2-1 = 1 -> gae -2, 1+0.5*-2 = 0, 1+0.5*0 = 1
    masked_values, advantages, returns = gae_advantages(values, rewards, mask, gamma=1.0, lam=0.5)
    raw = torch.tensor([[1.0, 0.0, -2.0]])
    torch.testing.assert_close(returns, raw + values)
    torch.testing.assert_close(masked_values, values)
    torch.testing.assert_close(advantages, (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8))


def test_gae_advantages_zero_values_and_rewards_after_the_last_token():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    # The masked value 3 and reward 5 are dropped: backwards 0, 1+0-2 = -1, 0+2-1 = 1 -> gae 0, -1, 1+0.5*-1
    masked_values, _, returns = gae_advantages(values, rewards, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(masked_values, torch.tensor([[1.0, 2.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.5, 1.0, 0.0]]))


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    torch.manual_seed(0)
    values, rewards, mask = torch.randn(3, 5), torch.randn(3, 5), torch.ones(3, 5)
    gamma = 0.9
    _, _, returns = gae_advantages(values, rewards, mask, gamma=gamma, lam=1.0)
    discounted = torch.stack([sum(gamma**k * rewards[:, t + k] for k in range(5 - t)) for t in range(5)], dim=1)
    torch.testing.assert_close(returns, discounted)


def _loss_inputs():
    old_logprobs = torch.zeros(1, 2)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    vpreds = torch.tensor([[0.5, -0.1]], requires_grad=True)
    return dict(
        old_logprobs=old_logprobs, old_values=torch.zeros(1, 2), logprobs=logprobs, vpreds=vpreds,
        logits=torch.zeros(1, 2, 3), mask=torch.ones(1, 2), advantages=torch.ones(1, 2), returns=torch.ones(1, 2),
    )


def test_ppo_loss_clips_policy_ratio_and_value():
    inputs = _loss_inputs()
    loss, stats = ppo_loss(**inputs, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ratio_threshold=10.0)
    # ratios 1.5, 0.5: losses -1.5 / clipped -1.2 -> -1.2; -0.5 / clipped -0.8 -> -0.5; mean -0.85
    # values 0.5, -0.1 (old 0, clipped to 0.2, -0.1) vs return 1: max(0.25, 0.64), 1.21 -> 0.5 * mean = 0.4625
    assert stats["loss/policy"].item() == pytest.approx(-0.85)
    assert stats["loss/value"].item() == pytest.approx(0.4625)
    assert loss.item() == pytest.approx(-0.85 + 0.1 * 0.4625)
    assert stats["policy/clipfrac"].item() == pytest.approx(0.5)
    assert stats["val/clipfrac"].item() == pytest.approx(0.5)
    assert stats["policy/entropy"].item() == pytest.approx(math.log(3.0))
    assert stats["policy/skipped"].item() == 0.0
    loss.backward()
    # The clipped ratio has no gradient; the other gives d(-A * exp(logp)) / 2 = -0.5 / 2.
    torch.testing.assert_close(inputs["logprobs"].grad, torch.tensor([[0.0, -0.25]]))
    # Value: clipped element's gradient is 0; the other is 0.1 * 0.5 * 2 * (-0.1 - 1) / 2.
    torch.testing.assert_close(inputs["vpreds"].grad, torch.tensor([[0.0, 0.1 * 0.5 * (-1.1)]]))


def test_ppo_loss_ratio_guard_skips_with_zero_finite_gradients():
    inputs = _loss_inputs()
    inputs["logprobs"] = torch.tensor([[200.0, 0.0]], requires_grad=True)  # exp(200) overflows to inf
    with pytest.warns(UserWarning, match="Skipping batch"):
        loss, stats = ppo_loss(**inputs, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ratio_threshold=10.0)
    loss.backward()
    assert loss.item() == 0.0 and stats["policy/skipped"].item() == 1.0
    assert stats["loss/policy"].item() == 0.0 and stats["loss/value"].item() == 0.0
    assert torch.equal(inputs["logprobs"].grad, torch.zeros(1, 2))
    assert torch.equal(inputs["vpreds"].grad, torch.zeros(1, 2))


# ----------------------------------------------------------------------------------------------------
# KL controllers and score scaling


def test_adaptive_kl_controller_moves_towards_target_with_clipped_error():
    ctl = make_kl_controller(0.2, adaptive=True, target=6.0, horizon=10000)
    assert isinstance(ctl, AdaptiveKLController)
    ctl.update(current_kl=12.0, n_steps=16)  # error 12/6 - 1 = 1 is clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 16 / 10000))
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=16)  # error -0.1
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 16 / 10000))
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()


def test_fixed_kl_controller_never_changes():
    ctl = make_kl_controller(0.3, adaptive=False, target=6.0, horizon=10000)
    assert isinstance(ctl, FixedKLController)
    ctl.update(100.0, 16)
    assert ctl.value == 0.3


def test_score_shaper_running_statistics_match_the_whole_stream_and_survive_a_checkpoint():
    shaper = ScoreShaper("standardize")
    batches = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0]), torch.tensor([-2.0, 0.5, 7.0, 1.0])]
    for b in batches:
        out = shaper(b)
    stream = torch.cat(batches).double()
    assert shaper.count == stream.numel()
    assert shaper.mean == pytest.approx(stream.mean().item(), rel=1e-9)
    assert shaper.std == pytest.approx(stream.std().item(), rel=1e-9)  # unbiased, as TRL's RunningMoments
    torch.testing.assert_close(out, ((batches[-1].double() - stream.mean()) / stream.std()).float())
    restored = ScoreShaper("standardize")
    restored.load_state_dict(json.loads(json.dumps(shaper.state_dict())))  # survives the JSON checkpoint
    probe = torch.tensor([-2.0, 0.0, 9.0])
    torch.testing.assert_close(restored(probe), shaper(probe))


def test_score_shaper_scale_standardize_and_clip():
    scores = torch.tensor([1.0, 3.0, 5.0])
    std = float(np.std([1.0, 3.0, 5.0], ddof=1))
    torch.testing.assert_close(ScoreShaper("scale")(scores), scores / std)
    torch.testing.assert_close(ScoreShaper("standardize")(scores), (scores - 3.0) / std)
    torch.testing.assert_close(ScoreShaper(clip=2.0)(scores), torch.tensor([1.0, 2.0, 2.0]))
    torch.testing.assert_close(ScoreShaper("standardize", clip=0.5)(scores), torch.tensor([-0.5, 0.0, 0.5]))
    plain = ScoreShaper()  # the original notebook: raw scores pass through, no statistics kept
    torch.testing.assert_close(plain(scores), scores)
    assert plain.count == 0
    with pytest.raises(ValueError, match="positive"):
        ScoreShaper(clip=0.0)


def test_batch_sizes_that_do_not_split_are_one_clear_error():
    check_batch_sizes(8, 4, 1, processes=2, rows=8)  # two processes: mini-batch shares of 2 rows
    with pytest.raises(ConfigError, match="trajectory has 4 rows but ppo.batch_size is 8"):
        check_batch_sizes(8, 4, 1, processes=1, rows=4)
    with pytest.raises(ConfigError, match="multiples of the 3 training processes"):
        check_batch_sizes(8, 4, 1, processes=3)
    with pytest.raises(ConfigError, match="mini_batch_size .4. x ppo.gradient_accumulation_steps .3."):
        check_batch_sizes(8, 4, 3, processes=1)
