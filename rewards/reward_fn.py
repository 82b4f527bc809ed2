"""The one entry point PPO and evaluation use: `make_reward_fn(cfg)` picks the reward server or an in-process scorer.

With `cfg.url` set, scores come from `python -m rewards.server` through `RewardClient` (bearer token from the
environment variable `cfg.token_env`); otherwise the classifier is loaded here, on `cfg.device`. Either way the
caller gets a `RewardFunction` with the same methods.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

from rewards.config import RewardConfig
from rewards.scorer import RewardScores, scored_texts


class ScoringBackend(Protocol):
    def score(self, texts: Sequence[str]) -> RewardScores: ...

    def close(self) -> None: ...


class RewardFunction:
    """Scores (prompt, summary) pairs the way cfg.text says, or raw texts; `backend` is a scorer or a client."""

    def __init__(self, backend: ScoringBackend, text_mode: str, where: str) -> None:
        self.backend = backend
        self.text_mode = text_mode
        self.where = where  # "in-process on cpu" or "server http://...": for logs

    def __call__(self, prompts: Sequence[str], summaries: Sequence[str]) -> RewardScores:
        return self.backend.score(scored_texts(prompts, summaries, self.text_mode))

    def score_texts(self, texts: Sequence[str]) -> RewardScores:
        return self.backend.score(texts)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "RewardFunction":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_reward_fn(cfg: RewardConfig, token: str | None = None, backoff_s: float = 0.5) -> RewardFunction:
    scored_texts([], [], cfg.text)  # reject an unknown cfg.text now rather than at the first PPO step
    if cfg.url:
        from rewards.client import RewardClient

        if token is None:
            token = os.environ.get(cfg.token_env) or None
        client = RewardClient(cfg.url, token=token, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=backoff_s)
        return RewardFunction(client, cfg.text, f"server {cfg.url}")
    from rewards.scorer import RewardScorer

    scorer = RewardScorer.from_config(cfg)
    return RewardFunction(scorer, cfg.text, f"in-process on {scorer.device}")
