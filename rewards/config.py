"""Reward settings. Lives in `rewards/` so the reward server can use it without importing `train`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class RewardConfig:
    # Hate-speech classifier: hub id or local directory. Labels are looked up by name in its id2label.
    model_name_or_path: str = "facebook/roberta-hate-speech-dynabench-r4-target"
    reward_label: str = "nothate"  # reward = raw logit of this class (the reference notebook's choice)
    toxic_label: str = "hate"  # toxicity = softmax probability of this class
    # What is scored: the reference notebook scored prompt + summary; "summary" scores the summary alone.
    text: Literal["prompt_and_summary", "summary"] = "prompt_and_summary"
    # Placement: "auto" = each process's own device (its GPU by LOCAL_RANK, or the CPU); or an explicit one
    # such as "cpu" or "cuda:7", which keeps the classifier off the training GPUs.
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 64
    max_length: Optional[int] = None  # None = the classifier's own limit
    # A reward server (python -m rewards.server) instead of an in-process classifier.
    url: Optional[str] = None
    token_env: str = "DETOX_REWARD_TOKEN"  # bearer token is read from this environment variable, never from YAML
    timeout_s: float = 30.0
    max_retries: int = 3
    trust_remote_code: bool = False
