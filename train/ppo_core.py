"""PPO math for a seq2seq policy: the classic TRL (0.11.4) `PPOTrainer.step`, as pure functions plus `ppo_step`.

The rollout loop (`train/ppo.py`) generates responses, scores them and calls

    stats = ppo_step(policy, optimizer, rollout, kl_ctl, cfg.ppo, accelerator=accelerator, generator=g)

with `optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.ppo.learning_rate)`
(TRL's default optimizer) and, when an accelerator is used, `Accelerator(gradient_accumulation_steps=
cfg.ppo.gradient_accumulation_steps)` with the policy and optimizer passed through `accelerator.prepare`.

One PPO step (numbered as in `ppo_step`):
  1. no-grad forward passes (`ppo.forward_batch_size` rows at a time): old log-probs and values of the policy,
     reference log-probs with the LoRA adapter switched off (the base model is the KL reference, as TRL did for
     PEFT models) or, with `ppo.reference: initial_adapter`, with the frozen copy of the starting adapter;
  2. per-token rewards: `-kl_coef * (logp - logp_ref)`, plus the score on the last response token;
  3. GAE advantages (gamma, lambda), returns = advantages + values, advantages whitened over the batch;
  4. `ppo_epochs` passes over shuffled mini-batches: clipped policy loss + `vf_coef` * clipped value loss,
     skipping (zero loss) a mini-batch whose mean ratio exceeds `ratio_threshold`;
  5. TRL's namespaced statistics, averaged over mini-batches (and processes);
  6. the KL controller update with the global batch size.

Every forward pass (chunk or mini-batch) drops the trailing columns that are padding in all its rows
(`Rollout.trimmed`), so it costs what its own longest prompt and response cost, as TRL's per-mini-batch padding did.

Shapes: B = rollout rows on this process, Q = query length, R = decoder length (start token included), T = R - 1
predicted positions (position t predicts decoder token t + 1), V = vocabulary size.

Score scaling / normalisation / clipping (TRL's `use_score_scaling`, `use_score_norm`, `score_clip`) happens in
the caller, with `scale_scores` and a `RunningMoments` kept across steps, before the `Rollout` is built.

As in TRL, every forward pass runs with dropout off: TRL's `batched_forward_pass` calls `model.eval()` before each
forward, including the ones whose loss is back-propagated, so the first mini-batch's ratio is exactly 1.

Differences from TRL 0.11.4 (tests/test_ppo_vs_trl.py checks everything else against it):
- First-token mask, behind `PPOConfig.trl_first_token_mask`: for encoder-decoder models TRL's `batched_forward_pass`
  sets `start = 1`, which masks out position 0 — the log-prob of the FIRST generated token (for decoder-only models
  `start` is the first response token, so this is an off-by-one). TRL thus never trains on, nor penalises the KL
  of, the first summary token. By default we keep it (mask = every real predicted token); `true` reproduces TRL.
- Ratio guard: TRL multiplies a skipped mini-batch's loss by 0, which gives NaN gradients when the ratio overflows
  to inf; ours back-propagates an exactly-zero loss that bypasses the ratio. Otherwise identical: the optimizer
  still steps (keeping processes in sync), so Adam's momentum from earlier mini-batches still moves the weights.
- `batch_size` / `mini_batch_size` are global (TRL's were per process); stats are averaged over processes as
  TRL's `gather_stats` did. TRL's array-valued stats (kl_dist, ratio, advantages, logprobs) are not returned;
  `ppo/policy/ratio_mean` and `ppo/policy/skipped` (fraction of skipped mini-batches) are added.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from train.config import PPOConfig
from train.errors import ConfigError

# ----------------------------------------------------------------------------------------------------
# Rollout container


@dataclass
class Rollout:
    """One process's share of a PPO batch; tensors on the policy's device."""

    query_ids: torch.Tensor  # (B, Q) long, right-padded prompt ids
    query_mask: torch.Tensor  # (B, Q) long
    response_ids: torch.Tensor  # (B, R) long: [decoder_start, t1, ..., eos, pad, ...] as generate() returns them
    response_mask: torch.Tensor  # (B, R) long: 1 on real decoder tokens (start token included), 0 on padding
    scores: torch.Tensor  # (B,) float reward-model scores (already scaled/clipped, see `scale_scores`)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> "Rollout":
        """The rows `index` (a slice or a 1-D index tensor)."""
        return Rollout(
            self.query_ids[index], self.query_mask[index], self.response_ids[index], self.response_mask[index],
            self.scores[index],
        )

    def trimmed(self) -> "Rollout":
        """The same rows without the trailing columns that are padding in every row.

        A chunk or mini-batch then costs what its own longest prompt and response cost, not the batch's (TRL
        padded each mini-batch to its own length too). Exact: T5 masks padded keys and its position biases are
        relative, so outputs at real positions do not depend on trailing padding.
        """
        q, r = _used_width(self.query_mask, 1), _used_width(self.response_mask, 2)
        return Rollout(self.query_ids[:, :q], self.query_mask[:, :q], self.response_ids[:, :r],
                       self.response_mask[:, :r], self.scores)


def _used_width(mask: torch.Tensor, minimum: int) -> int:
    """1 + the last column holding a real token in any row (at least `minimum`)."""
    used = torch.nonzero(mask.any(dim=0)).flatten()
    return max(int(used.max()) + 1 if len(used) else 0, minimum)


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, R) decoder ids from generate() -> (B, R) mask: 1 up to and including the first eos, 0 after.

    Needed because T5's pad id equals its decoder start id (0), so padding cannot be told from ids alone.
    Column 0 (the start token) is always real; a row without eos is real to the end.
    """
    is_eos = response_ids == eos_token_id
    is_eos[:, 0] = False  # the start token is never the end
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first eos
    return (~eos_seen_before).long()


