"""rewards/classifier.py: the device the reward model runs on."""

import torch

from rewards.classifier import resolve_device


def test_reward_device_auto_is_this_process_s_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda:3")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda:0")  # one process, no launcher
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # explicit devices are kept
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda:0")  # the launcher gave this process one GPU of its own
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
