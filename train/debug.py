"""The debug hook of SFT and PPO (`debug_dir` in the config): every process appends, per optimisation step, the
examples it trained on and a hash of its trainable weights to `<debug_dir>/rank<r>.jsonl`. Tests use it to check
how the data was sharded and that all processes hold the same weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from train.distributed import gathered_trainable


def trainable_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_debug_record(debug_dir: Optional[str], accelerator: Any, model: Any, step: int, example_ids: list) -> None:
    """A no-op without `debug_dir`; otherwise every process must call it (under ZeRO-3 the hash gathers weights)."""
    if not debug_dir:
        return
    with gathered_trainable(accelerator, model):
        digest = trainable_hash(accelerator.unwrap_model(model))
    Path(debug_dir).mkdir(parents=True, exist_ok=True)
    record = {"step": step, "example_ids": example_ids, "params_sha256": digest}
    with open(Path(debug_dir) / f"rank{accelerator.process_index}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