# ----------------------------------------------------------------------------------------------------
# Pure tensor helpers (TRL's trl/core.py semantics)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits and (B, T) labels -> (B, T) log-prob of each label, computed in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the softmax distribution."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(probs * logits, dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`)."""
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1; Bessel-corrected by default (as TRL)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count <= 1:
            raise ValueError(
                f"masked_var needs at least 2 unmasked values, got {int(count)}: "
                "use a larger ppo.mini_batch_size or longer responses"
            )
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to zero mean and unit variance over the unmasked values (keep the mean if not shift_mean)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def clip_by_value(x: torch.Tensor, tensor_min: torch.Tensor, tensor_max: torch.Tensor) -> torch.Tensor:
    """Element-wise clamp of `x` into [tensor_min, tensor_max] (tensor bounds, unlike torch.clamp in old torch)."""
    return torch.max(torch.min(x, tensor_max), tensor_min)


def response_loss_mask(response_mask: torch.Tensor, trl_first_token_mask: bool = False) -> torch.Tensor:
    """(B, R) decoder attention mask -> (B, R - 1) mask of the predicted positions that count.

    Position t predicts decoder token t + 1, so it counts when token t + 1 is real. With `trl_first_token_mask`
    position 0 (the first generated token) is dropped too, as TRL 0.11.4 does for encoder-decoder models.
    """
    mask = response_mask[:, 1:].clone()
    if trl_first_token_mask:
        mask[:, 0] = 0
    return mask


