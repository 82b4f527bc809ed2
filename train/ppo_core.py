"""The PPO math for a seq2seq policy, as pure functions on tensors (classic TRL 0.11.4 `PPOTrainer.step` semantics).

Nothing here calls a model, an optimizer or a process group: `train/ppo.py` runs the step and passes in the one
collective the loss needs (`all_reduce_sum`). Every function takes explicit scalars, not a config object.

One PPO step over a global batch (`train/ppo.py`, steps 1-5):
  1. a `Trajectory` per row: prompt and response ids, the reward-model score, and the old policy log-probs,
     values and reference log-probs from no-grad forward passes (`train/rollout.py`), gathered from every process;
  2. `ScoreShaper` (optional running normalisation and clipping), then `kl_penalized_rewards`:
     `-kl_coef * (logp - logp_ref)` per token, plus the score on the last response token;
  3. `gae_advantages`: GAE (gamma, lambda), returns = advantages + values, advantages whitened over the batch;
  4. `ppo_epochs` passes over shuffled mini-batches: `ppo_loss` = clipped policy loss + `vf_coef` * clipped value
     loss, skipped (zero loss) when the mini-batch's mean ratio exceeds `ratio_threshold`;
  5. the KL controller update with the global batch size.

Critic-free estimators (`make_estimator`: `ppo.advantage_estimator` rloo or group) change steps 2-4 only: the k
summaries of a prompt sit in k consecutive rows; a summary's reward is its score (minus kl_coef times its summed KL
when the KL is a reward penalty: `sequence_rewards`); its advantage is that reward against the prompt's other
samples (`rloo_advantages`: minus their mean; `group_advantages`: standardised within the group), the same for each
of its tokens; `ppo_loss` then has no value term and, when the KL is in the loss, adds kl_coef times the k3
estimator per token. No value head exists.

The global batch. Every statistic that spans the batch is computed on the whole global batch, whatever the number
of processes: steps 2-3 run on the gathered trajectory (identical on every process, so no collective is needed),
and a mini-batch's loss is normalised by its global token count, its skip decision and statistics come from sums
all-reduced over the processes that share it (`ppo_loss`). So N processes compute the 1-process update up to float
rounding (tests/train/test_ppo_distributed.py).

Shapes: B = rows, Q = query length, R = decoder length (start token included), T = R - 1 predicted positions
(position t predicts decoder token t + 1), V = vocabulary size.

Differences from TRL 0.11.4 (tests/train/test_ppo_core_vs_trl.py checks everything else against it):
- First-token mask (`response_loss_mask(trl_first_token_mask=...)`): for encoder-decoder models TRL masks out
  position 0, the log-prob of the FIRST generated token (for decoder-only models its `start` is the first response
  token, so this is an off-by-one). By default we keep it; `ppo.trl_first_token_mask: true` reproduces TRL.
- Ratio guard: TRL multiplies a skipped mini-batch's loss by 0, which gives NaN gradients when the ratio overflows
  to inf; ours back-propagates an exactly-zero loss that bypasses the ratio. The optimizer still steps (keeping
  processes in sync), so Adam's momentum from earlier mini-batches still moves the weights, as in TRL.
- Batch sizes are global (TRL's were per process, and it whitened and normalised per process). TRL's array-valued
  stats (kl_dist, ratio, advantages, logprobs) are not returned; `ppo/policy/ratio_mean`, `ppo/policy/first_ratio`
  (the first mini-batch's) and `ppo/policy/skipped` (fraction of skipped mini-batches) are added.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from train.errors import ConfigError

AllReduceSum = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the processes (identity on one)

# ----------------------------------------------------------------------------------------------------
# The trajectory


@dataclass
class Trajectory:
    """What experience making produces for B rows; the update needs nothing else.

    Per-token tensors are (B, T); only positions where `masks` is 1 count (the others hold what the forward pass
    gave there, or 0, as TRL's do). Row order is global: process p's rows follow process p - 1's, so a gathered
    trajectory is row for row the one a single process would have made.
    """

    query_ids: torch.Tensor  # (B, Q) long, right-padded prompt ids
    query_mask: torch.Tensor  # (B, Q) long
    response_ids: torch.Tensor  # (B, R) long: [decoder_start, t1, ..., eos, pad, ...] as generate() returns them
    response_mask: torch.Tensor  # (B, R) long: 1 on real decoder tokens (start token included), 0 on padding
    scores: torch.Tensor  # (B,) float reward-model scores, before any shaping
    logprobs: torch.Tensor  # (B, T) float old policy log-probs of the decoder tokens
    ref_logprobs: torch.Tensor  # (B, T) float KL reference log-probs
    values: Optional[torch.Tensor]  # (B, T) float old value estimates; None without a value head
    masks: torch.Tensor  # (B, T) long: predicted positions that count (`response_loss_mask`)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> "Trajectory":
        """The rows `index` (a slice or a 1-D index tensor)."""
        return Trajectory(**{f.name: select_rows(getattr(self, f.name), index) for f in fields(self)})

    def trimmed(self) -> "Trajectory":
        """The same rows without the trailing columns that are padding in every row.

        A forward pass on them then costs what its own longest prompt and response cost, not the batch's.
        Exact: T5 masks padded keys and its position biases are relative, so outputs at real positions do not
        depend on trailing padding.
        """
        q, r = _used_width(self.query_mask, 1), _used_width(self.response_mask, 2)
        cut = {"query_ids": q, "query_mask": q, "response_ids": r, "response_mask": r}
        return Trajectory(**{
            f.name: (getattr(self, f.name) if f.name == "scores" else select_rows(getattr(self, f.name),
                                                                            (slice(None), slice(cut.get(f.name, r - 1)))))
            for f in fields(self)
        })


def select_rows(tensor: Optional[torch.Tensor], index) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor[index]


def _used_width(mask: torch.Tensor, minimum: int) -> int:
    """1 + the last column holding a real token in any row (at least `minimum`)."""
    used = torch.nonzero(mask.any(dim=0)).flatten()
    return max(int(used.max()) + 1 if len(used) else 0, minimum)


def check_batch_sizes(batch_size: int, mini_batch_size: int, accumulation: int, processes: int,
                      rows: Optional[int] = None, samples_per_prompt: int = 1) -> None:
    """One clear error for global batch sizes that do not split evenly over mini-batches and processes (and, with
    k samples per prompt, whole prompts over processes)."""
    k = samples_per_prompt
    if k > 1 and batch_size % (k * processes):
        raise ConfigError(f"ppo.batch_size ({batch_size}) is {batch_size / k:g} prompts x {k} samples "
                          f"(rollout.samples_per_prompt); a prompt's samples stay on one process, so it must be a "
                          f"multiple of {k} x the {processes} training processes")
    if batch_size % processes or mini_batch_size % processes:
        raise ConfigError(f"ppo.batch_size ({batch_size}) and ppo.mini_batch_size ({mini_batch_size}) are global "
                          f"and must be multiples of the {processes} training processes")
    if batch_size % (mini_batch_size * accumulation):
        raise ConfigError(f"ppo.batch_size ({batch_size}) must be a multiple of ppo.mini_batch_size "
                          f"({mini_batch_size}) x ppo.gradient_accumulation_steps ({accumulation})")
    if rows is not None and rows != batch_size:
        raise ConfigError(f"the trajectory has {rows} rows but ppo.batch_size is {batch_size} (global)")


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
# Tensor helpers (TRL's trl/core.py semantics)


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
    recursion bootstraps with 0 after the last token. Whitening spans all B rows: pass the global batch.
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


# ----------------------------------------------------------------------------------------------------
# Critic-free advantages: a prompt's k samples in k consecutive rows (rollout.samples_per_prompt)


def _groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) -> (B / k, k): row g holds prompt g's k samples."""
    if rewards.ndim != 1 or k < 2 or len(rewards) % k:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not make groups of k = {k} >= 2 samples per prompt")
    return rewards.view(-1, k)


def _differences(groups: torch.Tensor) -> torch.Tensor:
    """(G, k) -> (G, k, k): [g, i, j] = r_gi - r_gj, exactly 0 where two rewards are equal (a mean would round)."""
    return groups[:, :, None] - groups[:, None, :]


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) sequence rewards -> (B,) REINFORCE leave-one-out advantages: r_i minus the mean of the k - 1 other
    rewards of its prompt, i.e. the mean of r_i - r_j over j != i (exactly 0 in a group of equal rewards)."""
    return (_differences(_groups(rewards, k)).sum(dim=2) / (k - 1)).flatten()


GROUP_STD_EPS = 1e-4  # as TRL's GRPO: (r - mean) / (std + eps), so a group of equal rewards gets 0, not 0 / 0


def group_advantages(rewards: torch.Tensor, k: int, eps: float = GROUP_STD_EPS) -> torch.Tensor:
    """(B,) sequence rewards -> (B,) group-relative (GRPO) advantages: (r_i - mean) / (std + eps) over its
    prompt's k rewards, with the unbiased standard deviation (TRL's GRPO)."""
    centred = _differences(_groups(rewards, k)).mean(dim=2)  # r_i - mean, exactly 0 in a group of equal rewards
    std = torch.sqrt((centred**2).sum(dim=1, keepdim=True) / (k - 1))
    return (centred / (std + eps)).flatten()


def sequence_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A summary as one action: its score minus `kl_coef` times its summed per-token KL (RLOO's KL penalty).

    scores (B,), logprobs / ref_logprobs / mask (B, T) -> rewards (B,), non_score_rewards (B, T), kls (B, T).
    """
    rewards, non_score_rewards, kls = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    return (rewards * mask).sum(dim=1), non_score_rewards, kls


