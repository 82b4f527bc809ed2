"""Fixtures of the reward tests: a random classifier whose labels come in the reverse order, the reward server as a
subprocess, and the in-process scorer it must agree with."""

from __future__ import annotations

import pytest

from rewards.config import RewardConfig
from rewards.scorer import RewardScorer
from helpers import REWARD_MAX_CHARS, REWARD_MAX_TEXTS, RewardServerProcess, build_tiny_classifier

@pytest.fixture(scope="session")
def reversed_classifier(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("reversed"), {0: "hate", 1: "nothate"})


@pytest.fixture(scope="session")
def server(tiny_artifacts):
    # A 30 ms wait gives concurrent requests time to meet in one batch.
    proc = RewardServerProcess(tiny_artifacts.roberta, "--reward.batch_size", "32", "--reward_server.max_wait_ms", "30",
                               "--reward_server.max_texts_per_request", str(REWARD_MAX_TEXTS),
                               "--reward_server.max_chars", str(REWARD_MAX_CHARS))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def local_scorer(tiny_artifacts):
    return RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))
