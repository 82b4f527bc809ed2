"""Unit tests of the PPO math in train/ppo_core.py (hand-computed tensors) and of `train.ppo.ppo_step` on the tiny T5
(one process; tests/test_ppo_distributed.py runs it on several)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from train.config import PPOConfig, load_config
from train.errors import ConfigError
from train.ppo import ppo_step
from train.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    check_batch_sizes,
    ScoreShaper,
    Trajectory,
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
from train.rollout import forward_trajectory


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


def test_gae_advantages_hand_computed():
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
    plain = ScoreShaper()  # the reference workflow: raw scores pass through, no statistics kept
    torch.testing.assert_close(plain(scores), scores)
    assert plain.count == 0
    with pytest.raises(ValueError, match="positive"):
        ScoreShaper(clip=0.0)


# ----------------------------------------------------------------------------------------------------
# ppo_step on the tiny T5


def _tiny_policy(tiny_artifacts, **ppo):
    from train.models import load_policy

    overrides = ["--model.name_or_path", str(tiny_artifacts.t5)]
    for key, value in ppo.items():
        overrides += [f"--ppo.{key}", str(value)]
    cfg = load_config(None, overrides + ["--model.dtype", "float32", "--lora.r", "8", "--lora.alpha", "8"])
    torch.manual_seed(0)
    policy, tokenizer = load_policy(cfg)
    with torch.no_grad():  # a non-zero adapter, so the policy differs from its reference
        for name, param in policy.peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return policy, tokenizer, cfg.ppo


def _generated_rollout(policy, tokenizer, rows: int) -> dict[str, torch.Tensor]:
    """Sampled responses to `rows` prompts, with scores: the ids a rollout produces, before its forward passes."""
    prompts = [f"#Person1#: hello number {i}. #Person2#: hi, how are you?" for i in range(rows)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(1)
    with torch.no_grad():
        response_ids = policy.generate(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True, max_new_tokens=12
        )
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    scores = torch.linspace(-1.0, 1.0, rows)
    return dict(query_ids=enc.input_ids, query_mask=enc.attention_mask, response_ids=response_ids,
                response_mask=response_mask, scores=scores)


def _trajectory(policy, rollout: dict, cfg: PPOConfig, chunk_size: int = 4, accelerator=None) -> Trajectory:
    return forward_trajectory(policy, **rollout, chunk_size=chunk_size, trl_first_token_mask=cfg.trl_first_token_mask,
                              accelerator=accelerator)


def _kl(cfg: PPOConfig):
    return make_kl_controller(cfg.init_kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)


def _step(policy, optimizer, rollout: dict, kl_ctl, cfg: PPOConfig, accelerator=None, generator=None):
    """What one step of the training loop does with a rollout: forward passes, then `ppo_step`."""
    trajectory = _trajectory(policy, rollout, cfg, cfg.mini_batch_size, accelerator)
    return ppo_step(policy, optimizer, trajectory, kl_ctl, ScoreShaper(), cfg, accelerator=accelerator,
                    generator=generator)


def _trainable(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_ppo_step_runs_repeatedly_with_finite_stats(tiny_artifacts):
    policy, tokenizer, cfg = _tiny_policy(tiny_artifacts, batch_size=8, mini_batch_size=4, learning_rate=1e-3)
    policy.train()
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    rollout = _generated_rollout(policy, tokenizer, rows=8)
    kl_ctl = _kl(cfg)
    generator = torch.Generator().manual_seed(0)
    before = _trainable(policy)
    history = [_step(policy, optimizer, rollout, kl_ctl, cfg, generator=generator) for _ in range(3)]

    for stats in history:
        assert all(math.isfinite(v) for v in stats.values()), stats
        assert stats["ppo/policy/skipped"] == 0.0
    assert policy.training  # the mode is restored after the eval-mode passes
    # A fresh rollout: old and new policies agree on the first mini-batch, so its ratio is exactly 1.
    assert history[0]["objective/kl"] != 0.0
    assert history[0]["objective/kl_coef"] == cfg.init_kl_coef and kl_ctl.value != cfg.init_kl_coef
    assert history[0]["tokens/responses_len_mean"] == rollout["response_mask"].sum(1).float().mean().item()
    after = _trainable(policy)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n or "value_head" in n)
    # Training on the same rollout fits the value head: the value error falls.
    assert history[-1]["ppo/val/error"] < history[0]["ppo/val/error"]


def test_ppo_step_first_minibatch_ratio_is_one(tiny_artifacts):
    policy, tokenizer, cfg = _tiny_policy(tiny_artifacts, batch_size=4, mini_batch_size=4)
    rollout = _generated_rollout(policy, tokenizer, rows=4)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    stats = _step(policy, optimizer, rollout, _kl(cfg), cfg)
    assert stats["ppo/policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["ppo/policy/first_ratio"] == stats["ppo/policy/ratio_mean"]  # one mini-batch: the first
    assert stats["ppo/policy/approxkl"] == pytest.approx(0.0, abs=1e-10)


def test_ppo_step_ratio_guard_skips_every_minibatch(tiny_artifacts):
    policy, tokenizer, cfg = _tiny_policy(tiny_artifacts, batch_size=8, mini_batch_size=4, ratio_threshold=0.5)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    rollout = _generated_rollout(policy, tokenizer, rows=8)
    before = _trainable(policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = _step(policy, optimizer, rollout, _kl(cfg), cfg)
    assert sum("Skipping batch" in str(w.message) for w in caught) == 2  # both mini-batches
    assert stats["ppo/policy/skipped"] == 1.0 and stats["ppo/loss/total"] == 0.0
    after = _trainable(policy)
    # Zero gradients into a fresh Adam move nothing.
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_forward_trajectory_default_mask_keeps_the_first_generated_token(tiny_artifacts):
    policy, tokenizer, cfg = _tiny_policy(tiny_artifacts, batch_size=4, mini_batch_size=4)
    rollout = _generated_rollout(policy, tokenizer, rows=4)
    ours = _trajectory(policy, rollout, cfg, chunk_size=2)
    trl = _trajectory(policy, rollout, PPOConfig(batch_size=4, mini_batch_size=4, trl_first_token_mask=True), 4)
    assert torch.equal(ours.masks[:, 0], torch.ones(4, dtype=ours.masks.dtype))
    assert torch.equal(trl.masks[:, 0], torch.zeros(4, dtype=trl.masks.dtype))
    torch.testing.assert_close(ours.masks[:, 1:], trl.masks[:, 1:])
    # Chunking does not change the forward pass results.
    torch.testing.assert_close(ours.logprobs, trl.logprobs, atol=1e-5, rtol=0)
    _, _, kls = kl_penalized_rewards(ours.scores, ours.logprobs, ours.ref_logprobs, ours.masks, 0.2)
    assert kls[:, 0].abs().max() > 0  # the first token now carries a KL penalty


def _padded_wider(rollout: dict, extra_q: int, extra_r: int, pad_id: int = 0) -> dict:
    """`rollout` with `extra_q` / `extra_r` more all-padding columns, as a longer row elsewhere in the batch makes."""
    pad = lambda t, n, value: torch.nn.functional.pad(t, (0, n), value=value)
    return dict(query_ids=pad(rollout["query_ids"], extra_q, pad_id), query_mask=pad(rollout["query_mask"], extra_q, 0),
                response_ids=pad(rollout["response_ids"], extra_r, pad_id),
                response_mask=pad(rollout["response_mask"], extra_r, 0), scores=rollout["scores"])


def test_trailing_padding_is_trimmed_and_changes_no_result(tiny_artifacts):
    policy, tokenizer, cfg = _tiny_policy(tiny_artifacts, batch_size=4, mini_batch_size=2, learning_rate=1e-3)
    rollout = _generated_rollout(policy, tokenizer, rows=4)
    wide = _padded_wider(rollout, extra_q=9, extra_r=7)
    narrow_batch = _trajectory(policy, rollout, cfg, chunk_size=1)  # each row trimmed to itself
    wide_batch = _trajectory(policy, wide, cfg, chunk_size=4)
    trimmed = wide_batch.trimmed()
    assert trimmed.query_ids.shape[1] == int(rollout["query_mask"].sum(1).max())
    assert trimmed.response_ids.shape[1] == int(rollout["response_mask"].sum(1).max())
    assert trimmed.logprobs.shape[1] == trimmed.response_ids.shape[1] - 1
    assert torch.equal(trimmed.response_ids, rollout["response_ids"][:, : trimmed.response_ids.shape[1]])

    assert wide_batch.logprobs.shape[1] == narrow_batch.logprobs.shape[1] + 7  # the batch width is kept...
    assert not wide_batch.masks[:, -7:].any()  # ...and the extra columns are masked out
    for name in ("logprobs", "ref_logprobs", "values"):
        got, expected = getattr(wide_batch, name)[:, :-7], getattr(narrow_batch, name)
        torch.testing.assert_close(got * narrow_batch.masks, expected * narrow_batch.masks, atol=1e-5, rtol=0)

    # A whole step on the padded rollout trains the same weights.
    results = []
    for r in (rollout, wide):
        policy, _, _ = _tiny_policy(tiny_artifacts, batch_size=4, mini_batch_size=2)
        start = _trainable(policy)
        optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
        stats = _step(policy, optimizer, r, _kl(cfg), cfg, generator=torch.Generator().manual_seed(0))
        results.append((stats, _trainable(policy)))
    (stats_a, weights_a), (stats_b, weights_b) = results
    assert stats_a["ppo/loss/total"] == pytest.approx(stats_b["ppo/loss/total"], abs=1e-6)
    assert any(not torch.equal(weights_a[n], start[n]) for n in start)  # the step moved the weights
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], atol=1e-6, rtol=0)


def test_ppo_step_with_accelerator_and_accumulation_matches_plain_loop(tiny_artifacts):
    from accelerate import Accelerator

    results = []
    for use_accelerator in (False, True):
        policy, tokenizer, cfg = _tiny_policy(
            tiny_artifacts, batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.5
        )
        start = _trainable(policy)
        optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
        rollout = _generated_rollout(policy, tokenizer, rows=8)
        accelerator = None
        if use_accelerator:
            accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
            policy, optimizer = accelerator.prepare(policy, optimizer)
        _step(policy, optimizer, rollout, _kl(cfg), cfg, accelerator=accelerator,
              generator=torch.Generator().manual_seed(3))
        results.append(_trainable(policy))
    plain, accelerated = results
    moved = [n for n in start if not torch.equal(plain[n], start[n])]
    assert any("lora_B" in n for n in moved) and any("value_head" in n for n in moved)  # the optimizer stepped
    for name in plain:
        torch.testing.assert_close(plain[name], accelerated[name], atol=1e-6, rtol=0)


def test_batch_sizes_that_do_not_split_are_one_clear_error():
    check_batch_sizes(8, 4, 1, processes=2, rows=8)  # two processes: mini-batch shares of 2 rows
    with pytest.raises(ConfigError, match="trajectory has 4 rows but ppo.batch_size is 8"):
        check_batch_sizes(8, 4, 1, processes=1, rows=4)
    with pytest.raises(ConfigError, match="multiples of the number of processes"):
        check_batch_sizes(8, 4, 1, processes=3)
    with pytest.raises(ConfigError, match="mini_batch_size .4. x ppo.gradient_accumulation_steps .3."):
        check_batch_sizes(8, 4, 3, processes=1)