# ----------------------------------------------------------------------------------------------------
# The estimator: rewards -> advantages, and which parts the loss has


@dataclass
class Advantages:
    """What the update needs besides the trajectory, each (B, T); only positions where the trajectory's `masks` is 1
    count. `kls` and `non_score_rewards` are raw, for the statistics. `values` and `returns` (the value loss's
    targets) are None for a critic-free estimator."""

    advantages: torch.Tensor
    values: Optional[torch.Tensor]
    returns: Optional[torch.Tensor]
    kls: torch.Tensor  # logprobs - ref_logprobs per token
    non_score_rewards: torch.Tensor  # the KL penalty in the reward per token (0 when the KL is in the loss)


@dataclass(frozen=True)
class Estimator:
    """`ppo.advantage_estimator`, resolved once (`make_estimator`): `advantages(trajectory, shaped scores, kl_coef)`
    and the loss's parts: a value loss when `uses_value_head`, the k3 KL term when `kl_in_loss`."""

    name: str
    uses_value_head: bool
    kl_in_loss: bool
    advantages: Callable[[Trajectory, torch.Tensor, float], Advantages]
    samples_per_prompt: int  # k: a prompt's samples are k consecutive rows (`check_groups`)

    def check_groups(self, query_ids: torch.Tensor) -> None:
        """ValueError unless the (B, Q) prompts come as k consecutive copies each: the rows a baseline compares."""
        k = self.samples_per_prompt
        if k == 1:
            return
        if len(query_ids) % k:
            raise ValueError(f"{len(query_ids)} rows are not whole groups of k = {k} samples per prompt")
        groups = query_ids.view(-1, k, query_ids.shape[1])
        if not bool((groups == groups[:, :1]).all()):
            raise ValueError(f"the {self.name} estimator compares a prompt's k = {k} samples, but the trajectory's "
                             f"rows are not {k} consecutive samples of one prompt each (make it with make_experience)")