def kl_penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: `-kl_coef * (logprobs - ref_logprobs)`, plus the score on the last unmasked position.

    scores (B,), logprobs / ref_logprobs / mask (B, T) -> rewards, non_score_rewards, kls, each (B, T).
    Like TRL the KL terms are not masked here: masked positions are zeroed by `gae_advantages`.
    """
    kls = logprobs - ref_logprobs
    non_score_rewards = -kl_coef * kls
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"rows {empty} have no response token to reward (a response must hold at least one token after the "
            "decoder start token; two with ppo.trl_first_token_mask)"
        )
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # (B,) last unmasked position
    rewards = non_score_rewards.clone()
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, non_score_rewards, kls


def gae_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response (TRL's `compute_advantages`).

    values / rewards / mask (B, T) -> (masked values, whitened advantages, returns), each (B, T), where
    returns = raw advantages + masked values. Values and rewards are zeroed at masked positions first, so the
    recursion bootstraps with 0 after the last token.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    steps = rewards.shape[-1]
    last_gae = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(steps)):
        next_values = values[:, t + 1] if t < steps - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, mask).detach()
    return values, advantages, returns


def ppo_loss(
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    logprobs: torch.Tensor,
    vpreds: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cfg: PPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + `vf_coef` * clipped value loss for one mini-batch (TRL's `PPOTrainer.loss`).

    All (B, T) except logits (B, T, V). Returns the loss to back-propagate and detached scalar stats with TRL's
    keys (without the "ppo/" prefix); "loss/value" is the value loss before `vf_coef`, as in TRL.

    Ratio guard: when the mean ratio exceeds `cfg.ratio_threshold` the mini-batch is skipped: the returned loss
    is 0 with all-zero gradients (so distributed gradient all-reduce still runs) and "policy/skipped" is 1.
    TRL multiplied its loss by 0, which makes NaN gradients when the ratio overflows to inf; ours stays finite.
    """
    vpred_clipped = clip_by_value(vpreds, old_values - cfg.cliprange_value, old_values + cfg.cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)

    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)

    loss = pg_loss + cfg.vf_coef * vf_loss

    avg_ratio = masked_mean(ratio, mask).item()
    skipped = not avg_ratio <= cfg.ratio_threshold  # NaN ratios are skipped too
    if skipped:
        warnings.warn(
            f"The average ratio of batch ({avg_ratio:.2f}) exceeds threshold {cfg.ratio_threshold:.2f}. Skipping batch."
        )
        # Zero gradients that do not flow through exp(ratio) (0 * inf would be NaN).
        loss = (logprobs * 0.0).sum() + (vpreds * 0.0).sum()
        pg_loss = torch.zeros_like(pg_loss)
        vf_loss = torch.zeros_like(vf_loss)

    with torch.no_grad():
        stats = {
            "loss/policy": pg_loss,
            "loss/value": vf_loss,
            "loss/total": loss,
            "policy/entropy": masked_mean(entropy_from_logits(logits), mask),
            "policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
            "policy/policykl": masked_mean(old_logprobs - logprobs, mask),
            "policy/clipfrac": pg_clipfrac,
            "policy/advantages_mean": masked_mean(advantages, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
            "policy/skipped": torch.tensor(float(skipped)),
            "returns/mean": masked_mean(returns, mask),
            "returns/var": masked_var(returns, mask),
            "val/vpred": masked_mean(vpreds, mask),
            "val/error": masked_mean((vpreds - returns) ** 2, mask),
            "val/clipfrac": vf_clipfrac,
            "val/mean": masked_mean(old_values, mask),
            "val/var": masked_var(old_values, mask),
        }
    return loss, {k: v.detach().float() for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------------
# KL controllers and score scaling


class AdaptiveKLController:
    """KL coefficient adapted towards a target KL (Ziegler et al. 2019), as TRL's."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(cfg: PPOConfig) -> AdaptiveKLController | FixedKLController:
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.init_kl_coef)


class RunningMoments:
    """Running mean and standard deviation of the scores over all steps (and processes), as TRL's.

    `update` folds in a batch, using the global batch statistics when an accelerator spans several processes.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.std = 1.0
        self.var = 1.0
        self.count = 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor, accelerator: Any = None) -> tuple[float, float]:
        """Fold in `xs`; returns the batch's mean and (unbiased) std."""
        xs = xs.float()
        if accelerator is not None and accelerator.num_processes > 1:
            sum_and_count = accelerator.reduce(torch.stack([xs.sum(), torch.tensor(float(xs.numel()), device=xs.device)]))
            xs_count = sum_and_count[1].item()
            xs_mean = sum_and_count[0] / sum_and_count[1]
            xs_var = accelerator.reduce(((xs - xs_mean) ** 2).sum()) / xs_count
        else:
            xs_count = xs.numel()
            xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float().cpu(), xs_var.float().cpu()

        delta = xs_mean - self.mean
        total = self.count + xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / total
        new_var = (old_sum + xs_var * xs_count) / total
        self.mean += (delta * xs_count / total).item()
        self.std = (new_var * total / (total - 1)).sqrt().item()
        self.var = new_var.item()
        self.count = total
        return xs_mean.item(), (xs_var * xs_count / (xs_count - 1)).sqrt().item()

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.std, self.var, self.count = (float(state[k]) for k in ("mean", "std", "var", "count"))


def scale_scores(
    scores: torch.Tensor, cfg: PPOConfig, running: Optional[RunningMoments] = None, accelerator: Any = None
) -> torch.Tensor:
    """TRL's optional score transforms, applied before `ppo_step`: scaling by the running std (`score_scaling`),
    also centring on the running mean (`score_norm`, only with scaling), then clipping to ±`score_clip`."""
    if cfg.score_scaling:
        if running is None:
            raise ValueError("ppo.score_scaling needs a RunningMoments instance (kept across steps)")
        running.update(scores, accelerator)
        factor = running.std + torch.finfo(scores.dtype).eps
        scores = (scores - running.mean) / factor if cfg.score_norm else scores / factor
    if cfg.score_clip is not None:
        scores = torch.clip(scores.float(), -cfg.score_clip, cfg.score_clip).to(scores.dtype)
    return scores


# ----------------------------------------------------------------------------------------------------
# The PPO step


@dataclass
class PPOBatch:
    """Everything the PPO epochs need about a rollout, computed before any update; all (B, T) except scores."""

    scores: torch.Tensor  # (B,)
    logprobs: torch.Tensor  # old policy log-probs of the decoder tokens
    ref_logprobs: torch.Tensor  # reference log-probs (adapter off, or the initial adapter)
    values: torch.Tensor  # old values, zeroed where masked
    masks: torch.Tensor  # predicted positions that count (see response_loss_mask)
    kls: torch.Tensor  # logprobs - ref_logprobs
    non_score_rewards: torch.Tensor  # -kl_coef * kls
    rewards: torch.Tensor  # non_score_rewards + score on the last position
    advantages: torch.Tensor  # whitened GAE advantages
    returns: torch.Tensor  # raw advantages + values


def _forward(policy, rows: Rollout, trl_first_token_mask: bool):
    """Policy forward on `rows` -> logits (B, T, V), logprobs (B, T), values (B, T), mask (B, T)."""
    logits, values = policy(rows.query_ids, rows.query_mask, rows.response_ids, rows.response_mask)
    logits = logits[:, :-1].float()
    logprobs = logprobs_from_logits(logits, rows.response_ids[:, 1:])
    mask = response_loss_mask(rows.response_mask, trl_first_token_mask)
    return logits, logprobs, values[:, :-1].float(), mask


@torch.no_grad()
def build_ppo_batch(
    policy, rollout: Rollout, kl_coef: float, cfg: PPOConfig, *, chunk_size: int, accelerator: Any = None
) -> PPOBatch:
    """Steps 1-3 of `ppo_step`: forward passes in chunks of `chunk_size` rows, rewards, advantages."""
    unwrapped = accelerator.unwrap_model(policy) if accelerator is not None else policy
    was_training = policy.training
    policy.eval()
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "ref_logprobs": [], "masks": []}
    width = rollout.response_ids.shape[1] - 1  # predicted positions
    for start in range(0, len(rollout), chunk_size):
        rows = rollout.select(slice(start, start + chunk_size)).trimmed()
        _, logprobs, values, masks = _forward(policy, rows, cfg.trl_first_token_mask)
        # The KL reference: the policy with its adapter switched off, or its frozen initial adapter.
        ref_logits = unwrapped.reference_logits(rows.query_ids, rows.query_mask, rows.response_ids, rows.response_mask)
        ref_logprobs = logprobs_from_logits(ref_logits[:, :-1], rows.response_ids[:, 1:])
        for key, value in zip(parts, (logprobs, values, ref_logprobs, masks)):
            parts[key].append(F.pad(value, (0, width - value.shape[1])))  # back to the batch width, masked out
    policy.train(was_training)
    logprobs, values, ref_logprobs, masks = (torch.cat(v) for v in parts.values())
    scores = rollout.scores.float()
    rewards, non_score_rewards, kls = kl_penalized_rewards(scores, logprobs, ref_logprobs, masks, kl_coef)
    values, advantages, returns = gae_advantages(values, rewards, masks, cfg.gamma, cfg.lam, cfg.whiten_rewards)
    return PPOBatch(scores, logprobs, ref_logprobs, values, masks, kls, non_score_rewards, rewards, advantages, returns)


