"""Optional reward shaping for PPO: running mean/std normalisation and clipping, with saveable state.

Off by default (the reference used raw logits). The state is three floats so PPO checkpoints can store it and a
resumed run continues with the same statistics.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from rewards.config import RewardConfig
from rewards.errors import RewardError


class RewardNormalizer:
    """Tracks the running mean/variance of every reward seen and maps rewards to (r - mean) / std, then clips."""

    def __init__(self, normalize: bool = False, clip: Optional[float] = None, eps: float = 1e-8) -> None:
        if clip is not None and not clip > 0:
            raise RewardError(f"reward.clip must be a positive number or null, got {clip}")
        self.normalize = normalize
        self.clip = clip
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean (Chan et al. parallel update)

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "RewardNormalizer":
        return cls(normalize=cfg.normalize, clip=cfg.clip)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def update(self, rewards: torch.Tensor) -> None:
        values = rewards.detach().double().flatten().cpu()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def __call__(self, rewards: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Shaped rewards (same shape/dtype/device); with update=True the batch first joins the statistics."""
        out = rewards
        if self.normalize:
            if update:
                self.update(rewards)
            out = (out - self.mean) / (self.std + self.eps)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise RewardError(f"reward normaliser state lacks {sorted(missing)}; was it saved by RewardNormalizer?")
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