ESTIMATORS = ("gae", "rloo", "group")


def make_estimator(name: str, kl_penalty: str, samples_per_prompt: int, gamma: float, lam: float,
                   whiten_rewards: bool) -> Estimator:
    """The estimator `name` (gae, rloo, group) with the KL to the reference in the reward or the loss (`kl_penalty`:
    reward, loss, or auto = loss for group, else reward)."""
    if name not in ESTIMATORS:
        raise ConfigError(f"ppo.advantage_estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}")
    if kl_penalty not in ("auto", "reward", "loss"):
        raise ConfigError(f"ppo.kl_penalty must be auto, reward or loss, got {kl_penalty!r}")
    if name != "gae" and samples_per_prompt < 2:
        raise ConfigError(f"ppo.advantage_estimator {name} compares the summaries of a prompt with each other: set "
                          f"rollout.samples_per_prompt to 2 or more (it is {samples_per_prompt})")
    kl_in_loss = kl_penalty == "loss" or (kl_penalty == "auto" and name == "group")
    k = samples_per_prompt

    if name == "gae":
        def advantages(trajectory: Trajectory, scores: torch.Tensor, kl_coef: float) -> Advantages:
            # Per-token rewards (the KL penalty, the score on the last token), then GAE whitened over the batch.
            rewards, non_score, kls = kl_penalized_rewards(scores, trajectory.logprobs, trajectory.ref_logprobs,
                                                           trajectory.masks, 0.0 if kl_in_loss else kl_coef)
            values, advantage, returns = gae_advantages(trajectory.values, rewards, trajectory.masks, gamma, lam,
                                                        whiten_rewards)
            return Advantages(advantage, values, returns, kls, non_score)

        return Estimator(name, True, kl_in_loss, advantages, k)

    baseline = rloo_advantages if name == "rloo" else group_advantages

    def advantages(trajectory: Trajectory, scores: torch.Tensor, kl_coef: float) -> Advantages:
        # One reward per summary, compared within its prompt's k samples; every response token gets the summary's.
        rewards, non_score, kls = sequence_rewards(scores, trajectory.logprobs, trajectory.ref_logprobs,
                                                   trajectory.masks, 0.0 if kl_in_loss else kl_coef)
        per_token = baseline(rewards, k)[:, None] * trajectory.masks
        return Advantages(per_token, None, None, kls, non_score)

    return Estimator(name, False, kl_in_loss, advantages, k)