def _local_sizes(cfg: PPOConfig, num_processes: int, rows: int) -> tuple[int, int]:
    """Per-process batch and mini-batch sizes, with one clear error for sizes that do not divide."""
    if cfg.batch_size % num_processes or cfg.mini_batch_size % num_processes:
        raise ConfigError(
            f"ppo.batch_size ({cfg.batch_size}) and ppo.mini_batch_size ({cfg.mini_batch_size}) are global and must "
            f"be multiples of the number of processes ({num_processes})"
        )
    batch, mini = cfg.batch_size // num_processes, cfg.mini_batch_size // num_processes
    if batch % (mini * cfg.gradient_accumulation_steps):
        raise ConfigError(
            f"ppo.batch_size ({cfg.batch_size}) must be a multiple of ppo.mini_batch_size ({cfg.mini_batch_size}) "
            f"x ppo.gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
        )
    if rows != batch:
        raise ConfigError(f"the rollout has {rows} rows but each process needs ppo.batch_size / processes = {batch}")
    return batch, mini


def _optimize(
    policy, optimizer, rollout: Rollout, batch: PPOBatch, cfg: PPOConfig, mini: int, accelerator, generator
) -> list[dict[str, torch.Tensor]]:
    """Step 4: `ppo_epochs` passes over shuffled mini-batches; returns each mini-batch's stats."""
    params = [p for p in policy.parameters() if p.requires_grad]
    accumulation = cfg.gradient_accumulation_steps
    all_stats = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(rollout), generator=generator).to(rollout.scores.device)
        for k, start in enumerate(range(0, len(rollout), mini)):
            idx = order[start : start + mini]
            # accelerate's accumulate() skips the gradient all-reduce until the `accumulation`-th mini-batch.
            context = accelerator.accumulate(policy) if accelerator is not None else nullcontext()
            with context:
                logits, logprobs, vpreds, _ = _forward(policy, rollout.select(idx).trimmed(), cfg.trl_first_token_mask)
                t = logprobs.shape[1]  # this mini-batch's own width; the columns after it are masked out
                loss, stats = ppo_loss(
                    batch.logprobs[idx, :t], batch.values[idx, :t], logprobs, vpreds, logits, batch.masks[idx, :t],
                    batch.advantages[idx, :t], batch.returns[idx, :t], cfg,
                )
                if accelerator is not None:
                    accelerator.backward(loss)  # divides by the accumulation steps itself
                    sync = accelerator.sync_gradients
                else:
                    (loss / accumulation).backward()
                    sync = (k + 1) % accumulation == 0
                if sync:
                    if cfg.max_grad_norm is not None:
                        if accelerator is not None:
                            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        else:
                            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
            all_stats.append(stats)
    return all_stats


