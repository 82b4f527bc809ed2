"""rewards/reward_fn.py: `make_reward_fn` scores in process or through the reward server, as the config says."""

from __future__ import annotations

import pytest
import torch

from rewards.client import RewardClient
from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.reward_fn import make_reward_fn
from rewards.scorer import RewardScorer


def test_make_reward_fn_picks_in_process_or_server(reversed_classifier, monkeypatch):
    cfg = RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", text="summary")
    local = make_reward_fn(cfg)
    assert isinstance(local.backend, RewardScorer) and local.where == "in-process on cpu"
    scores = local(["ignored prompt "], ["You are a kind friend."])
    torch.testing.assert_close(scores.rewards, local.score_texts(["You are a kind friend."]).rewards)

    monkeypatch.setenv("MY_REWARD_TOKEN", "s3cret")
    remote = make_reward_fn(RewardConfig(url="http://127.0.0.1:9/", token_env="MY_REWARD_TOKEN"))
    assert isinstance(remote.backend, RewardClient)
    assert remote.backend._http.headers["authorization"] == "Bearer s3cret"
    assert remote.where == "server http://127.0.0.1:9/"
    remote.close()
    with pytest.raises(RewardError, match="reward.text"):
        make_reward_fn(RewardConfig(url="http://127.0.0.1:9", text="everything"))