def ppo_loss(
    old_logprobs: torch.Tensor,
    old_values: Optional[torch.Tensor],
    logprobs: torch.Tensor,
    vpreds: Optional[torch.Tensor],
    logits: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    returns: Optional[torch.Tensor],
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    ratio_threshold: float,
    token_count: Optional[float] = None,
    all_reduce_sum: Optional[AllReduceSum] = None,
    gradient_averaged_over: int = 1,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss [+ `vf_coef` * clipped value loss] [+ `kl_coef` * k3 KL] for this process's rows of one
    mini-batch.

    All (b, T) except logits (b, T, V). Critic-free estimators pass `old_values`, `vpreds` and `returns` as None: no
    value loss and no val/* stats. `ref_logprobs` (b, T) puts the KL to the reference into the loss (GRPO): per token
    k3 = exp(r) - r - 1 with r = ref_logprobs - logprobs, a non-negative estimate of KL(policy || ref) (unbiased
    for tokens sampled from the current policy, so on the first mini-batch; later ones reuse the old policy's
    samples, as TRL's GRPO does), whose gradient pulls towards the reference; "loss/kl" is its token mean, before
    `kl_coef`.

    The losses are token means over the WHOLE mini-batch: per-token terms are summed here, the sums are added up
    over processes with `all_reduce_sum`, and divided by `token_count` (the mini-batch's unmasked tokens on all
    processes; default: `mask.sum()`, one process). The returned loss is this process's share, multiplied by
    `gradient_averaged_over` (the number of processes whose gradients DDP or DeepSpeed average), so the averaged
    gradient is the gradient of the global token mean.

    Returns the loss to back-propagate and detached scalar stats with TRL's keys (without "ppo/"), each a global
    token mean; "loss/value" is before `vf_coef`, as in TRL. Ratio guard: when the global mean ratio exceeds
    `ratio_threshold` (or is NaN) every process skips the mini-batch: the loss is 0 with all-zero gradients (so
    the gradient all-reduce still runs) and "policy/skipped" is 1.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_token = torch.max(pg_losses, pg_losses2)
    losses = {"loss/policy": (pg_token, 1.0)}  # name: (per-token loss, its weight in the total)
    stats_terms = {"policy/entropy": lambda: entropy_from_logits(logits),  # computed under no_grad below
                   "policy/approxkl": lambda: 0.5 * (logprobs - old_logprobs) ** 2,
                   "policy/policykl": lambda: old_logprobs - logprobs,
                   "policy/clipfrac": lambda: torch.gt(pg_losses2, pg_losses).float(),
                   "policy/ratio_mean": lambda: ratio}
    if vpreds is not None:
        vpred_clipped = clip_by_value(vpreds, old_values - cliprange_value, old_values + cliprange_value)
        vf_losses1 = (vpreds - returns) ** 2
        vf_losses2 = (vpred_clipped - returns) ** 2
        losses["loss/value"] = (0.5 * torch.max(vf_losses1, vf_losses2), vf_coef)
        stats_terms.update({"val/vpred": lambda: vpreds, "val/error": lambda: (vpreds - returns) ** 2,
                            "val/clipfrac": lambda: torch.gt(vf_losses2, vf_losses1).float()})
    real = mask.bool()  # `where`, not a product: an overflowing ratio at a padded position must not give inf * 0
    if ref_logprobs is not None:
        # Zeroed before the exponential: at a padded position ref_logprobs is 0 and exp(0 - log p(pad)) can overflow,
        # and a `where` after it would still back-propagate 0 * inf = NaN.
        log_ratio = torch.where(real, ref_logprobs - logprobs, torch.zeros_like(logprobs))
        losses["loss/kl"] = (torch.exp(log_ratio) - log_ratio - 1, kl_coef)

    def masked_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.where(real, values, torch.zeros_like(values)).sum()

    loss_sums = {name: masked_sum(token) for name, (token, _) in losses.items()}
    with torch.no_grad():
        # One all-reduce for every statistic: the loss terms' sums, then the other token sums, in a fixed order.
        names = list(loss_sums) + list(stats_terms)
        sums = torch.stack([*(v.detach().float() for v in loss_sums.values()),
                            *(masked_sum(term().float()) for term in stats_terms.values())])
        if token_count is None:
            token_count = float(real.sum())
        if all_reduce_sum is not None:
            sums = all_reduce_sum(sums)
        stats = dict(zip(names, sums / token_count))

    scale = gradient_averaged_over / token_count
    loss = sum(weight * loss_sums[name] for name, (_, weight) in losses.items()) * scale
    avg_ratio = stats["policy/ratio_mean"].item()
    skipped = not avg_ratio <= ratio_threshold  # NaN ratios are skipped too
    if skipped:
        warnings.warn(
            f"The average ratio of batch ({avg_ratio:.2f}) exceeds threshold {ratio_threshold:.2f}. Skipping batch."
        )
        # Zero gradients that do not flow through exp(ratio) (0 * inf would be NaN).
        loss = (logprobs * 0.0).sum() + (0.0 if vpreds is None else (vpreds * 0.0).sum())
        for name in losses:
            stats[name] = torch.zeros_like(stats[name])
    stats["loss/total"] = sum(weight * stats[name] for name, (_, weight) in losses.items())
    stats["policy/skipped"] = torch.tensor(float(skipped))
    return loss, stats


def trajectory_minibatch_stats(
    old_values: Optional[torch.Tensor], advantages: torch.Tensor, returns: Optional[torch.Tensor], mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The mini-batch stats that need no new forward pass, over ALL its rows (b, T): TRL's advantage, return and
    old-value statistics (the latter two only with a value head)."""
    stats = {"policy/advantages_mean": masked_mean(advantages, mask)}
    if old_values is not None:
        stats.update({
            "returns/mean": masked_mean(returns, mask),
            "returns/var": masked_var(returns, mask),
            "val/mean": masked_mean(old_values, mask),
            "val/var": masked_var(old_values, mask),
        })
    return stats


def step_stats(
    trajectory: Trajectory,
    scores: torch.Tensor,
    kls: torch.Tensor,
    non_score_rewards: torch.Tensor,
    kl_coef: float,
    minibatch_stats: list[dict[str, torch.Tensor]],
) -> dict[str, float]:
    """TRL's `record_step_stats`: batch-level stats of the global batch plus the mini-batch stats averaged."""
    masks = trajectory.masks
    query_lens = trajectory.query_mask.sum(dim=1).float()
    response_lens = trajectory.response_mask.sum(dim=1).float()  # TRL counts the decoder start token too

    def std(x: torch.Tensor) -> torch.Tensor:
        return x.std() if x.numel() > 1 else torch.zeros(())

    stats = {
        "objective/kl": (kls * masks).sum(dim=-1).mean(),  # summed over tokens, averaged over sequences
        "objective/entropy": (-trajectory.logprobs * masks).sum(dim=-1).mean(),
        "ppo/mean_non_score_reward": masked_mean(non_score_rewards, masks),
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": std(scores),
        "tokens/queries_len_mean": query_lens.mean(),
        "tokens/queries_len_std": std(query_lens),
        "tokens/responses_len_mean": response_lens.mean(),
        "tokens/responses_len_std": std(response_lens),
    }
    for key in minibatch_stats[0]:
        stats[f"ppo/{key}"] = torch.stack([s[key].float().cpu() for s in minibatch_stats]).mean()
    # Old and new policy are the same model on the first mini-batch: its ratio is 1 up to the precision's rounding.
    stats["ppo/policy/first_ratio"] = minibatch_stats[0]["policy/ratio_mean"]
    out = {"objective/kl_coef": float(kl_coef), **{k: float(v) for k, v in stats.items()}}
    if "ppo/val/error" in out:
        out["ppo/val/var_explained"] = 1 - out["ppo/val/error"] / out["ppo/returns/var"]
    return out


# ----------------------------------------------------------------------------------------------------
# KL controllers


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


def make_kl_controller(
    init_kl_coef: float, adaptive: bool, target: float, horizon: int
) -> AdaptiveKLController | FixedKLController:
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)


# ----------------------------------------------------------------------------------------------------
# Score shaping: the one place where reward-model scores become PPO scores

SCORE_NORMALIZATIONS = ("none", "scale", "standardize")


class ScoreShaper:
    """Reward-model scores -> PPO scores: optional running normalisation, then optional clipping.

    `normalization`: "none" (the original notebook: raw logits), "scale" (divide by the running standard
    deviation: TRL's `use_score_scaling`) or "standardize" (also subtract the running mean: TRL's
    `use_score_scaling` + `use_score_norm`). The running statistics cover every score seen so far, this batch
    included, with the unbiased standard deviation as TRL. `clip`: then clip to [-clip, clip] (TRL's `score_clip`).
    Call it with the global batch's scores: every process then shapes alike and keeps the same state, with no
    collective. The state is three floats, saved in checkpoints.
    """

    def __init__(self, normalization: str = "none", clip: Optional[float] = None):
        if normalization not in SCORE_NORMALIZATIONS:
            raise ValueError(f"score normalization must be one of {SCORE_NORMALIZATIONS}, got {normalization!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"the score clip must be a positive number or null, got {clip}")
        self.normalization, self.clip = normalization, clip
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # m2: sum of squared deviations (Chan et al. parallel update)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, scores: torch.Tensor) -> None:
        values = scores.detach().double().flatten().cpu()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.m2 += ((values - batch_mean) ** 2).sum().item() + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) scores of the global batch -> (B,) shaped float scores (the batch first joins the statistics)."""
        out = scores.float()
        if self.normalization != "none":
            self.update(out)
            factor = self.std + torch.finfo(out.dtype).eps
            out = (out - self.mean) / factor if self.normalization == "standardize" else out / factor
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