def ppo_step(
    policy,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    kl_ctl: AdaptiveKLController | FixedKLController,
    cfg: PPOConfig,
    *,
    accelerator: Any = None,
    generator: Optional[torch.Generator] = None,
    num_processes: int = 1,
) -> dict[str, float]:
    """One PPO update on `rollout` (this process's rows); returns TRL-named stats as python floats.

    `policy` is a `train.models.Seq2SeqPolicy` (or the accelerator-prepared wrapper of one); `optimizer` updates its
    trainable parameters (TRL used `torch.optim.Adam(trainable, lr=cfg.learning_rate)`). `cfg.batch_size` and
    `cfg.mini_batch_size` are global: each process holds `batch_size / processes` rows. `generator` (a CPU
    torch.Generator) shuffles the mini-batches. With an accelerator, build it with
    `gradient_accumulation_steps=cfg.gradient_accumulation_steps`; its process count is used.
    """
    if accelerator is not None:
        if num_processes not in (1, accelerator.num_processes):
            raise ConfigError(f"num_processes={num_processes} disagrees with the accelerator's {accelerator.num_processes}")
        num_processes = accelerator.num_processes
        if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
            raise ConfigError(
                f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} steps but "
                f"ppo.gradient_accumulation_steps is {cfg.gradient_accumulation_steps}: build it with "
                "Accelerator(gradient_accumulation_steps=cfg.ppo.gradient_accumulation_steps)"
            )
    _, mini = _local_sizes(cfg, num_processes, len(rollout))
    was_training = policy.training
    timing: dict[str, float] = {}
    t0 = time.time()

    # 1-3. Old log-probs, values, reference log-probs; KL-penalised rewards; advantages and returns.
    kl_coef = kl_ctl.value
    chunk = cfg.forward_batch_size or mini
    batch = build_ppo_batch(policy, rollout, kl_coef, cfg, chunk_size=chunk, accelerator=accelerator)
    timing["time/ppo/forward_pass"] = time.time() - t0

    # 4. PPO epochs over mini-batches, dropout off as in TRL (see the module docstring).
    t = time.time()
    policy.eval()
    minibatch_stats = _optimize(policy, optimizer, rollout, batch, cfg, mini, accelerator, generator)
    policy.train(was_training)
    timing["time/ppo/optimize_step"] = time.time() - t

    # 5. Statistics, averaged over mini-batches and processes.
    t = time.time()
    stats = step_stats(batch, rollout, kl_coef, minibatch_stats)
    stats = _mean_over_processes(stats, accelerator)
    stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
    stats["ppo/learning_rate"] = optimizer.param_groups[0]["lr"]
    timing["time/ppo/calc_stats"] = time.time() - t

    # 6. KL controller update, counting the global batch.
    kl_ctl.update(stats["objective/kl"], cfg.batch_size)
    timing["time/ppo/total"] = time.time() - t0
    stats.update(timing)
    return stats


