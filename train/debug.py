"""The debug hook of the training loops: with DETOX_PPO_DEBUG_DIR set, every process appends, per step, the prompt
ids it trained on and a hash of its trainable weights to `<dir>/rank<r>.jsonl`. Tests use it to check sharding
and that all processes hold the same weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from train.distributed import gathered_trainable

DEBUG_ENV = "DETOX_PPO_DEBUG_DIR"


def trainable_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_debug_record(accelerator: Any, model: Any, step: int, prompt_ids: list[str]) -> None:
    """Every process must call it (under ZeRO-3 the hash gathers the weights); a no-op without the variable."""
    directory = os.environ.get(DEBUG_ENV)
    if not directory:
        return
    with gathered_trainable(accelerator, model):
        digest = trainable_hash(accelerator.unwrap_model(model))
    Path(directory).mkdir(parents=True, exist_ok=True)
    record = {"step": step, "prompt_ids": prompt_ids, "params_sha256": digest}
    with open(Path(directory) / f"rank{accelerator.process_index}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