def step_stats(
    batch: PPOBatch, rollout: Rollout, kl_coef: float, minibatch_stats: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """TRL's `record_step_stats`: batch-level objective stats plus the mini-batch stats averaged, as floats."""
    masks, scores = batch.masks, batch.scores
    query_lens = rollout.query_mask.sum(dim=1).float()
    response_lens = rollout.response_mask.sum(dim=1).float()  # TRL counts the decoder start token too

    def std(x: torch.Tensor) -> torch.Tensor:
        return x.std() if x.numel() > 1 else torch.zeros(())

    stats = {
        "objective/kl": (batch.kls * masks).sum(dim=-1).mean(),  # summed over tokens, averaged over sequences
        "objective/entropy": (-batch.logprobs * masks).sum(dim=-1).mean(),
        "ppo/mean_non_score_reward": masked_mean(batch.non_score_rewards, masks),
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": std(scores),
        "tokens/queries_len_mean": query_lens.mean(),
        "tokens/queries_len_std": std(query_lens),
        "tokens/responses_len_mean": response_lens.mean(),
        "tokens/responses_len_std": std(response_lens),
    }
    for key in minibatch_stats[0]:
        stats[f"ppo/{key}"] = torch.stack([s[key] for s in minibatch_stats]).mean()
    return {"objective/kl_coef": float(kl_coef), **{k: float(v) for k, v in stats.items()}}


def _mean_over_processes(stats: dict[str, float], accelerator: Any) -> dict[str, float]:
    """Average every stat over processes (TRL's gather_stats); a no-op on one process."""
    if accelerator is None or accelerator.num_processes == 1:
        return stats
    keys = sorted(stats)  # the same order on every process
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))
